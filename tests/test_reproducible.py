"""Reproducible output (qcompile.core.reproduce): same inputs, same bytes, in any process; the report's
hashes; and `qcompile verify` passing on an artifact and naming what differs when it fails."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from tiny_models import (
    cnn_batches,
    tiny_cnn,
    tiny_lm,
    tiny_transformer,
    transformer_batches,
)

import qcompile
from qcompile.core import reproduce
from qcompile.cli import main
from qcompile.io.loader import load_model

TESTS = Path(__file__).parent


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_batches(directory: Path, batches) -> Path:
    directory.mkdir()
    for i, batch in enumerate(batches):
        np.savez(directory / f"batch_{i:02d}.npz", **batch)
    return directory


@pytest.fixture
def cnn_files(tmp_path):
    """The tiny CNN and 12 .npz calibration batches (one held out for evaluation)."""
    model = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(), str(model))
    return model, _write_batches(tmp_path / "calib", cnn_batches(12))


# Each process compiles three pipelines (the cpu default with smooth-quant, static W8A8 on a
# transformer, INT4 AWQ + GPTQ on a language model), then the CNN again after the others: node names
# and counters must not depend on what ran before in the process, on hash seeds, or on time.
_COMPILE_ALL = """
import sys
from qcompile.cli import main
out, jobs = sys.argv[1], [a.split("|") for a in sys.argv[2:]]
for name, model, calib, *extra in jobs:
    code = main(["compile", model, "--calib", calib, "-o", f"{out}/{name}.onnx", "--report",
                 f"{out}/{name}.json", "--no-latency", "--no-cache", "-q", *extra])
    assert code == 0, name
"""


def test_two_processes_write_identical_bytes(tmp_path, cnn_files):
    """Two fresh processes with different hash seeds compile the same inputs to identical files."""
    cnn, cnn_calib = cnn_files
    transformer, lm = tmp_path / "transformer.onnx", tmp_path / "lm.onnx"
    onnx.save(tiny_transformer(), str(transformer))
    onnx.save(tiny_lm(), str(lm))
    transformer_calib = _write_batches(tmp_path / "transformer_calib", transformer_batches(12))
    rng = np.random.default_rng(0)
    lm_calib = _write_batches(tmp_path / "lm_calib", [{"ids": rng.integers(0, 128, (2, 16))} for _ in range(4)])
    jobs = [f"cnn|{cnn}|{cnn_calib}", f"transformer|{transformer}|{transformer_calib}",
            f"lm|{lm}|{lm_calib}|--recipe|llm-int4", f"cnn-again|{cnn}|{cnn_calib}"]
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"run{seed}"
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        runs.append((out, subprocess.Popen([sys.executable, "-c", _COMPILE_ALL, str(out), *jobs], env=env,
                                           stderr=subprocess.PIPE, text=True)))
    for _, process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    (first, _), (second, _) = runs
    for name in ("cnn", "transformer", "lm"):
        assert (first / f"{name}.onnx").read_bytes() == (second / f"{name}.onnx").read_bytes(), name
        report = json.loads((first / f"{name}.json").read_text())
        assert report["hashes"]["output_model"] == _sha256(first / f"{name}.onnx")
        assert report["hashes"] == json.loads((second / f"{name}.json").read_text())["hashes"]
    assert (first / "cnn-again.onnx").read_bytes() == (first / "cnn.onnx").read_bytes()


def test_report_records_full_hashes(tmp_path, cnn_files):
    """Every input and the output have a full sha256; the output's is the written file's."""
    model, calib = cnn_files
    result = qcompile.compile(str(model), str(calib), config={"measure_latency": False})
    out = tmp_path / "out.onnx"
    result.save(out, report_path=tmp_path / "report.json")
    hashes = json.loads((tmp_path / "report.json").read_text())["hashes"]
    for key in ("input_model", "input_file", "calibration_data", "config", "versions", "qcompile_code",
                "inputs", "output_model"):
        assert len(hashes[key]) == 64 and int(hashes[key], 16) >= 0, key
    assert hashes["output_model"] == _sha256(out)
    assert hashes["input_file"] == _sha256(model)
    assert hashes["input_model"] == reproduce.model_digest(load_model(str(model)))
    # The data's hash is its arrays': a list of the same batches hashes like the directory.
    assert hashes["calibration_data"] == reproduce.data_digest(cnn_batches(12))
    assert hashes["calibration_data"] != reproduce.data_digest(cnn_batches(12, seed=2))


def test_config_hash_covers_what_changes_the_output():
    """The config hash changes with a key passes read, not with how the result is measured or gated."""
    from qcompile.core.config import CompileConfig

    base = reproduce.config_digest(CompileConfig(), "fix-names")
    assert reproduce.config_digest(CompileConfig(activation_type="int8"), "fix-names") != base
    assert reproduce.config_digest(CompileConfig(), "fix-names,shape-inference") != base
    assert reproduce.config_digest(CompileConfig(min_sqnr=30.0, measure_latency=False, cache=False), "fix-names") == base


def test_one_shot_iterator_is_hashed_as_read():
    """A generator of batches cannot be read twice: it is hashed while calibration reads it."""
    result = qcompile.compile(tiny_cnn(), (b for b in cnn_batches(12)), config={"measure_latency": False, "cache": True})
    assert result.report.hashes["calibration_data"] == reproduce.data_digest(cnn_batches(12))
    assert result.report.cache["enabled"] is False and "one-shot" in result.report.cache["why"]


@pytest.mark.parametrize("large", [False, True])
def test_model_digest_does_not_depend_on_where_weights_live(tmp_path, monkeypatch, large):
    """Inline weights or an external data file: the same digest. Large models are hashed tensor by
    tensor (never serialized whole); others as the bytes of the file qcompile writes."""
    if large:
        monkeypatch.setattr(reproduce, "LARGE_MODEL_BYTES", 0)
    proto = tiny_cnn()
    inline = reproduce.model_digest(ir.serde.deserialize_model(proto))
    changed = tiny_cnn()
    changed.graph.initializer[0].raw_data = bytes(len(changed.graph.initializer[0].raw_data))
    assert reproduce.model_digest(ir.serde.deserialize_model(changed)) != inline
    path = tmp_path / "external.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="external.data", size_threshold=0)
    external = load_model(str(path))
    assert isinstance(next(iter(external.graph.initializers.values())).const_value, ir.ExternalTensor)
    assert reproduce.model_digest(external) == inline


# ----- qcompile verify -----

@pytest.fixture
def compiled(tmp_path, cnn_files):
    """A model compiled by the CLI, with its report."""
    model, calib = cnn_files
    out, report = tmp_path / "cnn.int8.onnx", tmp_path / "cnn.int8.report.json"
    assert main(["compile", str(model), "--calib", str(calib), "-o", str(out), "--no-latency", "-q"]) == 0
    return model, calib, out, report


def test_verify_passes_and_compiles_again(compiled, capsys):
    """verify: the file matches its report (exit 0); with --model and --calib, a rebuild matches too."""
    model, calib, out, report = compiled
    assert main(["verify", str(out), "--report", str(report)]) == 0
    assert main(["verify", str(out), "--model", str(model), "--calib", str(calib)]) == 0
    stdout = capsys.readouterr().out
    assert f"ok: {out} has the sha256 the report records" in stdout
    assert "again gives identical bytes" in stdout


def test_verify_fails_on_a_tampered_file(compiled, capsys):
    """A changed byte: exit 2, and the message names the file and both hashes."""
    *_, out, report = compiled
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    out.write_bytes(bytes(data))
    assert main(["verify", str(out), "--report", str(report)]) == 2
    message = capsys.readouterr().err
    assert "not the one this report describes" in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message


def test_verify_fails_on_another_source_model(tmp_path, compiled, capsys):
    model, calib, out, _ = compiled
    other = tmp_path / "other.onnx"
    onnx.save(tiny_cnn(seed=5), str(other))
    assert main(["verify", str(out), "--model", str(other), "--calib", str(calib)]) == 2
    assert "not the model the artifact was compiled from" in capsys.readouterr().err
    assert main(["verify", str(out), "--model", str(model)]) == 2
    assert "pass the same data with --calib" in capsys.readouterr().err


def test_verify_names_what_differs_when_a_rebuild_differs(compiled, capsys):
    """When the rebuild's bytes differ, the message says what differs from the report's compile."""
    model, calib, out, report = compiled
    # Stand-ins for a compile made elsewhere: another output, and an older onnxruntime.
    onnx.save(tiny_cnn(seed=3), str(out))
    data = json.loads(report.read_text())
    data["hashes"]["output_model"] = _sha256(out)
    data["versions"]["onnxruntime"] = "0.0.1"
    report.write_text(json.dumps(data))
    assert main(["verify", str(out), "--model", str(model), "--calib", str(calib)]) == 2
    message = capsys.readouterr().err
    assert "Compiling again gives a model with sha256" in message
    assert "onnxruntime 0.0.1 ->" in message


def test_verify_rejects_a_report_without_hashes(compiled, capsys):
    _, _, out, report = compiled
    data = json.loads(report.read_text())
    del data["hashes"]
    report.write_text(json.dumps(data))
    assert main(["verify", str(out), "--report", str(report)]) == 2
    assert "records no content hashes" in capsys.readouterr().err
