"""adaround: learned rounding lowers a layer's output error against round-to-nearest, stays on the
grid insert-qdq uses (which then stores exactly the learned integers), and says when it did nothing."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import _init, make_model

import qcompile
from qcompile.errors import CalibrationDataError
from qcompile.passes.adaround import AdaRound
from qcompile.passes.bias_correction import quantized_weight
from qcompile.numerics.qparams import quant_type, weight_qparams


def _gemm():
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [_init("w", rng.normal(0, 0.1, (16, 32)).astype(np.float32)), _init("b", np.zeros(16, np.float32))],
    )


def _depthwise():
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="fc", group=8, pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [_init("w", rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)), _init("b", np.zeros(8, np.float32))],
    )


def _batches(shape, count=4, seed=1):
    rng = np.random.default_rng(seed)
    # Correlated, positive inputs (as after a Relu): where rounding to nearest is not the best choice.
    mix = rng.normal(0, 1, (shape[-1], shape[-1])) / np.sqrt(shape[-1])
    return [{"x": np.maximum(rng.normal(0, 1, (8, *shape)) @ mix + 0.3, 0).astype(np.float32)} for _ in range(count)]


def _weight(proto):
    return numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w"))


def _output_error(proto, weight, data):
    """sum over the data of ||layer(x; weight) - layer(x; W)||^2, run by ONNX Runtime."""
    changed = type(proto).FromString(proto.SerializeToString())
    for init in changed.graph.initializer:
        if init.name == "w":
            init.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), "w"))
    sessions = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]) for p in (proto, changed)]
    return sum(float(np.sum((sessions[1].run(None, b)[0] - sessions[0].run(None, b)[0]).astype(np.float64) ** 2)) for b in data)


# Measured, of round-to-nearest's output error: AdaRound 0.27 (Gemm) and 0.73 (depthwise: 9 weights
# per channel leave little to choose); GPTQ 0.23 (the inputs' correlations let later columns absorb
# earlier errors) and 0.65.
@pytest.mark.parametrize(("pass_name", "build", "shape", "limit"), [
    ("adaround", _gemm, (32,), 0.4), ("adaround", _depthwise, (8, 6, 6), 0.85),
    ("gptq-rounding", _gemm, (32,), 0.3), ("gptq-rounding", _depthwise, (8, 6, 6), 0.85),
])
def test_lowers_the_layer_output_error_against_round_to_nearest(pass_name, build, shape, limit):
    proto, data = build(), _batches(shape)
    model, context = run_passes(proto, ["plan-quantization", "calibrate", pass_name], data=data)
    (quant,) = context.analyses.plan.weights
    learned = next(iter(model.graph)).inputs[1].const_value.numpy()
    rtn = _output_error(proto, quantized_weight(_weight(proto), quant), data)
    rounded = _output_error(proto, learned, data)
    assert rounded < limit * rtn, (rounded, rtn)
    assert context.records[pass_name]["layers"]["fc"]["relative_error"] == pytest.approx(rounded / rtn, rel=1e-3)


def stored_integers(pass_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Run ``pass_name`` then insert-qdq on the Gemm; check what every rounding pass promises (the
    float weight kept for bias-correction, the grid unmoved, each channel's largest at qmax) and
    return the stored integers and W / s."""
    proto, data = _gemm(), _batches((32,))
    model, context = run_passes(proto, ["plan-quantization", "calibrate", pass_name, "insert-qdq"], data=data)
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    dq = gemm.inputs[1].producer()
    q = dq.inputs[0].const_value.numpy().astype(np.int64)
    assert np.array_equal(context.analyses.unrounded_weights[("fc", 1)], _weight(proto))  # where it started
    scale, _ = weight_qparams(_weight(proto), 0, quant_type("int7"))  # the cpu target's weights
    np.testing.assert_allclose(dq.inputs[1].const_value.numpy(), scale, rtol=1e-6)  # the grid did not move
    assert np.array_equal(np.abs(q).max(axis=1), np.full(16, 63))
    return q, _weight(proto) / scale[:, None]


def test_insert_qdq_stores_exactly_the_learned_integers():
    q, ratio = stored_integers("adaround")
    assert np.all((q == np.floor(ratio)) | (q == np.ceil(ratio)))  # each weight rounded up or down
    assert np.mean(q != np.rint(ratio)) > 0.02  # and not all to nearest


def test_no_learning_is_round_to_nearest_and_reports_no_change():
    # V starts where h(V) is the fractional part of W / s, so V >= 0 is round-to-nearest.
    model, context = run_passes(_gemm(), ["plan-quantization", "calibrate"], data=_batches((32,)))
    result = AdaRound(context, iterations=1, lr=1e-12)(model)
    assert not result.modified
    assert context.records["adaround"]["layers"]["fc"]["kept"] == "round-to-nearest"


def test_nothing_planned_nothing_modified():
    model, context = run_passes(_gemm(), ["plan-quantization", "calibrate"], data=_batches((32,)), exclude_op_types=["Gemm"])
    assert not AdaRound(context)(model).modified


def test_bias_correction_after_it_corrects_against_the_float_weights():
    proto, data = _gemm(), _batches((32,))
    model, _ = run_passes(proto, ["plan-quantization", "calibrate", "adaround", "bias-correction"], data=data)
    gemm = next(iter(model.graph))
    learned, bias = gemm.inputs[1].const_value.numpy(), gemm.inputs[2].const_value.numpy()
    x = np.concatenate([b["x"] for b in data])
    # E[W~ x + b'] = E[W x + b]: the shift of the learned rounding is corrected, not zero.
    np.testing.assert_allclose((x @ learned.T + bias).mean(axis=0), (x @ _weight(proto).T).mean(axis=0), atol=1e-5)
    assert np.abs(bias).max() > 1e-4


def test_needs_data_it_can_read_again():
    with pytest.raises(CalibrationDataError, match="readable again"):
        qcompile.compile(ir.serde.deserialize_model(_gemm()), iter(_batches((32,))),
                         config={"adaround": True, "measure_latency": False})
