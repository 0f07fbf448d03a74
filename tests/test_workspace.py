"""qcompile.io.workspace.drop_dead_initializers: no compiled model ships a weight nothing reads."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

import qcompile
from qcompile.io.workspace import drop_dead_initializers
from tiny_models import _init, make_model


def _matmul_model(rows: int = 64, cols: int = 64) -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, cols])],
        [_init("w", weight)],
    )


def test_a_pipeline_without_remove_unused_ships_no_float_weight(tmp_path):
    # Before the fix the float "w" stayed beside the MatMulNBits that replaced it: the INT4 file
    # was larger than the fp32 one.
    source = tmp_path / "mm.onnx"
    onnx.save(_matmul_model(), str(source))
    result = qcompile.compile(str(source), config={"pipeline": ["quantize-weights(bits=4, block=32)"]})
    out = tmp_path / "mm.int4.onnx"
    result.save(out)
    saved = onnx.load(str(out))
    assert [n.op_type for n in saved.graph.node] == ["MatMulNBits"]
    assert "w" not in {t.name for t in saved.graph.initializer}
    assert all(t.data_type != TensorProto.FLOAT or np.prod(t.dims) < 64 * 64 for t in saved.graph.initializer)
    # 64x64 fp32 is 16 KiB; its 4-bit blocks of 32 (plus one scale per block) are about 2.5 KiB.
    assert out.stat().st_size < 0.3 * source.stat().st_size
    assert result.report.transformations["dead-initializers"] == {"dropped": 1, "bytes": 64 * 64 * 4}


def _if_model() -> onnx.ModelProto:
    """``w`` is read only inside the then-branch (by name, from the outer scope); ``dead`` by
    nothing; ``fed`` is an initializer that is also a graph input, read by nothing."""
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "if",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("fed", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [_init("w", np.ones(2, np.float32)), _init("dead", np.zeros(3, np.float32)),
         _init("fed", np.zeros(2, np.float32))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_an_initializer_read_only_inside_an_if_branch_is_kept():
    model = ir.serde.deserialize_model(_if_model())
    dropped = drop_dead_initializers(model)
    assert set(model.graph.initializers) == {"w", "fed"}
    assert dropped == {"count": 1, "bytes": 3 * 4}
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_a_dead_initializer_of_a_branch_is_dropped():
    model = ir.serde.deserialize_model(_if_model())
    then_branch = model.graph.node(0).attributes["then_branch"].value
    then_branch.initializers["inner_dead"] = ir.Value(name="inner_dead", const_value=ir.tensor(np.ones(4, np.float32)))
    dropped = drop_dead_initializers(model)
    assert "inner_dead" not in then_branch.initializers
    assert set(model.graph.initializers) == {"w", "fed"}
    assert dropped["count"] == 2
