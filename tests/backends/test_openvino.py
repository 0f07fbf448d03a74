"""The openvino target: its rule table (everywhere) and runs on OpenVINOExecutionProvider (where
onnxruntime-openvino is installed: its own virtual environment, since it replaces onnxruntime).

The rule tests compile with the planner only; the provider tests compile the tiny models, open an
OpenVINO session with the CPU fallback disabled and compare it with the CPU provider running the
same QDQ model (onnxruntime-openvino ships both providers).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import cnn_batches, make_model, tiny_cnn, tiny_transformer, transformer_batches

import qcompile
from qcompile.backends import get_target
from qcompile.cli import main
from qcompile.io.providers import open_session, placement, provider_status

OPENVINO = "OpenVINOExecutionProvider"
CONFIG = {"measure_latency": False}
PLAN = "fix-names,shape-inference,plan-quantization,calibrate,insert-qdq"

needs_openvino = pytest.mark.skipif(
    OPENVINO not in ort.get_available_providers(),
    reason="needs onnxruntime-openvino, which replaces onnxruntime: run in its own environment, see .ci/run",
)


def _qdq_params(model, op_type="QuantizeLinear"):
    """(scale, zero point) of every Q (or DQ) node with a per-tensor zero point."""
    params = []
    for node in model.graph:
        if node.op_type == op_type and len(node.inputs) > 2 and node.inputs[2] is not None:
            zero_point = node.inputs[2].const_value.numpy()
            params.append((node.inputs[0].name, zero_point.dtype, zero_point))
    return params


def _sigmoid_model():
    """Conv -> Sigmoid -> Conv: on the CPU provider the Sigmoid has an integer kernel (QLinearSigmoid)."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 4, 1, 1)).astype(np.float32), "w")
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["h"], name="conv1"),
         helper.make_node("Sigmoid", ["h"], ["s"], name="sigmoid"),
         helper.make_node("Conv", ["s", "w"], ["y"], name="conv2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])], [w],
    )


# --- The rule table: no provider needed ---------------------------------------------------------

def test_defaults_are_uint8_asymmetric_activations_and_per_channel_int7_weights():
    """int7: int8 codes in [-64, 63], NNCF's overflow_fix (no u8s8 saturation without VNNI)."""
    model, context = run_passes(tiny_cnn(), PLAN, data=cnn_batches(2), target="openvino")
    plan = context.analyses.plan
    assert {q.qtype.name for q in plan.activations.values()} == {"uint8"}
    assert any(q.zero_point != 0 for q in plan.activations.values())  # asymmetric: a zero point
    conv_weights = [w for w in plan.weights if w.node.startswith("conv")]
    assert conv_weights and all(w.qtype.name == "int7" and w.axis == 0 and w.symmetric for w in conv_weights)
    weight = model.graph.initializers["w1_q"].const_value.numpy()
    assert weight.dtype == np.int8 and np.abs(weight).max() == 63
    assert model.graph.initializers["w1_scale"].const_value.numpy().shape == (8,)  # one per channel


def test_sigmoid_stays_float_on_openvino_but_not_on_cpu():
    """OpenVINO has no low-precision Sigmoid: a Q/DQ pair around it would only be undone."""
    data = [{"x": np.random.default_rng(i).normal(size=(1, 4, 3, 3)).astype(np.float32)} for i in range(2)]
    _, openvino = run_passes(_sigmoid_model(), PLAN, data=data, target="openvino")
    _, cpu = run_passes(_sigmoid_model(), PLAN, data=data, target="cpu")
    assert "sigmoid" not in openvino.analyses.plan.nodes
    assert cpu.analyses.plan.nodes["sigmoid"] == "Sigmoid"
    assert {"conv1", "conv2"} <= set(openvino.analyses.plan.anchors)


def test_16_bit_activations_are_refused_with_the_supported_types():
    with pytest.raises(qcompile.errors.ConfigError, match="does not accelerate uint16 activations.*uint8, int8"):
        run_passes(tiny_cnn(), PLAN, data=cnn_batches(1), target="openvino", activation_type="uint16")


def test_provider_status_says_what_to_install_where_it_is_missing():
    status = provider_status(OPENVINO)
    if status.installed:
        assert "onnxruntime-openvino" in status.how
    else:
        assert "onnxruntime-openvino" in status.how and "replaces onnxruntime" in status.how
        assert "virtual environment of its own" in get_target("openvino").install_hint


@pytest.mark.skipif(OPENVINO in ort.get_available_providers(), reason="checks the report where OpenVINO is missing")
def test_compile_without_the_provider_records_why_it_was_not_verified():
    result = qcompile.compile(tiny_cnn(), cnn_batches(2), target="openvino", config=CONFIG)
    verification = result.report.verification
    assert "onnxruntime-openvino" in verification["skipped"]
    assert verification["provider_options"] == {"device_type": "CPU", "precision": "FP32"}
    assert "not verified on OpenVINOExecutionProvider" in str(result.report)


# --- On the provider -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn_result():
    return qcompile.compile(tiny_cnn(), cnn_batches(4), target="openvino", config=CONFIG)


@pytest.fixture(scope="module")
def transformer_result():
    return qcompile.compile(tiny_transformer(), transformer_batches(4), target="openvino", config=CONFIG)


@needs_openvino
def test_cnn_runs_entirely_on_openvino_as_the_cpu_reference_does(cnn_result):
    verification = cnn_result.report.verification
    placed = verification["placement"]
    assert placed["nodes"] > 0 and placed["on_provider"] == placed["nodes"] and not placed["off_provider"]
    assert "onnxruntime-openvino" in verification["provider_package"]
    # logits come from the Gemm in float (its kernel writes float): no step, SQNR against the CPU.
    assert verification["fidelity"]["outputs"]["logits"]["sqnr_db"] > 35


def _conv_block(seed=0):
    """Conv-Relu-Conv whose output is the second Conv's requantized output: a quantization step to
    count differences in."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b2")]
    return make_model(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])], inits,
    )


@needs_openvino
def test_integer_conv_output_within_one_step_of_the_cpu_reference():
    """OpenVINO's INT8 Conv with a requantized output against the CPU provider's QLinearConv."""
    result = qcompile.compile(_conv_block(), cnn_batches(4), target="openvino", config=CONFIG)
    verification = result.report.verification
    assert verification["placement"]["on_provider"] == verification["placement"]["nodes"]
    fidelity = verification["fidelity"]["outputs"]["y"]
    assert fidelity["step"] > 0
    assert fidelity["within_1_step"] >= 0.999 and fidelity["max_diff_steps"] <= 2


@needs_openvino
def test_transformer_block_runs_entirely_on_openvino(transformer_result):
    verification = transformer_result.report.verification
    placed = verification["placement"]
    assert placed["on_provider"] == placed["nodes"] and not placed["off_provider"]
    assert transformer_result.report.plan["quantized_by_op_type"] == {"MatMul": 8}
    assert verification["fidelity"]["outputs"]["y"]["sqnr_db"] > 40


@needs_openvino
def test_independent_session_agrees_with_the_cpu_provider(cnn_result):
    """Our own OpenVINO session on the saved model, fallback disabled: every node on OpenVINO, and
    its outputs close to the CPU provider's on a batch the compile did not see."""
    proto = cnn_result.to_proto()
    session = open_session(proto, get_target("openvino"))
    assert {row["provider"] for row in placement(session)} == {OPENVINO}
    batch = cnn_batches(1, seed=7)[0]
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    float_out = ort.InferenceSession(tiny_cnn().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    got = session.run(None, batch)[0]
    # OpenVINO is as close to the float model as the CPU provider's run of the same QDQ model.
    error, cpu_error = np.abs(got - float_out).mean(), np.abs(reference - float_out).mean()
    assert error <= 1.5 * cpu_error + 1e-3
    assert np.argmax(got, axis=1).tolist() == np.argmax(reference, axis=1).tolist()


@needs_openvino
def test_cli_targets_and_run(cnn_result, tmp_path, capsys):
    assert main(["targets"]) == 0
    assert f"provider: {OPENVINO} (installed, built into onnxruntime-openvino" in capsys.readouterr().out
    model = tmp_path / "model.openvino.onnx"
    onnx.save(cnn_result.to_proto(), str(model))
    sample = tmp_path / "sample.npz"
    np.savez(sample, **cnn_batches(1, seed=3)[0])
    assert main(["run", str(model), "--target", "openvino", "--inputs", str(sample)]) == 0
    out = capsys.readouterr().out
    assert f"nodes on {OPENVINO}" in out and "CPUExecutionProvider" not in out
