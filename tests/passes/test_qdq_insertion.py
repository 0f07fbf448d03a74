"""The QDQ rewrite: graph structure, stored integer types, bias formula, names kept."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_passes
from tiny_models import cnn_batches, tiny_cnn, tiny_transformer, transformer_batches

from qcompile.errors import PipelineError

CPU = "fix-names,shape-inference,fold-batchnorm,remove-unused,plan-quantization,calibrate,insert-qdq,remove-unused"


def _initializer(model, name):
    return model.graph.initializers[name].const_value.numpy()


def test_weights_become_int8_per_channel_and_float_weights_are_gone():
    model, _ = run_passes(tiny_cnn(), CPU, data=cnn_batches(4))
    w2 = _initializer(model, "w2_q")
    assert w2.dtype == np.int8 and w2.shape == (8, 8, 3, 3)
    assert _initializer(model, "w2_scale").shape == (8,)
    assert "w2" not in model.graph.initializers  # the float copy no longer ships
    dq = next(n for n in model.graph if n.outputs[0].name == "w2_dq")
    assert dq.attributes["axis"].value == 0


@pytest.fixture
def int32_biases_on_cpu(monkeypatch):
    """The cpu target as it was before it stored Conv/Gemm biases as float on the int32 grid."""
    import dataclasses

    from qcompile import backends

    cpu = backends.get_target("cpu")
    monkeypatch.setitem(backends._TARGETS, "cpu", dataclasses.replace(cpu, float_grid_bias_ops=frozenset()))


def test_bias_is_int32_with_input_scale_times_weight_scale(int32_biases_on_cpu):
    model, context = run_passes(tiny_cnn(), CPU, data=cnn_batches(4))
    plan = context.analyses.plan
    bias = _initializer(model, "b2_q")
    assert bias.dtype == np.int32
    expected_scale = np.float32(plan.activations["r1"].scale) * _initializer(model, "w2_scale")
    np.testing.assert_allclose(_initializer(model, "b2_scale"), expected_scale, rtol=1e-6)
    original = onnx.numpy_helper.to_array(next(i for i in tiny_cnn().graph.initializer if i.name == "b2"))
    np.testing.assert_allclose(bias * expected_scale, original, atol=float(expected_scale.max()) / 2 + 1e-7)
    # Its zero point is 0, DequantizeLinear's default: not stored (4 bytes a channel; the QLinearConv
    # fusion still happens: test_end_to_end's fusion counts).
    bias_dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == "b2_q")
    assert len(bias_dq.inputs) == 2 and "b2_zp" not in model.graph.initializers


def test_cpu_conv_bias_is_float_on_the_int32_grid_and_runs_as_the_int32_form(int32_biases_on_cpu):
    """On the cpu target a Conv's bias is stored as the float values of its int32 grid, which ORT
    quantizes back to the same codes when it fuses QLinearConv: outputs bit-identical to the
    int32 DequantizeLinear form, without the codes' scales and the DequantizeLinear."""
    from qcompile import backends

    int32_model, _ = run_passes(tiny_cnn(), CPU, data=cnn_batches(4))
    backends._TARGETS["cpu"] = dataclasses.replace(backends.get_target("cpu"), float_grid_bias_ops=frozenset({"Conv", "Gemm"}))
    model, context = run_passes(tiny_cnn(), CPU, data=cnn_batches(4))
    conv2 = next(n for n in model.graph if n.name == "conv2")
    # Only conv2 reads b2: the rounded copy keeps its name and the float values are gone.
    assert conv2.inputs[2].name == "b2" and conv2.inputs[2].const_value.dtype == ir.DataType.FLOAT
    codes, scale = _initializer(int32_model, "b2_q"), _initializer(int32_model, "b2_scale")
    np.testing.assert_array_equal(_initializer(model, "b2"), codes.astype(np.float32) * scale)  # what the DQ computes
    convs = {n.name for n in model.graph if n.op_type == "Conv"}
    assert {b.node for b in context.analyses.plan.biases if b.stored_float} == convs
    # The classifier's Gemm has a float output: ORT fuses it into QGemm only with an int32 bias.
    int32_readers = {u.node.op_type for n in model.graph if n.op_type == "DequantizeLinear"
                     and n.inputs[0].dtype == ir.DataType.INT32 for u in n.outputs[0].uses()}
    assert int32_readers == {"Gemm"}
    feed = cnn_batches(1)[0]
    run = [ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
           for m in (int32_model, model)]
    for int32_out, float_out in zip(*run):
        np.testing.assert_array_equal(int32_out, float_out)


def test_conv_weights_store_no_zero_points_and_gemm_weights_keep_theirs():
    """ORT fuses a Conv whose weight DequantizeLinear has no zero point (ONNX's default 0) into
    QLinearConv, but a Gemm only with one into QGemm: the cpu target stores the all-zero zero points
    of its Conv weights no more (test_end_to_end checks every anchor still becomes a kernel)."""
    model, _ = run_passes(tiny_cnn(), CPU, data=cnn_batches(4))
    inputs_by_reader = {}
    for dq in model.graph:
        if dq.op_type == "DequantizeLinear" and dq.inputs[0].dtype == ir.DataType.INT8:
            for use in dq.outputs[0].uses():
                inputs_by_reader.setdefault(use.node.op_type, set()).add(len(dq.inputs))
    assert inputs_by_reader == {"Conv": {2}, "Gemm": {3}} and "w2_zp" not in model.graph.initializers


def test_each_activation_gets_one_qdq_pair_read_by_all_consumers():
    model, _ = run_passes(tiny_cnn(), CPU, data=cnn_batches(4))
    # r1 feeds conv2 and the residual Add: both read the same DequantizeLinear.
    dq_out = next(n for n in model.graph if n.outputs[0].name == "r1_dq").outputs[0]
    assert {u.node.name for u in dq_out.uses()} == {"conv2", "residual_add"}
    assert sum(1 for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "r1") == 1


def test_equal_activation_zero_points_share_one_initializer_and_q_dq_nodes_are_counted():
    """Names cost bytes in every reference (a 0.6 MB classifier's Q/DQ names were 8 % of its int8
    file): one scalar per zero point value, short counted node names, values named after the tensor."""
    model, _ = run_passes(tiny_cnn(), CPU, data=cnn_batches(4))
    pairs = [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.inputs) == 3
             and n.inputs[2].const_value.numpy().ndim == 0]
    zero_points = {n.inputs[2] for n in pairs}
    values = {(v.dtype, int(v.const_value.numpy())) for v in zero_points}
    assert len(zero_points) == len(values)  # one initializer per distinct value
    assert len(pairs) > 2 * len(zero_points)  # the Relu outputs' zero point 0, read by each
    for v in zero_points:
        assert v.name == f"zp_u8_{int(v.const_value.numpy())}"
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    assert q.name.startswith("Q") and q.outputs[0].name == q.inputs[0].name + "_q"
    assert len({n.name for n in model.graph}) == len(list(model.graph))  # still unique
    feed = cnn_batches(1)[0]
    ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feed)


def test_activation_types_are_what_the_config_asks():
    model, _ = run_passes(tiny_cnn(), CPU + ",upgrade-opset", data=cnn_batches(4), activation_type="uint16")
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "r1")
    assert q.inputs[2].const_value.numpy().dtype == np.uint16


def test_graph_names_are_kept_and_model_is_valid():
    model, _ = run_passes(tiny_transformer(), CPU, data=transformer_batches(4))
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["x", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["y"]
    out = ort.InferenceSession(proto.SerializeToString()).run(None, transformer_batches(1)[0])[0]
    assert np.isfinite(out).all()


def test_insert_qdq_without_calibration_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="calibrate"):
        run_passes(tiny_cnn(), "fix-names,plan-quantization,insert-qdq")


def test_float_readers_of_a_float_producer_keep_the_exact_value():
    """LayerNorm (float) feeds a quantized MatMul and a float residual Add: only the MatMul reads
    the rounded value; the residual connection and the graph output do not lose precision."""
    from onnx import TensorProto, helper
    from tiny_models import _init, make_model

    rng = np.random.default_rng(0)
    proto = make_model(
        [
            helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
            helper.make_node("MatMul", ["h", "w"], ["m"], name="mm"),
            helper.make_node("Add", ["h", "m"], ["y"], name="residual"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 16])],
        [_init("gamma", np.ones(16, np.float32)), _init("beta", np.zeros(16, np.float32)),
         _init("w", rng.normal(0, 0.2, (16, 16)).astype(np.float32))],
    )
    data = [{"x": rng.normal(0, 1, (4, 16)).astype(np.float32)} for _ in range(4)]
    model, _ = run_passes(proto, CPU, data=data)
    nodes = {n.name: n for n in model.graph}
    assert nodes["mm"].inputs[0].producer().op_type == "DequantizeLinear"
    assert nodes["residual"].inputs[0].producer() is nodes["ln"]
    assert model.graph.outputs[1].producer() is nodes["ln"]


def test_embedding_read_by_a_matmul_is_quantized_after_its_row_lookup():
    """Gather(table) -> MatMul: the table becomes int8 rows (Gather, Cast, Mul) and the lookup's
    output, which the MatMul reads as an activation, gets its Q/DQ after the new Mul."""
    from tiny_models import tiny_lm

    rng = np.random.default_rng(0)
    data = [{"ids": rng.integers(0, 100, (2, 8)).astype(np.int64)} for _ in range(4)]
    model, _ = run_passes(tiny_lm(), "fix-names,shape-inference,fold-constants," + CPU, data=data)
    nodes = {n.name: n for n in model.graph}
    assert "embed" not in nodes  # replaced by the row lookup
    h_quantize = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "h")
    assert h_quantize.inputs[0].producer().op_type == "Mul"
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    ort.InferenceSession(proto.SerializeToString()).run(None, data[0])
    # No integer kernel multiplies a looked-up row: the table keeps all of int8's range, not the
    # cpu target's int7 weight grid (which only guards u8s8 kernels against saturation).
    lookup = nodes.get("embed") or next(n for n in model.graph if n.op_type == "Gather")
    table = lookup.inputs[0].const_value.numpy()
    assert table.dtype == np.int8 and np.abs(table).max() == 127


def test_a_bias_beside_near_zero_weights_raises_the_weight_scale_instead_of_saturating():
    """A pruned channel (weights 0 or 1e-9) with a bias of 3: its int32 bias at scale
    x_scale * 1e-12 would saturate and the channel would output ~0 instead of 3."""
    from onnx import TensorProto, helper, numpy_helper
    from tiny_models import make_model

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    weight[1] = 0.0
    weight[2] = 1e-9
    bias = np.array([0.1, 3.0, -2.0, 0.0], np.float32)
    proto = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    data = [{"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    model, context = run_passes(proto, CPU, data=data)
    out = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, data[0])[0]
    np.testing.assert_allclose(out[:, 1], 3.0, atol=0.01)
    np.testing.assert_allclose(out[:, 2], -2.0, atol=0.01)
    x_scale = context.analyses.plan.activations["x"].scale
    codes = _initializer(model, "b").astype(np.float64) / (x_scale * _initializer(model, "w_scale").astype(np.float64))
    assert np.abs(codes).max() < 2**31 - 1  # nothing clipped at the int32 limit


def test_one_weight_read_along_two_channel_axes_gets_each_axis_its_own_bias_floor():
    """A 2000-example fuzz run: one [4, 16] weight read by a Gemm with transB=1 (16 -> 4, channels
    on axis 0) and one with transB=0 (4 -> 16, axis 1), the first with a bias; the bias floor was
    keyed by the weight's name alone and a (4,) floor met the (16,) scales: a broadcast error."""
    from onnx import TensorProto, helper, numpy_helper
    from tiny_models import make_model

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.3, (4, 16)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="down", transB=1),
         helper.make_node("Gemm", ["h", "w"], ["y"], name="up")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.normal(0, 1, 4).astype(np.float32), "b")],
    )
    data = [{"x": rng.normal(0, 1, (8, 16)).astype(np.float32)} for _ in range(4)]
    model, _ = run_passes(proto, CPU, data=data)
    proto_q = ir.serde.serialize_model(model)
    want = ort.InferenceSession(proto.SerializeToString()).run(None, data[0])[0]
    got = ort.InferenceSession(proto_q.SerializeToString()).run(None, data[0])[0]
    assert 10 * np.log10(np.sum(want ** 2) / np.sum((want - got) ** 2)) > 25.0


def test_nodes_without_names_from_the_opset_upgrade_are_rewritten():
    """PP-OCRv4's recognizer (opset 12): upgrading Softmax to opset 13 writes Shape/Flatten/Reshape
    nodes with no name after fix-names, and insert-qdq, which looked values up through nodes keyed
    by name, lost all but one of them: "planned tensor 'softmax_9.tmp_0' is not in the graph"."""
    from onnx import TensorProto, helper, numpy_helper

    import qcompile

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["scores"], name="mm1"),
             helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=1),
             helper.make_node("MatMul", ["probs", "w2"], ["h"], name="mm2"),
             helper.make_node("Softmax", ["h"], ["probs2"], name="softmax2", axis=1),
             helper.make_node("MatMul", ["probs2", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(
        nodes, "softmax12", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])],
        [numpy_helper.from_array(rng.normal(0, 1, (8, 8)).astype(np.float32), n) for n in ("w1", "w2", "w3")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    proto.ir_version = 7
    data = [{"x": rng.normal(0, 1, (2, 4, 8)).astype(np.float32)} for _ in range(4)]
    result = qcompile.compile(proto, data, config={"measure_latency": False})
    unnamed = [n.op_type for n in result.to_proto().graph.node if not n.name]
    assert len(unnamed) >= 2, unnamed  # the upgrade's Flatten/Reshape (axis 1 of a 3-D softmax)
    assert result.report.plan["quantized_nodes"] >= 3
    assert result.report.evaluation["outputs"]["y"]["sqnr_db"] > 20.0
