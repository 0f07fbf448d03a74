"""qcompile.analysis.debug: per-layer error analysis, its JSON and HTML reports, and ``qcompile debug``.

The models are tiny graphs built here and compiled by qcompile itself, so the quantized models
have exactly the names and Q/DQ structure that ``insert-qdq`` (and ``smooth-quant``) produce.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import zlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from qcompile.core.graph_edit import Namer, add_initializer
from qcompile.passes.qdq_insertion import dequantize_after_lookup
from tiny_models import make_model, tiny_transformer, transformer_batches

import qcompile
from qcompile.analysis import debug
from qcompile.cli import main
from qcompile.analysis.debug import analyze
from qcompile.errors import CalibrationDataError, ModelError
from qcompile.numerics.qparams import QUANT_TYPES, lookup_qparams

# No smooth-quant: the quantized tensors keep the float model's names, so the test can read the
# float values straight from the float model.
PLAIN_PIPELINE = ["fix-names", "shape-inference", "plan-quantization", "calibrate(method=minmax)", "insert-qdq"]


def two_branch(seed: int = 0) -> onnx.ModelProto:
    """y = (x @ w_x + z @ w_z) @ w_out: two inputs, each quantized where a MatMul reads it."""
    rng = np.random.default_rng(seed)

    def init(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    def io(name, width):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width])

    nodes = [
        helper.make_node("MatMul", ["x", "w_x"], ["p"], name="branch_x"),
        helper.make_node("MatMul", ["z", "w_z"], ["q"], name="branch_z"),
        helper.make_node("Add", ["p", "q"], ["s"], name="merge"),
        helper.make_node("MatMul", ["s", "w_out"], ["y"], name="head"),
    ]
    return make_model(nodes, [io("x", 16), io("z", 16)], [io("y", 8)],
                      [init("w_x", 16, 16), init("w_z", 16, 16), init("w_out", 16, 8)])


def branch_batches(count: int, seed: int, outlier: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = [{name: rng.normal(0, 1, (8, 16)).astype(np.float32) for name in ("x", "z")} for _ in range(count)]
    if outlier:
        batches[0]["z"][0, 3] = 1000.0  # one calibration value: z's minmax range, and its scale, explode
    return batches


@pytest.fixture(scope="module")
def sensitive():
    """(float, quantized): z was calibrated on data with one huge outlier, so its scale is ~150x
    too large for ordinary data; x was calibrated normally."""
    float_model = two_branch()
    result = qcompile.compile(float_model, branch_batches(4, seed=1, outlier=True),
                              config={"pipeline": PLAIN_PIPELINE, "measure_latency": False})
    return float_model, result.to_proto()


def outlier_channel_batches(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """The tiny transformer's batches with one input channel 30x the others: what SmoothQuant is for."""
    batches = transformer_batches(count, seed=seed)
    for batch in batches:
        batch["x"][..., 3] *= 30.0
    return batches


@pytest.fixture(scope="module")
def transformer():
    """(float, quantized) tiny transformer block, default cpu pipeline: smooth-quant rescales some
    MatMul inputs (new ``*_smoothed`` tensors) and their weights' rows."""
    float_model = tiny_transformer()
    result = qcompile.compile(float_model, outlier_channel_batches(6), config={"measure_latency": False})
    return float_model, result.to_proto()


@pytest.fixture(scope="module")
def transformer_report(transformer):
    return analyze(*transformer, outlier_channel_batches(3, seed=5))


def test_outlier_scaled_tensor_ranks_worst(sensitive):
    """The tensor whose scale an outlier blew up is the worst by isolated SQNR; a graph input's
    accumulated SQNR equals its isolated one (nothing upstream); the healthy input is fine."""
    report = analyze(*sensitive, branch_batches(3, seed=2))
    by_name = {t.tensor: t for t in report.tensors}
    assert set(by_name) == {"x", "z", "s"}
    worst = report.worst(1)[0]
    assert worst.tensor == "z"
    assert worst.isolated_sqnr_db < 5 and by_name["x"].isolated_sqnr_db > 35
    assert worst.isolated_sqnr_db == pytest.approx(worst.accumulated_sqnr_db, abs=1e-3)
    # Its grid is far wider than its values: a handful of levels in use, nothing clipped.
    assert worst.grid_steps_used < 5 and worst.clipped_fraction == 0
    assert worst.scale > 100 * by_name["x"].scale
    # Downstream of z, the accumulated error is at least as bad as z's own rounding.
    assert by_name["s"].accumulated_sqnr_db < 10
    assert report.outputs["y"]["sqnr_db"] < 10
    assert {w.float_name for w in report.weights} == {"w_x", "w_z", "w_out"}
    assert all(w.match == "same" and w.worst_channel_sqnr_db > 30 for w in report.weights)


def test_outlier_fraction_counts_values_beyond_six_standard_deviations(sensitive):
    batches = branch_batches(3, seed=2)
    batches[1]["x"][[0, 2, 5], [1, 7, 9]] = 50.0  # 3 of 384 values; the standard deviation becomes ~4.5
    x = next(t for t in analyze(*sensitive, batches).tensors if t.tensor == "x")
    assert x.outlier_fraction == pytest.approx(3 / 384)
    assert x.max == 50.0 and x.clipped_fraction == pytest.approx(3 / 384)


def _qdq_pairs(quant: onnx.ModelProto) -> dict[str, tuple[str, float, int]]:
    """tensor -> (DequantizeLinear output, scale, zero point), read from the proto by hand."""
    inits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    dq_of = {n.input[0]: n.output[0] for n in quant.graph.node if n.op_type == "DequantizeLinear"}
    return {n.input[0]: (dq_of[n.output[0]], float(inits[n.input[1]]), int(inits[n.input[2]]))
            for n in quant.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def _session(proto: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs if n not in known)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_streamed_sums_equal_a_computation_over_all_data_at_once(sensitive, monkeypatch):
    """Streaming (one tensor per session, batches cut into chunks of 3 samples) gives the SQNRs that
    numpy computes over all activations concatenated, with the definitions written out here."""
    float_model, quant = sensitive
    batches = branch_batches(4, seed=3)
    exposed = []
    original = debug.make_session

    def spy(proto, **kwargs):
        exposed.append(len(proto.graph.output))
        return original(proto, **kwargs)

    monkeypatch.setattr(debug, "make_session", spy)
    streamed = analyze(float_model, quant, batches, group_size=1, chunk=3)
    assert streamed.run["groups"] == 3 and streamed.run["max_tensors_per_session"] == 1
    # One tensor per session, plus the graph output on the first group's.
    assert max(exposed) <= 1 + len(quant.graph.output)

    pairs = _qdq_pairs(quant)
    names = sorted(pairs)
    float_session = _session(float_model, names)
    quant_session = _session(quant, [pairs[n][0] for n in names])
    values = {n: ([], [], []) for n in names}
    for batch in batches:
        reference = float_session.run(names, batch)
        quantized = quant_session.run([pairs[n][0] for n in names], batch)
        for name, x, y in zip(names, reference, quantized):
            _, scale, zero_point = pairs[name]
            rounded = (np.clip(np.rint(x / np.float32(scale)) + zero_point, 0, 255) - zero_point) * np.float32(scale)
            for store, array in zip(values[name], (x, y, rounded)):
                store.append(array.astype(np.float64).ravel())
    for tensor in streamed.tensors:
        x, y, rounded = (np.concatenate(parts) for parts in values[tensor.tensor])
        assert tensor.count == x.size
        assert tensor.accumulated_sqnr_db == pytest.approx(10 * math.log10((x @ x) / ((x - y) @ (x - y))), abs=2e-3)
        assert tensor.isolated_sqnr_db == pytest.approx(10 * math.log10((x @ x) / ((x - rounded) @ (x - rounded))), abs=2e-3)
        # Saturated: beyond the grid by more than half a step.
        _, scale, zero_point = pairs[tensor.tensor]
        low, high = (0 - zero_point - 0.5) * scale, (255 - zero_point + 0.5) * scale
        assert tensor.clipped_fraction == pytest.approx(np.mean((x < low) | (x > high)))
        assert tensor.min == pytest.approx(x.min()) and tensor.max == pytest.approx(x.max())
    assert any(t.clipped_fraction > 0 for t in streamed.tensors)  # the check above is not vacuous
    whole = analyze(float_model, quant, batches, group_size=64, chunk=0)
    assert [dataclass_dict(t) for t in whole.tensors] == [dataclass_dict(t) for t in streamed.tensors]


def dataclass_dict(tensor) -> dict:
    """A tensor's results, with the float statistics rounded: summation order differs by grouping."""
    out = {}
    for key, value in vars(tensor).items():
        out[key] = round(value, 4) if isinstance(value, float) and math.isfinite(value) else value
    return out


def test_transformer_reference_undoes_smoothing(transformer, transformer_report):
    """SmoothQuant renames and rescales tensors: the reference still computes the float model's
    outputs, every smoothed weight is matched to its float original up to the row scaling, and
    the tensors smooth-quant created (``*_smoothed``) get a float value."""
    report = transformer_report
    assert report.reference["outputs_vs_float"]["y"]["sqnr_db"] > 45
    assert report.reference["weights_without_float_original"] == []
    assert report.reference["weights_rescaled"] >= 1
    rescaled = [w for w in report.weights if w.match.startswith("rescaled")]
    assert all(w.worst_channel_sqnr_db > 30 for w in rescaled)
    smoothed = [t for t in report.tensors if t.tensor.endswith("_smoothed")]
    assert smoothed and all(t.accumulated_sqnr_db is not None and t.accumulated_sqnr_db > 15 for t in smoothed)
    assert [t.index for t in report.tensors] == list(range(len(report.tensors)))
    # Every quantized activation of the model is analysed, in the model's node order.
    assert [t.tensor for t in report.tensors] == list(_qdq_pairs(transformer[1]))


@pytest.mark.parametrize("columns, block", [(16, None), (64, 32)])
def test_embedding_stored_as_int8_rows_is_compared_with_its_float_table(columns, block):
    """A table stored as int8 rows (scales per row, or per block of 32 columns for a row of 64) and
    dequantized after the lookup (what insert-qdq does to an embedding) is a quantized constant too:
    matched to the float table, one channel per row; the reference gathers from the float table
    again. No activation is quantized: only the outputs."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    float_model = make_model(
        nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])],
        [numpy_helper.from_array(rng.normal(0, 1, (50, columns)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.normal(0, 0.3, (columns, 8)).astype(np.float32), "w")])
    model = ir.serde.deserialize_model(float_model)
    gather = next(n for n in model.graph if n.op_type == "Gather")
    stored = lookup_qparams(gather.inputs[0].const_value.numpy(), QUANT_TYPES["int8"])
    assert stored.block == block
    namer = Namer(model.graph)
    dequantize_after_lookup(model.graph, gather, stored, namer, lambda base, array: add_initializer(model.graph, base, array, namer))
    assert ("Reshape" in [n.op_type for n in model.graph]) == (block is not None)
    data = [{"ids": rng.integers(0, 50, (4, 6)).astype(np.int64)} for _ in range(3)]
    report = analyze(float_model, ir.serde.serialize_model(model), data)
    (lookup,) = report.weights
    assert (lookup.kind, lookup.float_name, lookup.match, lookup.channels) == ("lookup table", "table", "same", 50)
    assert 35 < lookup.worst_channel_sqnr_db <= lookup.mean_channel_sqnr_db
    assert report.tensors == [] and report.reference["outputs_vs_float"]["y"]["sqnr_db"] == math.inf
    assert 30 < report.outputs["y"]["sqnr_db"] < 60 and report.batches == 3


def test_json_schema(transformer_report):
    data = json.loads(transformer_report.to_json())
    assert data["schema"] == "qcompile.analysis.debug/1"
    for key in ("float_model", "quant_model", "data", "batches", "definitions", "outputs", "reference", "run",
                "worst", "worst_accumulated", "tensors", "worst_weights", "weights"):
        assert key in data, key
    tensors = data["tensors"]
    assert sorted(data["worst"]) == sorted(t["tensor"] for t in tensors) == sorted(data["worst_accumulated"])
    assert [t["index"] for t in tensors] == sorted(t["index"] for t in tensors)
    isolated = {t["tensor"]: t["isolated_sqnr_db"] for t in tensors}
    assert [isolated[n] for n in data["worst"]] == sorted(isolated.values())

    def number(value):
        return isinstance(value, (int, float)) or value in ("inf", "-inf")

    for t in tensors:
        for key in ("accumulated_sqnr_db", "isolated_sqnr_db", "clipped_fraction", "outlier_fraction", "scale",
                    "min", "max", "mean", "std", "dynamic_range", "grid_min", "grid_max", "count"):
            assert number(t[key]), (key, t[key])
        assert isinstance(t["tensor"], str) and isinstance(t["consumer_ops"], list) and t["qtype"] == "uint8"
        assert 0 <= t["clipped_fraction"] <= 1 and 0 <= t["outlier_fraction"] <= 1
        assert len(t["histogram"]["counts"]) == debug.HISTOGRAM_BINS and sum(t["histogram"]["counts"]) == t["count"]
    for w in data["weights"]:
        for key in ("name", "float_name", "match", "shape", "channels", "sqnr_db", "worst_channel", "worst_channel_sqnr_db",
                    "mean_channel_sqnr_db"):
            assert key in w, key
        assert w["worst_channel_sqnr_db"] <= w["mean_channel_sqnr_db"]


def test_user_errors_name_the_fix(sensitive, tmp_path):
    float_model, quant = sensitive
    with pytest.raises(ModelError, match="no QuantizeLinear"):
        analyze(float_model, float_model, branch_batches(1, seed=2))
    with pytest.raises(CalibrationDataError, match="missing input"):
        analyze(float_model, quant, [{"x": np.zeros((2, 16), np.float32)}])
    with pytest.raises(ModelError, match="inputs"):
        analyze(tiny_transformer(), quant, branch_batches(1, seed=2))
    # Same interface, different weights: with its quantization undone QUANT does not compute FLOAT.
    with pytest.raises(ModelError, match="compiled from"):
        analyze(two_branch(seed=7), quant, branch_batches(1, seed=2))
    with pytest.raises(CalibrationDataError, match="no .npz"):
        analyze(float_model, quant, tmp_path)


def test_cli_writes_html_and_json(sensitive, tmp_path, capsys):
    float_model, quant = sensitive
    onnx.save(float_model, str(tmp_path / "float.onnx"))
    onnx.save(quant, str(tmp_path / "quant.onnx"))
    data = tmp_path / "data"
    data.mkdir()
    for i, batch in enumerate(branch_batches(2, seed=2)):
        np.savez(data / f"batch_{i}.npz", **batch)
    html_path, json_path = tmp_path / "report.html", tmp_path / "report.json"
    args = ["debug", str(tmp_path / "float.onnx"), str(tmp_path / "quant.onnx"), "--data", str(data),
            "--out", str(html_path), "--json", str(json_path), "--group-size", "2"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "worst activations" in stdout and "\n    1 z " in stdout
    assert json.loads(json_path.read_text())["worst"][0] == "z"
    assert html_path.read_text().startswith("<!DOCTYPE html>")
    # One .npz file works too; a QUANT without Q/DQ is a usage error (exit 2) that says so.
    assert main(["debug", str(tmp_path / "float.onnx"), str(tmp_path / "quant.onnx"), "--data", str(data / "batch_0.npz"),
                 "-q"]) == 0
    assert main(["debug", str(tmp_path / "float.onnx"), str(tmp_path / "float.onnx"), "--data", str(data)]) == 2
    assert "no QuantizeLinear" in capsys.readouterr().err


def test_html_is_self_contained(transformer_report):
    page = transformer_report.to_html()
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert page.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0
    assert page.count("<svg") == 1 + min(6, len(transformer_report.tensors))
    assert transformer_report.worst(1)[0].tensor in page


# ----------------------------------------------------------------------------- a real browser

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
BLUE, ORANGE = (0x1F, 0x6F, 0xB2), (0xE0, 0x7B, 0x00)  # debug_html's accumulated / isolated lines


def read_png(data: bytes, max_rows: int | None = None) -> tuple[tuple[int, int], np.ndarray]:
    """((width, height), the first ``max_rows`` rows as uint8 [rows, width, channels]) of an 8-bit
    RGB/RGBA non-interlaced PNG: what a headless Chromium writes. PNG filters undone row by row."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    channels = 3 if color == 2 else 4
    stride = width * channels
    rows = height if max_rows is None else min(height, max_rows)
    raw = zlib.decompressobj().decompress(b"".join(idat), rows * (stride + 1))
    previous = np.zeros(stride, np.uint8)
    image = np.empty((rows, stride), np.uint8)
    for r in range(rows):
        kind = raw[r * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, r * (stride + 1) + 1)
        if kind == 0:
            current = line.copy()
        elif kind == 1:  # Sub: a running sum per channel, modulo 256
            current = np.cumsum(line.reshape(-1, channels), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            current = line + previous
        else:  # Average, Paeth: each byte needs the one reconstructed just before it
            out, up = bytearray(line.tobytes()), previous.tobytes()
            for i in range(stride):
                left = out[i - channels] if i >= channels else 0
                upper_left = up[i - channels] if i >= channels else 0
                if kind == 3:
                    predicted = (left + up[i]) >> 1
                else:
                    p = left + up[i] - upper_left
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upper_left)
                    predicted = left if pa <= pb and pa <= pc else up[i] if pb <= pc else upper_left
                out[i] = (out[i] + predicted) & 255
            current = np.frombuffer(bytes(out), np.uint8)
        image[r] = current
        previous = current
    return (width, height), image.reshape(rows, width, channels)


def _has_color(pixels: np.ndarray, color: tuple[int, int, int], tolerance: int = 12) -> int:
    return int(np.count_nonzero((np.abs(pixels[..., :3].astype(int) - color) <= tolerance).all(axis=-1)))


def test_report_renders_in_a_real_browser(transformer_report, tmp_path):
    """Headless Chromium draws the page: a PNG of the window's size, not blank, with both SQNR
    lines of the plot in it."""
    browser = next((path for path in map(shutil.which, _BROWSERS) if path), None)
    if browser is None:
        pytest.skip("no Chromium/Chrome binary on PATH (apt-get install chromium) to render the HTML report")
    page = tmp_path / "report.html"
    page.write_text(transformer_report.to_html())
    shot = tmp_path / "report.png"
    width, height = 1000, 1200
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
         f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},{height}", f"--screenshot={shot}",
         page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    assert shot.is_file()
    size, pixels = read_png(shot.read_bytes(), max_rows=700)  # the summary and the SQNR plot
    assert size == (width, height)
    ink = (pixels[..., :3] < 235).any(axis=-1).mean()
    assert ink > 0.02, f"only {ink:.1%} of the top of the page is not white"
    assert _has_color(pixels, BLUE) > 200 and _has_color(pixels, ORANGE) > 200


def test_a_weight_before_batchnorm_folding_is_not_taken_as_the_original():
    """PP-OCR's direction classifier: a Conv's weight before BatchNorm folding was 10.6 dB from
    its folded, quantized form and was taken as the original, so the reference (quantization
    undone) computed another function and the analysis (and recovery's ranking) refused the model
    as "not a quantization of FLOAT". An 8-bit weight must match to within what 8 bits give."""
    rng = np.random.default_rng(0)
    channels = 16
    weight = rng.normal(0, 0.3, (channels, 8, 1, 1)).astype(np.float32)
    gamma = (1 + rng.normal(0, 0.2, channels)).astype(np.float32)  # folded weight ~14 dB from W
    beta = rng.normal(0, 1.0, channels).astype(np.float32)
    mean = rng.normal(0, 1.0, channels).astype(np.float32)
    var = np.ones(channels, np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((weight, "W"), (gamma, "g"), (beta, "b"), (mean, "m"), (var, "v"))]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])], inits)
    batches = [{"x": rng.normal(0, 1, (1, 8, 6, 6)).astype(np.float32)} for _ in range(3)]
    result = qcompile.compile(proto, batches, config={"measure_latency": False})
    assert "BatchNormalization" not in {n.op_type for n in result.to_proto().graph.node}
    report = analyze(proto, result.to_proto(), batches)
    conv_weight = next(w for w in report.weights if w.kind == "weight")
    assert conv_weight.float_name is None and conv_weight.match == "not found"


def test_the_html_renderer_does_not_import_the_debugger():
    """debug_html renders the report qcompile.analysis.debug builds and imports nothing of it at run time:
    the two modules imported each other (one of issue 18's import circles)."""
    import subprocess
    import sys

    code = "import sys, qcompile.analysis.debug_html; print('qcompile.analysis.debug' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
