"""The loader: legacy models read into the IR the passes expect."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.io.loader import load_model


def _ir3_gemm(opset: int) -> onnx.ModelProto:
    """IR version 3, as the pytorch-converted ONNX test models: every initializer is a graph input too."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (8, 16)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b")
    attributes = {"transB": 1, **({"broadcast": 1} if opset < 7 else {})}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], **attributes)], "ir3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 16]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def test_ir3_initializers_are_constants_not_inputs():
    model = load_model(_ir3_gemm(8))
    assert model.ir_version == 4
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert set(model.graph.initializers) == {"w", "b"}


def test_ir3_opset6_model_compiles_with_int8_weights():
    """Found by the ONNX test-model sweep (pytorch-converted/test_Linear*): the compiled model
    failed onnx.checker ("w_scale in initializer but not in graph input"), and the weights, being
    graph inputs, were quantized as activations. Opset 6 (no Gemm-6 kernel in ONNX Runtime) is
    converted to opset 7 on the way in."""
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(0, 1, (4, 16)).astype(np.float32)} for _ in range(4)]
    result = qcompile.compile(_ir3_gemm(6), batches, config={"measure_latency": False})
    compiled = result.to_proto()
    onnx.checker.check_model(compiled, full_check=True)
    assert [i.name for i in compiled.graph.input] == ["x"]
    weights = [t for t in compiled.graph.initializer if t.dims == [8, 16]]
    assert [t.data_type for t in weights] == [TensorProto.INT8]
    assert result.report.evaluation["outputs"]["y"]["sqnr_db"] > 30
