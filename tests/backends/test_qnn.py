"""qnn-htp on the real provider: onnxruntime-qnn's HTP simulator, CPU fallback disabled.

Every test here compiles for qnn-htp and runs the result on QNNExecutionProvider; the module is
skipped where onnxruntime-qnn is not installed (it has wheels for x86-64 Linux and Windows).
"""

import dataclasses
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import cnn_batches, make_model, tiny_cnn, tiny_transformer, transformer_batches

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed (pip install onnxruntime-qnn)")

import qcompile  # noqa: E402
from qcompile.backends import get_target  # noqa: E402
from qcompile.cli import main  # noqa: E402
from qcompile.errors import PlacementError, ProviderError  # noqa: E402
from qcompile.analysis.op_fidelity import op_fidelity  # noqa: E402
from qcompile.io.providers import open_session, output_steps, placement, provider_status, reference_session  # noqa: E402

QNN = "QNNExecutionProvider"
CONFIG = {"measure_latency": False}


def _sqnr(reference, candidate):
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    return 10 * np.log10((reference**2).sum() / ((reference - candidate) ** 2).sum())


@pytest.fixture(scope="module")
def cnn_result():
    return qcompile.compile(tiny_cnn(), cnn_batches(6), target="qnn-htp", config=CONFIG)


@pytest.fixture(scope="module")
def transformer_result():
    return qcompile.compile(tiny_transformer(), transformer_batches(6), target="qnn-htp", config=CONFIG)


def test_provider_is_discovered_as_a_plugin():
    status = provider_status(QNN)
    assert status.installed and "onnxruntime-qnn" in status.how
    assert provider_status(QNN) == status  # registering again is harmless


def test_cnn_runs_entirely_on_qnn_within_one_step_of_the_cpu_reference(cnn_result):
    verification = cnn_result.report.verification
    placed = verification["placement"]
    assert placed["nodes"] > 0 and placed["on_provider"] == placed["nodes"] and not placed["off_provider"]
    assert verification["float_compute_nodes"] == []
    fidelity = verification["fidelity"]["outputs"]["logits"]
    assert fidelity["within_1_step"] >= 0.999
    assert fidelity["max_diff_steps"] <= 2
    # The report records the shapes it fixed.
    assert cnn_result.report.transformations["fix-shapes"]["inputs"]["x"]["to"] == [4, 3, 16, 16]


def test_cnn_placement_and_outputs_checked_independently(cnn_result):
    """Our own session on the saved model: every node on QNN, outputs as the CPU provider's."""
    proto = cnn_result.to_proto()
    session = open_session(proto, get_target("qnn-htp"))
    assert {row["provider"] for row in placement(session)} == {QNN}
    batch = cnn_batches(1, seed=7)[0]
    # The QDQ arithmetic as written: the CPU provider's fused integer kernels are no reference on
    # an AVX2-only x86-64 CPU, where their u8s8 int16 pair sums saturate (logits 18 steps off).
    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(proto.SerializeToString(), as_written,
                                     providers=["CPUExecutionProvider"]).run(None, batch)[0]
    got = session.run(None, batch)[0]
    step = next(float(numpy_helper.to_array(t)) for t in proto.graph.initializer if t.name == "logits_scale")
    assert np.mean(np.abs(got - reference) <= step * 1.001) >= 0.999


def _conv_relu_model():
    """Conv -> Relu, a graph output: the pattern QNN fuses into one Conv with the Relu's encoding."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (16, 4, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b")
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16, 8, 8])], [w, b],
    )


def test_relu_input_has_the_relu_output_encoding_so_htp_and_cpu_round_once():
    """QNN fuses DQ -> Conv -> Q -> DQ -> Relu -> Q into one Conv that requantizes straight to the
    Relu's output encoding. With a second encoding on the Conv's output the CPU reference rounds
    twice (here 99.8 % within 1 step, 6 steps at most; digits CNN logits 96.8 %); with the same one
    both round once, and only HTP's own Conv rounding differs (a step, rarely two)."""
    data = [{"x": np.random.default_rng(i).normal(size=(8, 4, 8, 8)).astype(np.float32)} for i in range(4)]
    result = qcompile.compile(_conv_relu_model(), data, target="qnn-htp", config=CONFIG)
    proto = result.to_proto()
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    before = producers[producers[relu.input[0]].input[0]]  # the Q between Conv and Relu
    after = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == relu.output[0])
    assert before.op_type == "QuantizeLinear" and producers[before.input[0]].op_type == "Conv"
    for index in (1, 2):
        assert constants[before.input[index]] == constants[after.input[index]]
    assert constants[after.input[2]] == 0  # saturating at 0 is the Relu
    fidelity = result.report.verification["fidelity"]["outputs"]["y"]
    assert result.report.verification["float_compute_nodes"] == []
    assert fidelity["within_1_step"] >= 0.9995 and fidelity["max_diff_steps"] <= 2


def test_op_fidelity_reports_each_quantized_node_unit():
    """Conv -> Relu: the input's QuantizeLinear, the Conv and the Relu are one row each, in graph
    order; each alone agrees with the CPU reference within a step."""
    data = [{"x": np.random.default_rng(i).normal(size=(8, 4, 8, 8)).astype(np.float32)} for i in range(2)]
    proto = qcompile.compile(_conv_relu_model(), data, target="qnn-htp", config=CONFIG).to_proto()
    result = op_fidelity(proto, get_target("qnn-htp"), data[:1])
    assert [(row["op_type"], row["node"]) for row in result["units"]] == [
        ("QuantizeLinear", "Q"), ("Conv", "conv"), ("Relu", "relu")]
    for row in result["units"]:
        assert 0 <= row["within_1_step"] <= 1 and 0 <= row["coupled_within_1_step"] <= 1
        assert row["elements"] == (8 * 4 * 8 * 8 if row["op_type"] == "QuantizeLinear" else 8 * 16 * 8 * 8)
    assert result["units"][1]["reads_constant"] and not result["units"][2]["reads_constant"]
    assert set(result["by_op_type"]) == {"QuantizeLinear", "Conv x constant", "Relu"}
    assert all(entry["units"] == 1 and entry["worst_within_1_step"] >= 0.999 for entry in result["by_op_type"].values())
    assert result["placement"]["off_provider"] == {"coupled": [], "decoupled": []}


def _matmul_mul_model():
    """x @ W, then a multiplication by a constant: at uint16 HTP's MatMul is steps off, its Mul is not."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.05, (96, 96)).astype(np.float32), "w")
    c = numpy_helper.from_array(np.array(0.37, np.float32), "c")
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Mul", ["h", "c"], ["y"], name="scale")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 96])], [w, c],
    )


def test_op_fidelity_decoupled_share_is_the_ops_own_disagreement(tmp_path, capsys, monkeypatch):
    """End to end, the Mul inherits the MatMul's disagreement (uint16, before the multiplier is made
    fp16-exact); run alone on the reference's codes, the Mul agrees within a step. The CLI prints it."""
    data = [{"x": np.random.default_rng(i).normal(size=(1, 64, 96)).astype(np.float32)} for i in range(2)]
    target = dataclasses.replace(get_target("qnn-htp"), requantization_significand_bits=None)
    monkeypatch.setitem(qcompile.backends._TARGETS, "qnn-htp", target)
    config = {**CONFIG, "activation_type": "uint16"}
    proto = qcompile.compile(_matmul_mul_model(), data, target="qnn-htp", config=config).to_proto()
    result = op_fidelity(proto, target, data[:1])
    rows = {row["node"]: row for row in result["units"]}
    assert rows["scale"]["within_1_step"] >= 0.999
    assert rows["scale"]["coupled_within_1_step"] < 0.9
    assert rows["mm"]["within_1_step"] == rows["mm"]["coupled_within_1_step"]  # it reads the graph input
    model, sample = tmp_path / "model.onnx", tmp_path / "sample.npz"
    onnx.save(proto, str(model))
    np.savez(sample, **data[0])
    assert main(["run", str(model), "--target", "qnn-htp", "--inputs", str(sample), "--per-op"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Mul x constant\s+1\s+100\.00%", out) and re.search(r"\n  Mul\s+100\.00%\s+\d+\s+[\d.]+%\s+scale\n", out)


def _matmul_model():
    """x @ W (int8 per-channel weight): with uint16 activations ORT's CPU provider rewrites it."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.05, (96, 96)).astype(np.float32), "w")
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 96])], [w],
    )


def test_cpu_reference_computes_uint16_matmuls_as_written():
    """ORT rewrites DQ(int8 weight) -> MatMul into MatMulNBits, whose default accuracy level 4
    quantizes the uint16 activations to int8 blocks: the CPU "reference" was then tens of steps off
    the QDQ model's own arithmetic (float32 DQ -> MatMul -> Q, what ORT runs with no rewrites).
    The reference qnn-htp's verification uses computes it as written."""
    data = [{"x": np.random.default_rng(i).normal(size=(1, 64, 96)).astype(np.float32)} for i in range(4)]
    result = qcompile.compile(_matmul_model(), data, target="qnn-htp",
                              config={**CONFIG, "activation_type": "uint16"})
    proto = result.to_proto()
    step = output_steps(proto)["y"]
    batch = {"x": np.random.default_rng(9).normal(size=(1, 64, 96)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = as_written.run(None, batch)[0]
    default = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]
    ours = reference_session(proto).run(None, batch)[0]
    assert np.abs(ours - expected).max() <= step * 1.001
    assert np.abs(default - expected).max() > 5 * step  # before: the rewrite's int8 activations
    assert "accuracy_level = 0" in result.report.verification["fidelity"]["reference"]


def test_transformer_block_runs_entirely_on_qnn(transformer_result):
    verification = transformer_result.report.verification
    placed = verification["placement"]
    assert placed["on_provider"] == placed["nodes"] and not placed["off_provider"]
    # clamp-mask-fill made the float32-min mask finite: the mask, its Add and the Softmax are
    # integer ops too (the mask path at uint16), nothing computes in float.
    assert verification["float_compute_nodes"] == []
    assert transformer_result.report.transformations["clamp-mask-fill"]["fill"] == -1e4
    fidelity = verification["fidelity"]["outputs"]["y"]
    assert fidelity["within_1_step"] >= 0.7 and fidelity["max_diff_steps"] <= 8


def test_transformer_block_on_qnn_is_as_close_to_float_as_the_cpu_reference(transformer_result):
    """HTP's Softmax, Gelu and LayerNorm round differently from the CPU provider (up to a few
    steps per op), but the result is as accurate: its SQNR against float matches the CPU's."""
    proto = transformer_result.to_proto()
    batches = transformer_batches(2, seed=5)
    float_session = ort.InferenceSession(tiny_transformer().SerializeToString(), providers=["CPUExecutionProvider"])
    cpu = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    qnn = open_session(proto, get_target("qnn-htp"))
    for batch in batches:
        expected = float_session.run(None, batch)[0]
        assert _sqnr(expected, qnn.run(None, batch)[0]) > _sqnr(expected, cpu.run(None, batch)[0]) - 1.5


def test_uint16_matmul_requantization_is_fp16_exact_on_htp(monkeypatch):
    """HTP requantizes a MatMul with input scale x weight scale / output scale rounded to fp16. With
    calibrated scales that moves uint16 outputs by up to ~25 steps; with weight scales of 11
    significant bits and output scale = input scale x 2^k the multiplier is exact and HTP agrees
    with the CPU reference within a step."""
    data = [{"x": np.random.default_rng(i).normal(size=(1, 64, 96)).astype(np.float32)} for i in range(4)]
    config = {**CONFIG, "activation_type": "uint16"}
    target = get_target("qnn-htp")
    with monkeypatch.context() as patch:
        patch.setitem(qcompile.backends._TARGETS, "qnn-htp",
                      dataclasses.replace(target, requantization_significand_bits=None))
        before = qcompile.compile(_matmul_model(), data, target="qnn-htp", config=config)
    after = qcompile.compile(_matmul_model(), data, target="qnn-htp", config=config)
    assert before.report.verification["fidelity"]["outputs"]["y"]["within_1_step"] < 0.5
    fidelity = after.report.verification["fidelity"]["outputs"]["y"]
    assert fidelity["within_1_step"] >= 0.99 and fidelity["max_diff_steps"] <= 2
    # The scales: fp16-exact weight scales, a power of two between the MatMul's input and output.
    proto = after.to_proto()
    constants = _constants(proto)
    producers = {out: node for node in proto.graph.node for out in node.output}
    matmul = next(n for n in proto.graph.node if n.op_type == "MatMul")
    x_scale = constants[producers[matmul.input[0]].input[1]]
    w_scale = constants[producers[matmul.input[1]].input[1]]
    y_scale = constants["y_scale"]
    np.testing.assert_array_equal(w_scale.astype(np.float16).astype(np.float32), w_scale)
    ratio = float(y_scale) / float(x_scale)
    assert ratio == 2.0 ** round(np.log2(ratio))
    calibrated = float(_constants(before.to_proto())["y_scale"])
    assert calibrated <= float(y_scale) < 2 * calibrated  # rounded up: at most 1 bit of resolution


def _constants(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _erf_model():
    """A standalone Erf (not part of a GELU): QNN has no Erf."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "w")
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Erf", ["h"], ["e"], name="lonely_erf"),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="mm2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w],
    )


def test_unsupported_op_is_refused_with_the_node_named():
    data = [{"x": np.random.default_rng(i).normal(size=(2, 8)).astype(np.float32)} for i in range(3)]
    with pytest.raises(PlacementError, match="lonely_erf") as error:
        qcompile.compile(_erf_model(), data, target="qnn-htp", config=CONFIG)
    assert "allow_fallback" in str(error.value)
    # Allowed explicitly: it compiles, and the report names what fell back.
    result = qcompile.compile(_erf_model(), data, target="qnn-htp", config={**CONFIG, "allow_fallback": True})
    off = result.report.verification["placement"]["off_provider"]
    assert "lonely_erf" in {row["name"] for row in off}
    assert {row["provider"] for row in off} == {"CPUExecutionProvider"}


def test_missing_provider_says_what_to_install():
    target = dataclasses.replace(get_target("qnn-htp"), providers=("NoSuchExecutionProvider",),
                                 install_hint="pip install no-such-provider")
    with pytest.raises(ProviderError, match="pip install no-such-provider"):
        open_session(tiny_cnn(batch=1), target)


def test_cli_targets_and_run(cnn_result, tmp_path, capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "qnn-htp:" in out and f"provider: {QNN} (installed, plugin from onnxruntime-qnn" in out
    model = tmp_path / "model.qnn.onnx"
    onnx.save(cnn_result.to_proto(), str(model))
    sample = tmp_path / "sample.npz"
    np.savez(sample, **cnn_batches(1, seed=3)[0])
    assert main(["run", str(model), "--target", "qnn-htp", "--inputs", str(sample)]) == 0
    out = capsys.readouterr().out
    on, total = re.search(rf"(\d+) of (\d+) nodes on {QNN}", out).groups()
    assert on == total and "output logits: float32 [4, 10]" in out


def test_ep_context_model_is_written_and_runs_like_the_qdq_model(tmp_path):
    path = tmp_path / "model_ctx.onnx"
    result = qcompile.compile(tiny_cnn(), cnn_batches(2), target="qnn-htp",
                              config={**CONFIG, "ep_context_path": str(path)})
    written = result.report.verification["ep_context"]["files"]
    binary = tmp_path / "model_ctx_qnn.bin"
    assert set(written) == {str(path), str(binary)} and written[str(binary)] > 0
    context_model = onnx.load(str(path))
    assert [n.op_type for n in context_model.graph.node] == ["EPContext"]
    batch = cnn_batches(1, seed=7)[0]
    target = get_target("qnn-htp")
    expected = open_session(result.to_proto(), target).run(None, batch)[0]
    np.testing.assert_array_equal(open_session(str(path), target).run(None, batch)[0], expected)
