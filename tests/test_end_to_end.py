"""Compile a tiny CNN and a tiny transformer block end to end, as a user would."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tiny_models import cnn_batches, tiny_cnn, tiny_transformer, transformer_batches

import qcompile

CASES = {
    # model, data, SQNR floor (dB) measured well above: 38-41 dB (CNN), 31-32 dB (transformer).
    "cnn": (tiny_cnn, lambda: cnn_batches(20), 30.0),
    "transformer": (tiny_transformer, lambda: transformer_batches(20), 25.0),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def compiled(request, tmp_path_factory):
    build, data, floor = CASES[request.param]
    proto = build()
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    onnx.save(proto, path)
    before = path.read_bytes()
    result = qcompile.compile(str(path), data(), target="cpu", config={"latency_runs": 3})
    out = path.with_suffix(".int8.onnx")
    result.save(out)
    assert path.read_bytes() == before, "the input model was modified"
    return request.param, result, onnx.load(out), floor


def test_output_passes_checker_and_runs(compiled):
    name, _, model, _ = compiled
    onnx.checker.check_model(model, full_check=True)
    data = cnn_batches(1) if name == "cnn" else transformer_batches(1)
    out = ort.InferenceSession(model.SerializeToString()).run(None, data[0])
    assert all(np.isfinite(o).all() for o in out)


def test_weights_are_stored_as_int8(compiled):
    _, _, model, _ = compiled
    types = {i.data_type for i in model.graph.initializer if len(i.dims) >= 2}
    assert types == {onnx.TensorProto.INT8}, "every matrix/kernel should be stored as int8"


def test_sqnr_stays_above_the_bound(compiled):
    _, result, _, floor = compiled
    outputs = result.report.evaluation["outputs"]
    assert outputs and all(m["sqnr_db"] >= floor for m in outputs.values()), outputs


def test_every_quantized_anchor_becomes_an_integer_kernel(compiled):
    _, result, _, _ = compiled
    fusion = result.report.fusion
    assert fusion["quantized_anchors"] > 0
    assert fusion["unfused_quantized_anchors"] == []
    assert sum(fusion["integer_kernels"].values()) >= fusion["quantized_anchors"]


def test_report_has_timings_sizes_and_versions(compiled):
    _, result, _, _ = compiled
    report = result.report.to_dict()
    assert [p["name"] for p in report["passes"]] == report["pipeline"].split(",")
    assert report["size"]["quantized_bytes"] > 0 and report["versions"]["onnxruntime"] == ort.__version__
    assert "float" in report["latency"] and "quantized" in report["latency"]
    assert str(result.report).startswith("qcompile")


def test_cnn_fusion_covers_convs_gemm_and_add():
    result = qcompile.compile(tiny_cnn(), cnn_batches(10), config={"measure_latency": False})
    kernels = result.report.fusion["integer_kernels"]
    assert kernels.get("QLinearConv") == 3 and kernels.get("QGemm") == 1 and kernels.get("QLinearAdd") == 1


def test_api_accepts_a_directory_of_npz(tmp_path):
    for i, batch in enumerate(cnn_batches(3)):
        np.savez(tmp_path / f"b{i}.npz", **batch)
    result = qcompile.compile(tiny_cnn(), str(tmp_path), config={"measure_latency": False})
    assert result.report.calibration["batches"] == 3


def test_a_model_that_grows_when_quantized_is_reported_not_shipped_silently():
    # A 4x4 MatMul: its 64 weight bytes are fewer than the scales and Q/DQ nodes quantization adds.
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 7 - 1, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx's default (IR 14 with onnx 1.23) is newer than ONNX Runtime 1.31 reads
    batches = [{"x": np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32)} for i in range(4)]
    result = qcompile.compile(model, batches, config={"measure_latency": False})
    size = result.report.size
    assert size["quantized_bytes"] > size["float_bytes"]
    assert any("larger than the float model" in w for w in result.report.warnings)
    assert f"{size['float_bytes']} bytes ->" in str(result.report)
