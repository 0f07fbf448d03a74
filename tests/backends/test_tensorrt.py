"""The tensorrt target: symmetric INT8 (or FP8 E4M3) QDQ placed where TensorRT fuses it, checked on
the compiled graph and on the CPU provider; the TensorRT run itself where onnxruntime-gpu with
TensorRT and a GPU are installed (skipped elsewhere)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import numpy_helper
from tiny_models import cnn_batches, tiny_cnn

import qcompile
from qcompile.backends import get_target
from qcompile.backends.tensorrt import check_zero_points, provider_options
from qcompile.errors import ConfigError

TENSORRT = "TensorrtExecutionProvider"
CONFIG = {"measure_latency": False}
PLAN = "fix-names,shape-inference,fold-batchnorm,plan-quantization,calibrate,insert-qdq"

needs_tensorrt = pytest.mark.skipif(
    TENSORRT not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu with TensorRT and an NVIDIA GPU (it replaces onnxruntime: its own environment)",
)


@pytest.fixture(scope="module")
def int8_result():
    return qcompile.compile(tiny_cnn(), cnn_batches(4), target="tensorrt", config=CONFIG)


def _zero_points(proto):
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [constants[n.input[2]] for n in proto.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2]]


def test_every_zero_point_is_an_int8_zero(int8_result):
    zero_points = _zero_points(int8_result.to_proto())
    assert zero_points and all(not z.any() for z in zero_points)
    # int8 for activations and weights; biases are float (no int32 DequantizeLinear: the CUDA
    # provider TensorRT hands leftovers to has none, tests/backends/test_cuda_kernels.py).
    assert {z.dtype for z in zero_points} == {np.dtype(np.int8)}


def test_weighted_op_inputs_are_quantized_and_their_outputs_are_not(int8_result):
    """TensorRT's placement: Q/DQ on the activation and weight of Conv/Gemm (the bias is a float
    initializer, which TensorRT adds in the kernel's epilogue), none on their outputs, so a Conv's
    output reaches the residual Add (which TensorRT fuses into the Conv) in higher precision."""
    proto = int8_result.to_proto()
    producers = {out: node for node in proto.graph.node for out in node.output}
    initializers = {t.name for t in proto.graph.initializer}
    weighted = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 4
    for node in weighted:
        assert [producers[name].op_type for name in node.input[:2]] == ["DequantizeLinear"] * 2
        assert node.input[2] in initializers
        readers = [n.op_type for n in proto.graph.node if node.output[0] in n.input]
        assert "QuantizeLinear" not in readers, node.name
    add = next(n for n in proto.graph.node if n.op_type == "Add")
    assert producers[add.input[0]].op_type == "Conv"  # the Conv output, in float


def test_cpu_target_quantizes_conv_outputs_where_tensorrt_does_not():
    _, trt = run_passes(tiny_cnn(), PLAN, data=cnn_batches(2), target="tensorrt")
    _, cpu = run_passes(tiny_cnn(), PLAN, data=cnn_batches(2), target="cpu")
    assert "c3" in cpu.analyses.plan.activations and "c3" not in trt.analyses.plan.activations


def test_compiled_model_agrees_with_float_on_the_cpu_provider(int8_result):
    batch = cnn_batches(1, seed=9)[0]
    expected = ort.InferenceSession(tiny_cnn().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    got = ort.InferenceSession(int8_result.to_proto().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    sqnr = 10 * np.log10((expected**2).sum() / ((expected - got) ** 2).sum())
    assert sqnr > 25


def test_fp8_weights_and_activations_are_float8e4m3fn_without_zero_points():
    result = qcompile.compile(tiny_cnn(), cnn_batches(4), target="tensorrt",
                              config={**CONFIG, "activation_type": "float8e4m3fn", "weight_type": "float8e4m3fn"})
    proto = result.to_proto()
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
    weights = [t for t in proto.graph.initializer if t.name.endswith("_q")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in weights)
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(len(n.input) == 2 for n in qs)  # no zero point: FP8's is 0
    assert result.report.verification["provider_options"].get("trt_int8_enable") is None


def test_uint8_and_16_bit_activations_are_refused():
    for activation_type in ("uint8", "int16"):
        with pytest.raises(ConfigError, match=f"does not accelerate {activation_type} activations"):
            run_passes(tiny_cnn(), PLAN, data=cnn_batches(1), target="tensorrt", activation_type=activation_type)


def test_asymmetric_activations_are_refused_before_tensorrt_sees_them():
    with pytest.raises(ConfigError, match="nonzero zero point.*symmetric INT8"):
        qcompile.compile(tiny_cnn(), cnn_batches(2), target="tensorrt", config={**CONFIG, "activation_symmetric": False})
    assert check_zero_points(qcompile.compile(tiny_cnn(), cnn_batches(2), target="tensorrt", config=CONFIG).to_proto(),
                             "tensorrt") is None


def test_engine_cache_settings_are_in_the_report(int8_result):
    options = int8_result.report.verification["provider_options"]
    assert options["trt_engine_cache_enable"] == "1" and options["trt_int8_enable"] == "1"
    assert options["trt_engine_cache_path"].endswith("/tensorrt-engines")
    assert provider_options("float8e4m3fn").keys() == {"trt_engine_cache_enable", "trt_engine_cache_path",
                                                      "trt_timing_cache_enable"}


@pytest.mark.skipif(TENSORRT in ort.get_available_providers(), reason="checks the report where TensorRT is missing")
def test_targets_and_report_say_tensorrt_is_not_installed_here(int8_result, capsys):
    from qcompile.cli import main

    assert "onnxruntime-gpu" in int8_result.report.verification["skipped"]
    assert main(["targets"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if f"provider: {TENSORRT}" in line)
    assert "NOT installed here" in line and "onnxruntime-gpu" in line


@needs_tensorrt
def test_runs_on_tensorrt_within_a_step_of_the_cpu_reference(int8_result):
    verification = int8_result.report.verification
    placed = verification["placement"]
    assert placed["on_provider"] == placed["nodes"] and not placed["off_provider"]
    assert verification["fidelity"]["outputs"]["logits"]["sqnr_db"] > 30
    assert get_target("tensorrt").providers == (TENSORRT,)
