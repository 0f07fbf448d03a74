"""The GPU targets (cuda, tensorrt) emit only nodes ORT's CUDA provider has kernels for, checked
against the table in backends/cuda_kernels.py without a GPU: issue 14 measured on an H200
(onnxruntime-gpu 1.31.1) that every int32 bias DequantizeLinear of a cuda-target model ran on the
CPU provider (4 nodes of the tiny CNN, 20 of 127 of a ResNet-18-shaped CNN)."""

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tiny_models import cnn_batches, lstm_batches, tiny_cnn, tiny_lstm, tiny_transformer, transformer_batches

import qcompile
from qcompile.backends import available_targets, get_target
from qcompile.backends.cuda import SLOWER_THAN_FP32
from qcompile.backends.cuda_kernels import CUDA_KERNELS

CONFIG = {"measure_latency": False}
NO_KERNEL = "have no CUDAExecutionProvider kernel"
FP8 = {"activation_type": "float8e4m3fn", "weight_type": "float8e4m3fn"}
MODELS = {
    "cnn": (tiny_cnn, lambda: cnn_batches(4)),
    "transformer": (tiny_transformer, lambda: transformer_batches(4)),
    "lstm": (tiny_lstm, lambda: lstm_batches(4)),
}


def _compile(target, model, **config):
    build, batches = MODELS[model]
    return qcompile.compile(build(), batches(), target=target, config={**CONFIG, **config})


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def test_the_table_has_int8_and_fp8_qdq_but_no_int32_dequantize():
    for op in ("DequantizeLinear", "QuantizeLinear"):
        for dtype in ("int8", "uint8", "float8e4m3fn", "float8e5m2"):
            assert CUDA_KERNELS.runs("", op, dtype), (op, dtype)
        for dtype in ("int16", "uint16", "int32"):
            assert not CUDA_KERNELS.runs("", op, dtype), (op, dtype)
    assert not CUDA_KERNELS.runs("com.microsoft", "DynamicQuantizeLSTM")
    assert CUDA_KERNELS.runs("com.microsoft", "MatMulNBits", "float")
    assert CUDA_KERNELS.runs("", "Conv", "float")  # the input model's float ops


def test_the_gpu_targets_read_the_table_and_store_float_biases():
    for name in ("cuda", "tensorrt"):
        assert get_target(name).kernels is CUDA_KERNELS and not get_target(name).int32_bias
    assert get_target("cpu").kernels is None and get_target("cpu").int32_bias
    assert get_target("cuda").summary()["bias"] == "float" and get_target("cpu").summary()["bias"] == "int32; Conv, Gemm: float on the int32 grid"


def test_the_table_finds_what_the_cpu_target_emits():
    """Before: the cpu target's model (what cuda emitted before issue 14) has one int32 bias
    DequantizeLinear per biased layer, the 4 CPU nodes measured on the tiny CNN; and an LSTM
    compiled for the CPU becomes com.microsoft DynamicQuantizeLSTM. The table flags both."""
    cnn = CUDA_KERNELS.nodes_without_kernel(_compile("cpu", "cnn").to_proto())
    assert [(m["op_type"], m["element_type"]) for m in cnn] == [("DequantizeLinear", "int32")]
    lstm = CUDA_KERNELS.nodes_without_kernel(_compile("cpu", "lstm").to_proto())
    assert [(m["domain"], m["op_type"]) for m in lstm] == [("com.microsoft", "DynamicQuantizeLSTM")]


@pytest.mark.parametrize("target", ["cuda", "tensorrt"])
@pytest.mark.parametrize("model,config", [
    ("cnn", {}), ("transformer", {}), ("lstm", {}), ("cnn", FP8), ("transformer", FP8),
], ids=["cnn", "transformer", "lstm", "cnn-fp8", "transformer-fp8"])
def test_every_emitted_node_has_a_cuda_kernel(target, model, config):
    result = _compile(target, model, **config)
    proto = result.to_proto()
    assert CUDA_KERNELS.nodes_without_kernel(proto) == []
    assert not any(NO_KERNEL in w for w in result.report.warnings)
    assert "DynamicQuantizeLSTM" not in _ops(proto)
    if model != "lstm":
        assert "QuantizeLinear" in _ops(proto)


@pytest.mark.parametrize("target", ["cuda", "tensorrt"])
def test_biases_are_float_initializers_and_the_model_stays_accurate(target):
    result = _compile(target, "cnn")
    proto = result.to_proto()
    initializers = {t.name: t for t in proto.graph.initializer}
    producers = {out: n for n in proto.graph.node for out in n.output}
    weighted = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 4
    for node in weighted:
        assert producers[node.input[1]].op_type == "DequantizeLinear"  # the int8 weight
        bias = initializers[node.input[2]]  # read directly, no DequantizeLinear
        assert bias.data_type == onnx.TensorProto.FLOAT
    assert result.report.evaluation["outputs"]["logits"]["sqnr_db"] > 35


def test_no_gpu_target_pipeline_runs_a_cpu_only_pass():
    for name, target in available_targets().items():
        if name != "cpu" and target.name != "qnn":
            assert "dynamic-quantize-lstm" not in target.default_pipeline, name
    assert "dynamic-quantize-lstm" in get_target("cpu").default_pipeline


def test_lstm_stays_an_onnx_lstm_on_gpu_targets():
    proto = _compile("tensorrt", "lstm").to_proto()
    assert _ops(proto) == ["LSTM"]
    batch = lstm_batches(1, seed=7)[0]
    want = ort.InferenceSession(tiny_lstm().SerializeToString()).run(None, batch)
    got = ort.InferenceSession(proto.SerializeToString()).run(None, batch)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_pipeline_with_a_cpu_only_pass_is_reported_for_the_cuda_target():
    pipeline = [*get_target("cuda").default_pipeline]
    pipeline.insert(pipeline.index("insert-qdq") + 1, "dynamic-quantize-lstm")
    result = _compile("cuda", "lstm", pipeline=pipeline)
    assert "DynamicQuantizeLSTM" in _ops(result.to_proto())
    [warning] = [w for w in result.report.warnings if NO_KERNEL in w]
    assert warning.startswith("1 node(s)") and "lstm_quant (com.microsoft.DynamicQuantizeLSTM)" in warning


def test_cuda_report_recommends_tensorrt_with_the_measured_slowdown(caplog):
    with caplog.at_level(logging.WARNING, logger="qcompile.api"):
        result = _compile("cuda", "cnn")
    assert result.report.warnings == [SLOWER_THAN_FP32]
    for fact in ("1.49x slower", "1.30 ms vs 0.87 ms", "1.27x slower at batch 32", "H200",
                 "onnxruntime-gpu 1.31.1", "--target tensorrt"):
        assert fact in SLOWER_THAN_FP32, fact
    assert result.report.to_dict()["warnings"] == [SLOWER_THAN_FP32]
    assert f"warning: {SLOWER_THAN_FP32}" in str(result.report)
    assert any(SLOWER_THAN_FP32 in r.getMessage() for r in caplog.records)
    assert get_target("cuda").summary()["warnings"] == [SLOWER_THAN_FP32]
    assert _compile("tensorrt", "cnn").report.warnings == []


def test_targets_command_shows_the_recommendation_and_the_bias_form(capsys):
    from qcompile.cli import main

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    cuda = out[out.index("cuda:"):]
    assert f"warning: {SLOWER_THAN_FP32}" in cuda
    assert "biases: float initializers (no int32 DequantizeLinear kernel on CUDAExecutionProvider)" in cuda
    assert out.count("warning:") == 1
