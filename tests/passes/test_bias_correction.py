"""bias-correction: the corrected layer with the weights insert-qdq stores has the float layer's
mean output; the INT8 model's mean output error drops; nothing to correct is reported as such."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import _init, make_model

import qcompile
from qcompile.errors import CalibrationDataError
from qcompile.passes.bias_correction import quantized_weight


def _conv(bias: bool = True):
    """One strided, padded 3x3 Conv whose output channels differ 30x in weight magnitude: with one
    weight scale for all of them (per_channel = false) the small channels are rounded coarsely."""
    rng = np.random.default_rng(0)
    w = (rng.normal(0, 1, (8, 4, 3, 3)) * np.geomspace(0.03, 1.0, 8)[:, None, None, None]).astype(np.float32)
    inits = [_init("w", w)] + ([_init("b", rng.normal(0, 0.05, 8).astype(np.float32))] if bias else [])
    return make_model(
        [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 5, 5])], inits,
    )


def _matmul_add():
    rng = np.random.default_rng(0)
    w = (rng.normal(0, 1, (16, 8)) * np.geomspace(0.03, 1.0, 8)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"), helper.make_node("Add", ["m", "b"], ["y"], name="add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [_init("w", w), _init("b", rng.normal(0, 0.05, 8).astype(np.float32))],
    )


def _batches(count, seed, shape=(8, 4, 9, 9)):
    rng = np.random.default_rng(seed)
    # Positive inputs with a non-zero mean, as after a Relu: the rounding errors do not cancel.
    return [{"x": rng.uniform(0, 1, shape).astype(np.float32) + 0.5} for _ in range(count)]


def _run(proto, batch):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]


def _replace(proto, values):
    proto = type(proto).FromString(proto.SerializeToString())
    for init in proto.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    return proto


@pytest.mark.parametrize(("build", "shape", "bias_node"), [(_conv, (8, 4, 9, 9), "conv"), (_matmul_add, (8, 16), "add")])
def test_corrected_layer_with_the_stored_weights_has_the_float_mean(build, shape, bias_node):
    proto = build()
    data = _batches(4, seed=1, shape=shape)
    model, context = run_passes(proto, ["plan-quantization", "calibrate", "bias-correction"], data=data, per_channel=False)
    layer = "conv" if bias_node == "conv" else "matmul"
    assert layer in context.records["bias-correction"]["corrected"]
    (quant,) = [w for w in context.analyses.plan.weights if w.node == layer]
    weight = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w"))
    bias_value = next(n for n in model.graph if n.name == bias_node).inputs[-1 if bias_node == "conv" else 1]
    # Independently: the float model with W_q (what insert-qdq stores) and the corrected bias, in ORT.
    corrected = _replace(proto, {"w": quantized_weight(weight, quant), "b": bias_value.const_value.numpy()})
    uncorrected = _replace(proto, {"w": quantized_weight(weight, quant)})
    axes = (0, 2, 3) if len(shape) == 4 else (0,)
    mean = {name: np.mean([_run(p, b).mean(axis=axes) for b in data], axis=0)
            for name, p in (("float", proto), ("corrected", corrected), ("uncorrected", uncorrected))}
    scale = np.abs(mean["float"]).max()
    np.testing.assert_allclose(mean["corrected"], mean["float"], atol=1e-5 * scale)
    assert np.abs(mean["uncorrected"] - mean["float"]).max() > 100 * 1e-5 * scale  # there was a shift to correct


def test_lowers_the_int8_models_mean_output_error():
    proto, calibration, evaluation = _conv(), _batches(8, seed=1), _batches(4, seed=2)
    reference = np.concatenate([_run(proto, b) for b in evaluation])

    def mean_error(switch: bool) -> float:
        config = {"measure_latency": False, "per_channel": False, "bias_correction": switch}
        compiled = qcompile.compile(proto, calibration, config=config, eval_data=evaluation).to_proto()
        output = np.concatenate([_run(compiled, b) for b in evaluation])
        return float(np.abs((output - reference).mean(axis=(0, 2, 3))).mean())

    plain, corrected = mean_error(False), mean_error(True)
    # Measured: the mean per-channel shift drops from 3.1e-2 to 7.7e-4.
    assert corrected < 0.1 * plain, (plain, corrected)


def test_a_layer_without_bias_is_skipped_and_nothing_is_modified():
    from qcompile.passes.bias_correction import BiasCorrection

    model, context = run_passes(_conv(bias=False), ["plan-quantization", "calibrate"], data=_batches(2, seed=1))
    result = BiasCorrection(context)(model)
    assert not result.modified
    assert context.records["bias-correction"]["skipped"] == {"conv": "no constant bias to correct"}


def test_weights_already_on_the_grid_need_no_correction():
    from qcompile.passes.bias_correction import BiasCorrection

    proto = _conv()
    weight = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w"))
    on_grid = np.rint(weight / np.abs(weight).max() * 63) * (np.abs(weight).max() / 63)  # int7, the cpu default
    model, context = run_passes(_replace(proto, {"w": on_grid.astype(np.float32)}), ["plan-quantization", "calibrate"],
                                data=_batches(2, seed=1), per_channel=False)
    assert not BiasCorrection(context)(model).modified


def test_needs_data_it_can_read_again():
    proto = _conv()
    model = ir.serde.deserialize_model(proto)
    with pytest.raises(CalibrationDataError, match="readable again"):
        qcompile.compile(model, iter(_batches(3, seed=1)), config={"bias_correction": True, "measure_latency": False})
