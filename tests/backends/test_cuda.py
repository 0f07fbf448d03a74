"""The cuda target: the tensorrt target's QDQ model (symmetric INT8, per-channel weights) for ORT's
CUDA provider, checked on the CPU provider here; the CUDA run where onnxruntime-gpu and a GPU are."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from tiny_models import cnn_batches, tiny_cnn

import qcompile
from qcompile.backends import get_target
from qcompile.io.providers import provider_status

CUDA = "CUDAExecutionProvider"
CONFIG = {"measure_latency": False}


@pytest.fixture(scope="module")
def result():
    return qcompile.compile(tiny_cnn(), cnn_batches(4), target="cuda", config=CONFIG)


def test_same_rules_as_tensorrt_but_its_own_provider():
    cuda, trt = get_target("cuda"), get_target("tensorrt")
    assert cuda.rules is trt.rules and cuda.activation_symmetric and cuda.default_activation_type == "int8"
    assert cuda.providers == (CUDA,) and cuda.provider_options is None


def test_symmetric_int8_per_channel_and_runs_on_the_cpu_provider(result):
    proto = result.to_proto()
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert constants["w1_q"].dtype == np.int8 and constants["w1_scale"].shape == (8,)
    activation_zps = [constants[n.input[2]] for n in proto.graph.node
                      if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert activation_zps and all(z.dtype == np.int8 and z == 0 for z in activation_zps)
    batch = cnn_batches(1, seed=5)[0]
    expected = ort.InferenceSession(tiny_cnn().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    assert 10 * np.log10((expected**2).sum() / ((expected - got) ** 2).sum()) > 25


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="checks the report where CUDA is missing")
def test_report_says_why_cuda_did_not_run(result):
    assert "onnxruntime-gpu" in result.report.verification["skipped"]
    assert "onnxruntime-gpu" in provider_status(CUDA).how


@pytest.mark.skipif(CUDA not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and an NVIDIA GPU (it replaces onnxruntime: its own environment)")
def test_runs_on_cuda_as_on_the_cpu_provider(result):
    verification = result.report.verification
    assert verification["placement"]["on_provider"] == verification["placement"]["nodes"]
    assert verification["fidelity"]["outputs"]["logits"]["sqnr_db"] > 30
