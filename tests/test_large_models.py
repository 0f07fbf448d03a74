"""Models too large for one protobuf: weights stay in files from load to save (qcompile.io.workspace).

The threshold is lowered so a model of a few hundred kilobytes takes the large-model path; the
real 3 GB case is ``python -m benchmarks.large_model --gb 3`` (peak memory against weight size).
"""

import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qcompile
from benchmarks.large_model import write_calibration, write_large_model
from qcompile import api
from qcompile.io import workspace
from qcompile.errors import ModelError

WIDTH = 64


@pytest.fixture
def large(tmp_path):
    model = write_large_model(tmp_path / "model", total_bytes=6 * WIDTH * WIDTH * 4, width=WIDTH)
    calib = write_calibration(tmp_path / "calib", width=WIDTH, batches=3, rows=8)
    return model, calib


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_large_path_keeps_weights_on_disk_and_matches_the_in_memory_compile(large, tmp_path, monkeypatch, caplog):
    model, calib = large
    before = _digest(model.parent)
    small = qcompile.compile(str(model), str(calib), config={"measure_latency": False})
    small.save(tmp_path / "small.onnx")

    monkeypatch.setattr(workspace, "LARGE_MODEL_BYTES", 1024)
    monkeypatch.setattr(api, "LARGE_MODEL_BYTES", 1024)
    monkeypatch.setattr(workspace, "SPILL_MIN_BYTES", 1024)
    with caplog.at_level(logging.DEBUG, logger="qcompile"):
        result = qcompile.compile(str(model), str(calib), config={"measure_latency": False})
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "weights stay on disk" in messages
    assert "spilled" in messages  # rewritten weights went to the workspace before each session
    folder = next(Path(r.getMessage().split(" in ")[-1]) for r in caplog.records if "weights stay on disk" in r.getMessage())
    assert folder.is_dir()
    # The quantized weights are references into the workspace, not bytes in memory...
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in result.model.graph.initializers.values())
    # ...yet the saved model stands on its own, and computes what the in-memory compile computes.
    result.save(tmp_path / "large.onnx")
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(tmp_path / "large.onnx"), load_external_data=False).graph.initializer)
    x = np.random.default_rng(3).standard_normal((5, WIDTH), dtype=np.float32)
    np.testing.assert_array_equal(_outputs(tmp_path / "large.onnx", x), _outputs(tmp_path / "small.onnx", x))
    assert result.report.evaluation["outputs"] == small.report.evaluation["outputs"]
    assert _digest(model.parent) == before  # the input model and its data file are untouched
    del result
    assert not folder.exists()  # the workspace goes with the result


def test_models_over_the_inline_limit_are_saved_with_external_data(large, tmp_path, monkeypatch):
    model, calib = large
    monkeypatch.setattr(api, "_INLINE_LIMIT", 1024)
    result = qcompile.compile(str(model), str(calib), config={"measure_latency": False})
    out = tmp_path / "out" / "model.int8.onnx"
    out.parent.mkdir()
    result.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.int8.onnx", "model.int8.onnx.data"]
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(str(out))
    x = np.ones((2, WIDTH), np.float32)
    np.testing.assert_allclose(_outputs(out, x), ort.InferenceSession(result.to_proto().SerializeToString()).run(None, {"x": x})[0])


def test_a_truncated_external_data_file_is_named(large):
    model, calib = large
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"model\.onnx\.data.*Copy the model's external data files completely"):
        qcompile.compile(str(model), str(calib))


def test_a_missing_external_data_file_is_named(large):
    model, calib = large
    (model.parent / "model.onnx.data").unlink()
    with pytest.raises(ModelError, match="model.onnx.data"):
        qcompile.compile(str(model), str(calib))
