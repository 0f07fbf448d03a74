"""Preparation passes on tiny graphs: before and after."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import cnn_batches, make_model, tiny_cnn, tiny_lstm

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


@pytest.mark.parametrize("bias_shape", [(1, 4, 1, 1), (4, 1, 1), (1,), ()])
def test_fold_conv_bias_folds_paddles_conv_then_add(bias_shape):
    """paddle2onnx's convolution: Conv without bias, then Add of a [1, C, 1, 1] constant. Left
    apart, quantization rounds the Conv's output before the bias and again after (PP-OCRv6's
    recognizer: 54 pairs); folded, the Conv carries the bias and the Add's output name."""
    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "cw")
    bias = numpy_helper.from_array(rng.normal(0, 1, bias_shape).astype(np.float32), "cb")
    proto = make_model(
        [helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Add", ["c", "cb"], ["y"], name="bias_add"),
         helper.make_node("Relu", ["y"], ["r"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, 6, 6])], [conv_w, bias],
    )
    model, _ = run_passes(proto, "fold-conv-bias")
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    folded = ir.serde.serialize_model(model)
    assert [o.name for o in folded.graph.output] == ["y", "r"]
    batch = {"x": rng.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)}
    session, reference = ort.InferenceSession(folded.SerializeToString()), ort.InferenceSession(proto.SerializeToString())
    for got, want in zip(session.run(None, batch), reference.run(None, batch)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fold_conv_bias_leaves_adds_it_cannot_fold():
    """A bias that varies along a spatial axis, or a Conv output read twice, stays an Add."""
    rng = np.random.default_rng(1)
    conv_w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32), "cw")
    spatial = numpy_helper.from_array(rng.normal(0, 1, (1, 4, 6, 1)).astype(np.float32), "sb")
    channel = numpy_helper.from_array(rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32), "chb")
    proto = make_model(
        [helper.make_node("Conv", ["x", "cw"], ["c"]), helper.make_node("Add", ["c", "sb"], ["y"]),
         helper.make_node("Conv", ["x", "cw"], ["d"]), helper.make_node("Add", ["d", "chb"], ["z"]),
         helper.make_node("Mul", ["d", "z"], ["w"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 4, 6, 6])], [conv_w, spatial, channel],
    )
    model, _ = run_passes(proto, "fold-conv-bias")
    assert [n.op_type for n in model.graph].count("Add") == 2


def test_fold_batchnorm_folds_small_parameters_held_in_constant_nodes():
    """PP-OCR's direction classifier kept six 8-channel BatchNorms float: lift-constants leaves
    tensors under 16 elements as Constant nodes, which the folding rules did not read."""
    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "cw")
    params = [rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.1, 4), rng.normal(0, 0.1, 4), rng.uniform(0.5, 1.5, 4)]
    constants = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name + "_v"))
                 for name, value in zip(["s", "b", "m", "v"], params)]
    proto = make_model(
        [*constants, helper.make_node("Constant", [], ["cb"], value=numpy_helper.from_array(np.zeros(4, np.float32), "cb_v")),
         helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [conv_w],
    )
    model, _ = run_passes(proto, ["lift-constants", "fold-batchnorm"])
    assert [n.op_type for n in model.graph] == ["Conv"]
    batch = {"x": rng.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(_run(ir.serde.serialize_model(model), batch), _run(proto, batch), rtol=1e-4, atol=1e-5)


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


def _shared_weight_chain(steps: int = 6, hidden: int = 64) -> "onnx.ModelProto":  # noqa: F821  (onnx is not imported here)
    """An unrolled recurrence: every step reads ``Transpose(W)`` of the same W (as an exported GRU
    does), which constant folding turns into one copy per step."""
    rng = np.random.default_rng(0)
    nodes, previous = [], "x"
    for step in range(steps):
        nodes += [helper.make_node("Transpose", ["W"], [f"wt{step}"], perm=[1, 0]),
                  helper.make_node("MatMul", [previous, f"wt{step}"], [f"m{step}"]),
                  helper.make_node("Tanh", [f"m{step}"], [f"h{step}"])]
        previous = f"h{step}"
    weight = numpy_helper.from_array(rng.normal(0, hidden ** -0.5, (hidden, hidden)).astype(np.float32), "W")
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden])],
                      [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", hidden])], [weight])


def test_deduplicate_initializers_merges_the_copies_folding_made():
    model, _ = run_passes(_shared_weight_chain(), "fold-constants,remove-unused")
    assert len(model.graph.initializers) == 6  # folding: one transposed copy per reader
    model, _ = run_passes(_shared_weight_chain(), "fold-constants,deduplicate-initializers,remove-unused")
    (weight,) = model.graph.initializers.values()
    assert sum(1 for node in model.graph if weight in node.inputs) == 6


def test_deduplicate_initializers_keeps_different_tensors_and_graph_outputs():
    same = np.ones((3, 3), np.float32)
    proto = make_model(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Add", ["s", "c"], ["t"]),
         helper.make_node("Add", ["t", "d"], ["y"])],
        [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])],
        [numpy_helper.from_array(same, "a"), numpy_helper.from_array(same.copy(), "b"),
         numpy_helper.from_array(same * 2, "c"), numpy_helper.from_array(same.copy(), "d")],
    )
    model, _ = run_passes(proto, "deduplicate-initializers")
    # a, b and d are equal: one remains of them; c differs.
    assert sorted(model.graph.initializers) == ["a", "c"]
    assert [n.inputs[0].name for n in model.graph][0] == "a"


def test_deduplicate_initializers_merges_equal_constant_nodes():
    # PP-LCNet's classifier: a Clip(x + 3, 0, 6) / 6 per hard-swish, each bound its own Constant.
    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32)))
    nodes = [const("lo1", 0.0), const("hi1", 6.0), const("lo2", 0.0), const("hi2", 6.0), const("other", 3.0),
             helper.make_node("Clip", ["x", "lo1", "hi1"], ["c1"]), helper.make_node("Add", ["c1", "other"], ["a"]),
             helper.make_node("Clip", ["a", "lo2", "hi2"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [])
    model, _ = run_passes(proto, "deduplicate-initializers")
    assert sorted(n.outputs[0].name for n in model.graph if n.op_type == "Constant") == ["hi1", "lo1", "other"]
    second_clip = [n for n in model.graph if n.op_type == "Clip"][1]
    assert [v.name for v in second_clip.inputs] == ["a", "lo1", "hi1"]
    x = np.array([-9.0, -1.0, 2.0, 8.0], np.float32)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.clip(np.clip(x, 0, 6) + 3, 0, 6))


def test_a_shared_weight_is_quantized_once_and_the_output_is_smaller(tmp_path):
    import qcompile

    proto = _shared_weight_chain()
    rng = np.random.default_rng(1)
    data = [{"x": rng.normal(0, 1, (4, 64)).astype(np.float32)} for _ in range(4)]
    result = qcompile.compile(proto, data, config={"measure_latency": False})
    result.save(tmp_path / "q.onnx")
    compiled = result.to_proto()
    weights = [i for i in compiled.graph.initializer if len(i.dims) == 2]
    assert len(weights) == 1 and weights[0].data_type == TensorProto.INT8
    assert (tmp_path / "q.onnx").stat().st_size < proto.ByteSize()


_lstm_model = tiny_lstm


def test_lstm_weights_are_quantized_with_the_integer_lstm_kernel(tmp_path):
    """A CRNN's LSTM kept its float weights (48.7% of the file): on the CPU target it becomes
    ORT's DynamicQuantizeLSTM with int8 W and R, and computes the same to within int8 rounding."""
    import qcompile

    proto = _lstm_model()
    rng = np.random.default_rng(1)
    data = [{"x": rng.normal(0, 1, (12, 2, 8)).astype(np.float32)} for _ in range(4)]
    result = qcompile.compile(proto, data, config={"measure_latency": False})
    compiled = result.to_proto()
    ops = {n.op_type for n in compiled.graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    stored = {i.name: i for i in compiled.graph.initializer}
    assert stored["W_q"].data_type == TensorProto.INT8 and list(stored["W_q"].dims) == [2, 8, 64]
    assert "W" not in stored and "R" not in stored
    want = ort.InferenceSession(proto.SerializeToString()).run(None, data[0])
    got = ort.InferenceSession(compiled.SerializeToString()).run(None, data[0])
    for a, b in zip(want, got):
        assert 10 * np.log10(np.sum(a ** 2) / np.sum((a - b) ** 2)) > 30.0

    kept, _ = run_passes(proto, "dynamic-quantize-lstm", exclude_op_types=["LSTM"])
    assert [n.op_type for n in kept.graph] == ["LSTM"]


def test_compiled_file_carries_no_value_info_and_still_runs(tmp_path):
    """PP-OCR's direction classifier carried 50 KB of value_info (16% of its INT8 file): the types
    of intermediates and a second copy of every initializer's, all of which ONNX Runtime infers."""
    import onnx

    import qcompile

    proto = onnx.shape_inference.infer_shapes(tiny_cnn())
    assert proto.graph.value_info
    result = qcompile.compile(proto, cnn_batches(4), config={"measure_latency": False})
    result.save(tmp_path / "q.onnx")
    compiled = onnx.load(tmp_path / "q.onnx")
    assert not compiled.graph.value_info
    assert [o.name for o in compiled.graph.output] == [o.name for o in proto.graph.output]
    assert compiled.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    batch = cnn_batches(1)[0]
    quantized = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, batch)[0]
    assert quantized.shape == _run(proto, batch).shape
    assert any(n.op_type == "QuantizeLinear" for n in compiled.graph.node)
