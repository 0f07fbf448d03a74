"""Preparation passes on tiny graphs: before and after."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import cnn_batches, make_model, tiny_cnn

from qcompile.errors import ModelError


def _run(proto, batch):
    return ort.InferenceSession(proto.SerializeToString()).run(None, batch)[0]


def test_fold_batchnorm_removes_bn_and_keeps_outputs():
    proto = tiny_cnn()
    model, _ = run_passes(proto, "fold-batchnorm")
    assert not any(n.op_type == "BatchNormalization" for n in model.graph)
    batch = cnn_batches(1)[0]
    folded = ir.serde.serialize_model(model)
    np.testing.assert_allclose(_run(folded, batch), _run(proto, batch), rtol=1e-4, atol=1e-5)


def test_shape_inference_keeps_symbolic_batch_dim():
    model, context = run_passes(tiny_cnn(batch="N"), "shape-inference")
    conv_out = next(n for n in model.graph if n.name == "conv1").outputs[0]
    assert str(conv_out.shape[0]) == "N" and conv_out.shape[1] == 8


def test_shape_inference_error_is_a_model_error():
    # Add of [2,3] and [4] cannot broadcast: strict inference must say so, not warn.
    proto = make_model(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])], [],
    )
    with pytest.raises(ModelError, match="shape inference"):
        run_passes(proto, "shape-inference")


def test_lift_constants_turns_constant_weights_into_initializers():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w_value")
    proto = make_model(
        [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [],
    )
    model, _ = run_passes(proto, "lift-constants")
    assert "w" in model.graph.initializers
    assert not any(n.op_type == "Constant" for n in model.graph)


def test_remove_identity_and_unused():
    proto = make_model(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"]),
         helper.make_node("Neg", ["x"], ["dead"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [],
    )
    model, _ = run_passes(proto, "remove-identity,remove-unused")
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_upgrade_opset_to_13_for_per_axis_quantization():
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [], opset=11,
    )
    model, _ = run_passes(proto, "upgrade-opset")
    assert model.opset_imports[""] == 13
    model, _ = run_passes(proto, "upgrade-opset", activation_type="uint16")
    assert model.opset_imports[""] == 21


def test_strip_metadata_drops_node_metadata_and_keeps_the_computation():
    proto = tiny_cnn()
    entry = proto.graph.node[0].metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.stack_trace", "File model.py, line 1" * 50
    proto.graph.node[0].doc_string = "exported"
    model, _ = run_passes(proto, ["strip-metadata"])
    first = next(iter(model.graph))
    assert first.metadata_props == {} and not first.doc_string
    assert [n.op_type for n in model.graph] == [n.op_type for n in proto.graph.node]
