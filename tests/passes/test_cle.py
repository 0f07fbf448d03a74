"""cross-layer-equalization: the float function is kept, per-channel ranges are equalized across
Conv -> Relu -> depthwise Conv -> Relu -> pointwise Conv chains, and a badly scaled depthwise CNN
quantizes far better after it."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import TensorProto, helper
from tiny_models import _init, make_model

import qcompile
from qcompile.errors import PipelineError

C = 8


def _depthwise_cnn(scaled: bool = True, between: str = "Relu", **attributes):
    """conv1 (3 -> 8) -> Relu -> depthwise (8, group 8) -> ``between`` -> pointwise (8 -> 8) -> Relu
    -> GAP -> Flatten -> Gemm. With ``scaled``, depthwise output channel i is multiplied by
    10^U(-2, 2) and the pointwise conv's input channel i divided by it: the same function, with
    channels four orders of magnitude apart (MobileNet after BatchNorm folding)."""
    rng = np.random.default_rng(0)
    w_dw = rng.normal(0, 0.5, (C, 1, 3, 3)).astype(np.float32)
    b_dw = rng.normal(0, 0.1, C).astype(np.float32)
    w_pw = rng.normal(0, 0.4, (C, C, 1, 1)).astype(np.float32)
    if scaled:
        factor = (10.0 ** rng.uniform(-2, 2, C)).astype(np.float32)
        w_dw, b_dw = w_dw * factor[:, None, None, None], b_dw * factor
        w_pw = w_pw / factor[None, :, None, None]
    inits = [
        _init("w1", rng.normal(0, 0.4, (C, 3, 3, 3)).astype(np.float32)), _init("b1", rng.normal(0, 0.1, C).astype(np.float32)),
        _init("w_dw", w_dw), _init("b_dw", b_dw), _init("w_pw", w_pw), _init("b_pw", rng.normal(0, 0.1, C).astype(np.float32)),
        _init("fc_w", rng.normal(0, 0.4, (10, C)).astype(np.float32)), _init("fc_b", np.zeros(10, np.float32)),
    ]
    activation = (
        helper.make_node("Clip", ["d", "lo", "hi"], ["a2"], name="act2") if between == "Clip"
        else helper.make_node(between, ["d"], ["a2"], name="act2", **attributes)
    )
    if between == "Clip":
        inits += [_init("lo", np.array(0.0, np.float32)), _init("hi", np.array(6.0, np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "w_dw", "b_dw"], ["d"], name="depthwise", pads=[1, 1, 1, 1], group=C),
        activation,
        helper.make_node("Conv", ["a2", "w_pw", "b_pw"], ["p"], name="pointwise"),
        helper.make_node("Relu", ["p"], ["a3"], name="act3"),
        helper.make_node("GlobalAveragePool", ["a3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits,
    )


def _batches(count, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, (8, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def _run(model, batch):
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]


def _weight(model, node_name):
    return next(n for n in model.graph if n.name == node_name).inputs[1].const_value.numpy()


def test_keeps_the_float_function_and_equalizes_every_pair():
    proto = _depthwise_cnn()
    model, context = run_passes(proto, ["cross-layer-equalization"])
    pairs = context.records["cross-layer-equalization"]["pairs"]
    assert set(pairs) == {"conv1 -> depthwise", "depthwise -> pointwise"}
    assert pairs["depthwise -> pointwise"]["range_spread_before"] > 100
    # Both ranges of every joining channel are now sqrt(r1 * r2): equal (to the iteration's tolerance).
    w1, w_dw, w_pw = (_weight(model, name) for name in ("conv1", "depthwise", "pointwise"))
    np.testing.assert_allclose(np.abs(w1).max(axis=(1, 2, 3)), np.abs(w_dw).max(axis=(1, 2, 3)), rtol=5e-3)
    np.testing.assert_allclose(np.abs(w_dw).max(axis=(1, 2, 3)), np.abs(w_pw).max(axis=(0, 2, 3)), rtol=5e-3)
    for batch in _batches(2, seed=5):
        expected = _run(proto, batch)
        np.testing.assert_allclose(_run(model, batch), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_raises_int8_accuracy_on_a_badly_scaled_depthwise_cnn():
    calibration, evaluation = _batches(8, seed=1), _batches(4, seed=2)
    proto = _depthwise_cnn()
    reference = np.concatenate([_run(proto, b) for b in evaluation])

    def sqnr(switch: bool) -> float:
        config = {"measure_latency": False, "cross_layer_equalization": switch}
        compiled = qcompile.compile(proto, calibration, config=config, eval_data=evaluation).to_proto()
        output = np.concatenate([_run(compiled, b) for b in evaluation])
        return 10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - output).astype(np.float64) ** 2))

    plain, equalized = sqnr(False), sqnr(True)
    # Measured: 7.9 dB plain, 47.6 dB equalized (without it the small channels round to zero).
    assert equalized > plain + 30.0, (plain, equalized)


def test_clip_between_convolutions_ends_the_chain():
    # Clip(x / s, 0, 6) is not Clip(x, 0, 6) / s: the depthwise -> pointwise pair is not equalized.
    _, context = run_passes(_depthwise_cnn(between="Clip"), ["cross-layer-equalization"])
    assert set(context.records["cross-layer-equalization"]["pairs"]) == {"conv1 -> depthwise"}


@pytest.mark.parametrize("between", ["LeakyRelu", "MaxPool"])
def test_other_positively_homogeneous_ops_keep_the_chain(between):
    attributes = {"kernel_shape": [2, 2], "strides": [2, 2]} if between == "MaxPool" else {}
    proto = _depthwise_cnn(between=between, **attributes)
    model, context = run_passes(proto, ["cross-layer-equalization"])
    assert "depthwise -> pointwise" in context.records["cross-layer-equalization"]["pairs"]
    batch = _batches(1, seed=6)[0]
    expected = _run(proto, batch)
    np.testing.assert_allclose(_run(model, batch), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_a_tensor_with_another_reader_is_not_rescaled():
    proto = _depthwise_cnn()
    # The depthwise output is also a graph output: its scale must not change.
    proto.graph.output.append(helper.make_tensor_value_info("d", TensorProto.FLOAT, None))
    _, context = run_passes(proto, ["cross-layer-equalization"])
    assert set(context.records["cross-layer-equalization"]["pairs"]) == {"conv1 -> depthwise"}


def test_reports_modified_only_when_it_rescales():
    model, _ = run_passes(_depthwise_cnn(), ["cross-layer-equalization"])
    again, context = run_passes(ir.serde.serialize_model(model), ["cross-layer-equalization"])
    assert context.records["cross-layer-equalization"]["pairs"] == {}
    from qcompile.passes.cross_layer_equalization import CrossLayerEqualization

    assert not CrossLayerEqualization(context)(again).modified
    assert CrossLayerEqualization(context)(ir.serde.deserialize_model(_depthwise_cnn())).modified


def test_refused_after_calibration():
    with pytest.raises(PipelineError, match="before 'calibrate'"):
        run_passes(_depthwise_cnn(), ["plan-quantization", "calibrate", "cross-layer-equalization"], data=_batches(2, seed=1))


def test_a_near_dead_channel_beside_a_bias_is_left_alone():
    """PP-OCRv4's recognizer has channels of weights ~1e-39 beside a bias: s = sqrt(r1 / r2) was
    ~1e-19, and the bias divided by it made an activation of 1e18 that no 8-bit grid survives."""
    proto = _depthwise_cnn(scaled=False)
    w1 = next(i for i in proto.graph.initializer if i.name == "w1")
    array = np.frombuffer(w1.raw_data, np.float32).reshape(C, 3, 3, 3).copy()
    array[2] *= 1e-36  # channel 2: dead weights, its bias (b1[2]) kept
    w1.raw_data = array.tobytes()
    model, context = run_passes(proto, ["cross-layer-equalization"])
    conv1 = next(n for n in model.graph if n.name == "conv1")
    bias_before = np.frombuffer(next(i for i in proto.graph.initializer if i.name == "b1").raw_data, np.float32)
    bias_after = conv1.inputs[2].const_value.numpy()
    assert abs(bias_after[2]) == pytest.approx(abs(bias_before[2]))  # the dead channel is not rescaled
    assert np.abs(bias_after).max() < 1e3 * np.abs(bias_before).max()
    for batch in _batches(2, seed=5):
        expected = _run(proto, batch)
        np.testing.assert_allclose(_run(model, batch), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
