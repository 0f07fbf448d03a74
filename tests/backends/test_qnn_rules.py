"""The qnn-htp rule table read by the planner: fixed encodings, constant formats, shared parameters,
whole-graph quantization, and the preparation it needs (static shapes, Gelu). No provider needed."""

import numpy as np
import onnx_ir as ir
import pytest
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import make_model, tiny_cnn, tiny_transformer, transformer_batches

from qcompile.errors import ConfigError
from qcompile.numerics.qparams import QUANT_TYPES, constant_qparams

PREP = "fix-names,shape-inference,upgrade-opset(min_opset=21),fuse-gelu,shape-inference"
QNN = PREP + ",plan-quantization,calibrate(chunk=0),insert-qdq"


def _init(model, name):
    return model.graph.initializers[name].const_value.numpy()


def _q_params(model, tensor):
    """(scale, zero point) of the QuantizeLinear that reads ``tensor``."""
    node = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == tensor)
    return float(node.inputs[1].const_value.numpy()), int(node.inputs[2].const_value.numpy())


def _softmax_model():
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "w")
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["scores"], name="mm"),
         helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
         helper.make_node("MatMul", ["probs", "w"], ["y"], name="mm2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w], opset=21,
    )


def _data(shape, count=3, seed=0, **extra):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=shape).astype(np.float32), **extra} for _ in range(count)]


@pytest.mark.parametrize("activation_type, expected", [("uint8", (1 / 256, 0)), ("uint16", (1 / 65536, 0))])
def test_softmax_output_has_the_fixed_encoding_whatever_calibration_says(activation_type, expected):
    model, context = run_passes(_softmax_model(), QNN, data=_data((2, 8)), target="qnn-htp",
                                activation_type=activation_type)
    plan = context.analyses.plan
    assert plan.activations["probs"].fixed is not None
    assert _q_params(model, "probs") == pytest.approx(expected)
    # The calibrated tensors around it keep their own parameters.
    assert _q_params(model, "scores")[0] != pytest.approx(expected[0])


def test_cpu_target_calibrates_softmax_output():
    """The CPU rules name no Softmax encoding: nothing changes there."""
    _, context = run_passes(_softmax_model(), PREP + ",plan-quantization", target="cpu")
    assert all(q.fixed is None for q in context.analyses.plan.activations.values())


@pytest.mark.parametrize("activation_type, gamma_type", [("uint8", np.uint8), ("uint16", np.uint8), ("int8", np.int8)])
def test_layernorm_scale_is_8_bit_with_the_activation_signedness_and_bias_int32(activation_type, gamma_type):
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    beta = rng.normal(0, 0.1, 8).astype(np.float32)
    proto = make_model(
        [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln", axis=-1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")], opset=21,
    )
    model, _ = run_passes(proto, QNN, data=_data((2, 8)), target="qnn-htp", activation_type=activation_type)
    q_gamma, gamma_scale = _init(model, "gamma_q"), _init(model, "gamma_scale")
    assert q_gamma.dtype == gamma_type and gamma_scale.shape == ()  # one scale, not per channel
    # Independently: asymmetric over [min(0, gamma), max(gamma)] onto the 8-bit range.
    qtype = QUANT_TYPES["int8" if gamma_type is np.int8 else "uint8"]
    assert float(gamma_scale) == pytest.approx(gamma.max() / (qtype.qmax - qtype.qmin), rel=1e-6)
    q_beta, beta_scale = _init(model, "beta_q"), _init(model, "beta_scale")
    x_scale, _ = _q_params(model, "x")
    assert q_beta.dtype == np.int32 and beta_scale.shape == ()
    assert float(beta_scale) == pytest.approx(x_scale * float(gamma_scale), rel=1e-6)


def test_gather_from_a_constant_table_keeps_the_table_parameters():
    """A lookup is data movement: its output must have exactly the stored table's scale and zero point."""
    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    proto = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("MatMul", ["emb", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])],
        [numpy_helper.from_array(table, "table"), w], opset=21,
    )
    data = [{"ids": np.arange(10, dtype=np.int64).reshape(2, 5)}]
    model, context = run_passes(proto, QNN, data=data, target="qnn-htp")
    assert _init(model, "table_q").dtype == np.uint8
    table_params = (float(_init(model, "table_scale")), int(_init(model, "table_zp")))
    assert _q_params(model, "emb") == pytest.approx(table_params)
    scale, zero_point = constant_qparams(table, None, QUANT_TYPES["uint8"], symmetric=False)
    assert table_params == pytest.approx((float(scale[0]), int(zero_point[0])))


def test_data_movement_shares_its_input_parameters():
    model, context = run_passes(tiny_cnn(), "fix-shapes," + QNN, data=_data((2, 3, 16, 16)), target="qnn-htp")
    plan = context.analyses.plan
    assert plan.activations["p"].shares == "r3"  # MaxPool
    assert _q_params(model, "p") == _q_params(model, "r3")


def test_whole_graph_is_quantized_including_constant_operands():
    """qnn-htp quantizes the bias Adds and the score scaling (constant operands stored as uint8);
    the CPU target leaves them float (no integer kernel would gain)."""
    _, qnn = run_passes(tiny_transformer(), "fix-shapes," + PREP + ",plan-quantization",
                        data=transformer_batches(1), target="qnn-htp")
    _, cpu = run_passes(tiny_transformer(), PREP + ",plan-quantization", target="cpu")
    for name in ("q_bias", "scale_scores", "ln1", "q_reshape"):
        assert name in qnn.analyses.plan.nodes and name not in cpu.analyses.plan.nodes
    assert "Gelu" in qnn.analyses.plan.nodes.values()
    constants = {(w.node, w.input_index): w for w in qnn.analyses.plan.weights}
    assert constants[("q_bias", 1)].qtype.name == "uint8" and not constants[("q_bias", 1)].symmetric
    assert constants[("q_matmul", 1)].qtype.name == "int8" and constants[("q_matmul", 1)].axis == 1


def test_gemm_output_is_requantized_on_qnn_but_optional_on_cpu():
    _, qnn = run_passes(tiny_cnn(), "fix-shapes," + PREP + ",plan-quantization", data=_data((2, 3, 16, 16)),
                        target="qnn-htp")
    _, cpu = run_passes(tiny_cnn(), PREP + ",plan-quantization", target="cpu")
    assert "logits" in qnn.analyses.plan.activations
    assert "logits" not in cpu.analyses.plan.activations


def test_fix_shapes_from_first_calibration_batch_and_records_it():
    model, context = run_passes(tiny_transformer(), "fix-shapes,shape-inference", data=transformer_batches(2, batch=3, seq=5))
    shapes = {v.name: list(v.shape) for v in model.graph.inputs}
    assert shapes == {"x": [3, 5, 32], "attention_mask": [3, 5]}
    record = context.records["fix-shapes"]
    assert record["source"] == "the first calibration batch"
    assert record["inputs"]["x"] == {"from": ["N", "S", 32], "to": [3, 5, 32]}
    # Symbolic dimensions inside the graph are resolved too.
    assert all(isinstance(d, int) for n in model.graph for o in n.outputs if o.shape for d in o.shape)


def test_fix_shapes_from_config_and_its_errors():
    model, context = run_passes(tiny_cnn(), "fix-shapes", input_shapes={"x": [1, 3, 16, 16]})
    assert list(model.graph.inputs[0].shape) == [1, 3, 16, 16]
    assert context.records["fix-shapes"]["source"] == "input_shapes in the config"
    with pytest.raises(ConfigError, match="does not have as inputs"):
        run_passes(tiny_cnn(), "fix-shapes", input_shapes={"image": [1, 3, 16, 16]})
    with pytest.raises(ConfigError, match="rank"):
        run_passes(tiny_cnn(), "fix-shapes", input_shapes={"x": [1, 3, 16]})
    with pytest.raises(ConfigError, match="axis 2"):
        run_passes(tiny_cnn(), "fix-shapes", input_shapes={"x": [1, 3, 32, 16]})
    with pytest.raises(ConfigError, match="--shape x="):
        run_passes(tiny_cnn(), "fix-shapes")  # no data, no shapes


def test_fix_shapes_leaves_a_static_model_unchanged():
    proto = tiny_cnn(batch=2)
    model, context = run_passes(proto, "fix-shapes", data=_data((2, 3, 16, 16)))
    assert "fix-shapes" not in context.records


def _erf_gelu_model(mul_form: bool):
    nodes = [
        helper.make_node("Erf", ["scaled"], ["erf"], name="erf"),
        helper.make_node("Add", ["erf", "one"], ["erf1"], name="add_one"),
    ]
    if mul_form:
        nodes.insert(0, helper.make_node("Mul", ["x", "inv_sqrt2"], ["scaled"], name="div"))
        nodes += [helper.make_node("Mul", ["erf1", "half"], ["h"], name="half_mul"),
                  helper.make_node("Mul", ["x", "h"], ["y"], name="x_mul")]
    else:
        nodes.insert(0, helper.make_node("Div", ["x", "sqrt2"], ["scaled"], name="div"))
        nodes += [helper.make_node("Mul", ["x", "erf1"], ["h"], name="x_mul"),
                  helper.make_node("Mul", ["h", "half"], ["y"], name="half_mul")]
    consts = {"sqrt2": np.sqrt(2.0), "inv_sqrt2": 1 / np.sqrt(2.0), "one": 1.0, "half": 0.5}
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()], opset=20,
    )


@pytest.mark.parametrize("mul_form", [False, True])
def test_fuse_gelu_rewrites_erf_gelu_into_the_onnx_op(mul_form):
    import onnxruntime as ort

    proto = _erf_gelu_model(mul_form)
    model, context = run_passes(proto, "fuse-gelu,remove-unused")
    assert [n.op_type for n in model.graph] == ["Gelu"] and model.graph.node(0).domain == ""
    assert context.records["fuse-gelu"] == {"fused_gelu_nodes": 1}
    x = {"x": np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)}
    before = ort.InferenceSession(proto.SerializeToString()).run(None, x)[0]
    after = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, x)[0]
    np.testing.assert_allclose(after, before, atol=1e-6)


def test_fuse_gelu_turns_contrib_gelu_into_the_onnx_op_and_needs_opset_20():
    model, _ = run_passes(tiny_transformer(), "upgrade-opset(min_opset=21),fuse-gelu")
    gelu = next(n for n in model.graph if n.op_type == "Gelu")
    assert gelu.domain == "" and gelu.name
    from qcompile.errors import PipelineError

    with pytest.raises(PipelineError, match="upgrade-opset"):
        run_passes(tiny_transformer(), "fuse-gelu")


def test_asymmetric_constant_qparams_match_the_activation_formula():
    w = np.array([-0.5, 0.25, 1.5], np.float32)
    scale, zero_point = constant_qparams(w, None, QUANT_TYPES["uint8"], symmetric=False)
    assert scale[0] == pytest.approx(2.0 / 255) and zero_point[0] == round(0.5 / (2.0 / 255))
    with pytest.raises(ConfigError):
        constant_qparams(np.ones((2, 2), np.float32), 0, QUANT_TYPES["uint8"], symmetric=False)


def _q_type(model, tensor):
    node = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == tensor)
    return node.outputs[0].dtype


def test_activation_type_overrides_make_only_the_matching_tensors_16_bit():
    model, context = run_passes(_softmax_model(), QNN, data=_data((2, 8)), target="qnn-htp",
                                activation_type_overrides={"^scores$": "uint16"})
    assert _q_type(model, "scores") == ir.DataType.UINT16
    assert _q_type(model, "x") == _q_type(model, "probs") == ir.DataType.UINT8
    # The Softmax output keeps the fixed encoding of its own (uint8) type.
    assert _q_params(model, "probs") == pytest.approx((1 / 256, 0))
    with pytest.raises(ConfigError, match="activation_type_overrides"):
        run_passes(_softmax_model(), QNN, data=_data((2, 8)), target="qnn-htp",
                   activation_type_overrides={"scores": "int16"})  # not a qnn-htp activation type
    with pytest.raises(ConfigError, match="not a known type"):
        run_passes(_softmax_model(), QNN, target="qnn-htp", activation_type_overrides={"scores": "uint12"})


def test_mask_and_softmax_input_are_quantized_16_bit_in_a_uint8_model():
    """After clamp-mask-fill the mask is quantizable; the target's mask type keeps its fill and
    the scores beside it apart (uint16), while the rest stays uint8."""
    model, context = run_passes(tiny_transformer(), "fix-shapes,clamp-mask-fill," + QNN,
                                data=transformer_batches(2), target="qnn-htp")
    plan = context.analyses.plan
    assert {"add_mask", "softmax", "mask_scale"} <= set(plan.nodes)
    assert _q_type(model, "masked") == _q_type(model, "mask_bias") == ir.DataType.UINT16
    assert _q_type(model, "scaled") == _q_type(model, "probs") == ir.DataType.UINT8
    # A uint16 run is already wide enough: nothing differs.
    model, _ = run_passes(tiny_transformer(), "fix-shapes,clamp-mask-fill," + QNN,
                          data=transformer_batches(2), target="qnn-htp", activation_type="uint16")
    assert _q_type(model, "scaled") == _q_type(model, "masked") == ir.DataType.UINT16
