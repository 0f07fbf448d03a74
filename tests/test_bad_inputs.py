"""Every bad input is a specific QcompileError that names the problem, and leaves no trace.

Each test checks four things: the exact error class, a message fragment that names the problem,
an input model file that is byte-identical afterwards, and no new file anywhere under tmp_path
(no output model, no report, no half-written temp file).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tiny_models import cnn_batches, tiny_cnn

import qcompile
from qcompile.cli import main
from qcompile.errors import (
    AccuracyGateError,
    CalibrationDataError,
    ConfigError,
    ModelError,
    OutputError,
    PipelineError,
    QcompileError,
)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out.onnx"


def _files(root):
    return sorted(p for p in root.rglob("*"))


def rejects(error_type, model, data, out, **kwargs) -> str:
    """Compile and save; assert ``error_type`` exactly, the model untouched and nothing written.

    Returns the error message for the caller's own assertions.
    """
    before = model.read_bytes() if model.exists() else None
    files_before = _files(out.parent)
    with pytest.raises(QcompileError) as info:
        result = qcompile.compile(str(model), data, **kwargs)
        result.save(out, report_path=out.with_name("report.json"))
    assert type(info.value) is error_type, f"expected {error_type.__name__}, got {type(info.value).__name__}: {info.value}"
    if before is None:
        assert not model.exists()
    else:
        assert model.read_bytes() == before
    assert not out.exists()
    assert _files(out.parent) == files_before
    return str(info.value)


# --- the model -------------------------------------------------------------------------------


def test_nonexistent_model_path(tmp_path, out):
    """A model path that does not exist is a ModelError naming the path."""
    missing = tmp_path / "no_such_model.onnx"
    message = rejects(ModelError, missing, cnn_batches(2), out)
    assert "no_such_model.onnx" in message
    assert "does not exist" in message


def test_truncated_onnx_file(tmp_path, out):
    """The first half of a valid model's bytes is a ModelError saying the file is not readable."""
    path = tmp_path / "truncated.onnx"
    data = tiny_cnn().SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    message = rejects(ModelError, path, cnn_batches(2), out)
    assert "truncated.onnx" in message
    assert "not a readable ONNX model" in message


def test_random_bytes_file(tmp_path, out):
    """A file of random bytes is a ModelError saying the file is not readable."""
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    message = rejects(ModelError, path, cnn_batches(2), out)
    assert "random.onnx" in message
    assert "not a readable ONNX model" in message


def test_model_failing_onnx_checker(tmp_path, out):
    """A model onnx.checker rejects (a node reads an undefined value) is a ModelError naming the value and node."""
    model = tiny_cnn()
    model.graph.node[0].input[1] = "undefined_weight"
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    path = tmp_path / "invalid.onnx"
    onnx.save(model, str(path))
    message = rejects(ModelError, path, cnn_batches(2), out)
    assert "not a valid ONNX model" in message
    assert "undefined_weight" in message
    assert "conv1" in message  # the message ends "fix the node named above": it must name it


# --- calibration data ------------------------------------------------------------------------


def test_calibration_directory_missing(tmp_path, model_path, out):
    """A calibration directory that does not exist is a CalibrationDataError naming it."""
    message = rejects(CalibrationDataError, model_path, tmp_path / "no_such_calib", out)
    assert "no_such_calib" in message
    assert "not a directory" in message


def test_calibration_directory_empty(tmp_path, model_path, out):
    """A calibration directory without .npz files is a CalibrationDataError naming it."""
    empty = tmp_path / "empty_calib"
    empty.mkdir()
    message = rejects(CalibrationDataError, model_path, empty, out)
    assert "empty_calib" in message
    assert "no .npz files" in message


def test_corrupt_npz(tmp_path, model_path, out):
    """A .npz file that is not a zip archive is a CalibrationDataError naming the file."""
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "batch_00.npz", **cnn_batches(1)[0])
    (calib / "batch_01.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    message = rejects(CalibrationDataError, model_path, calib, out)
    assert "batch_01.npz" in message


def test_batch_missing_input(model_path, out):
    """A batch without the model's input 'x' is a CalibrationDataError naming 'x' as missing."""
    message = rejects(CalibrationDataError, model_path, [{}], out)
    assert "missing" in message
    assert "'x'" in message


def test_batch_unknown_input_name(model_path, out):
    """A batch with a name the model has no input for is a CalibrationDataError naming it."""
    batch = {**cnn_batches(1)[0], "pixels": np.zeros((4, 3, 16, 16), np.float32)}
    message = rejects(CalibrationDataError, model_path, [batch], out)
    assert "unknown" in message
    assert "'pixels'" in message


def test_batch_wrong_dtype(model_path, out):
    """A float64 array for a float32 input is a CalibrationDataError naming both dtypes."""
    batch = {"x": cnn_batches(1)[0]["x"].astype(np.float64)}
    message = rejects(CalibrationDataError, model_path, [batch], out)
    assert "'x'" in message
    assert "float64" in message and "float32" in message


def test_batch_wrong_rank(model_path, out):
    """A rank-3 array for a rank-4 input is a CalibrationDataError naming the ranks."""
    message = rejects(CalibrationDataError, model_path, [{"x": np.zeros((3, 16, 16), np.float32)}], out)
    assert "'x'" in message
    assert "rank 3" in message and "rank 4" in message


def test_batch_wrong_static_dim(model_path, out):
    """A width of 15 for a static dimension of 16 is a CalibrationDataError naming the axis."""
    message = rejects(CalibrationDataError, model_path, [{"x": np.zeros((4, 3, 15, 16), np.float32)}], out)
    assert "'x'" in message
    assert "axis 2 must be 16" in message


def test_batch_with_nan(model_path, out):
    """A NaN in the second batch is a CalibrationDataError naming the input and the batch."""
    batches = cnn_batches(3)
    batches[1]["x"][0, 0, 0, 0] = np.nan
    message = rejects(CalibrationDataError, model_path, batches, out)
    assert "'x'" in message
    assert "batch 1" in message
    assert "NaN" in message


def test_single_dict_instead_of_list(model_path, out):
    """One dict where a list of dicts belongs is a CalibrationDataError that says so."""
    message = rejects(CalibrationDataError, model_path, cnn_batches(1)[0], out)
    assert "single mapping" in message


# --- configuration ---------------------------------------------------------------------------


def test_unknown_config_key_suggests_closest(model_path, out):
    """A misspelt config key is a ConfigError naming it and suggesting the right one."""
    message = rejects(ConfigError, model_path, cnn_batches(2), out, config={"calibraton_method": "minmax"})
    assert "'calibraton_method'" in message
    assert "Did you mean 'calibration_method'" in message


def test_unknown_config_key_in_toml_file(tmp_path, model_path, out):
    """A misspelt key in qcompile.toml is a ConfigError naming the key and the file."""
    toml = tmp_path / "qcompile.toml"
    toml.write_text('calibraton_method = "minmax"\n')
    message = rejects(ConfigError, model_path, cnn_batches(2), out, config=toml)
    assert "'calibraton_method'" in message
    assert "qcompile.toml" in message
    assert "Did you mean 'calibration_method'" in message


def test_bad_calibration_method(model_path, out):
    """An unknown calibration_method is a ConfigError naming the value and the valid ones."""
    message = rejects(ConfigError, model_path, cnn_batches(2), out, config={"calibration_method": "median"})
    assert "'median'" in message
    assert "minmax" in message


def test_unknown_target(model_path, out):
    """An unknown target is a ConfigError naming it and the known targets."""
    message = rejects(ConfigError, model_path, cnn_batches(2), out, target="tpu")
    assert "'tpu'" in message
    assert "cpu" in message


# --- pipeline --------------------------------------------------------------------------------


def test_unknown_pass_suggests_closest(model_path, out):
    """A misspelt pass name is a PipelineError naming it and suggesting the right one."""
    message = rejects(PipelineError, model_path, cnn_batches(2), out, config={"pipeline": ["fix-names,calibrat"]})
    assert "'calibrat'" in message
    assert "Did you mean 'calibrate'" in message


def test_unknown_pass_option(model_path, out):
    """An option a pass does not have is a PipelineError naming the option and the valid ones."""
    message = rejects(PipelineError, model_path, cnn_batches(2), out, config={"pipeline": ["calibrate(methd=mse)"]})
    assert "methd" in message
    assert "method" in message.replace("methd", "")


def test_insert_qdq_without_calibrate(model_path, out):
    """insert-qdq after plan-quantization with no calibrate between is a PipelineError naming calibrate."""
    pipeline = ["shape-inference,plan-quantization,insert-qdq"]
    message = rejects(PipelineError, model_path, cnn_batches(2), out, config={"pipeline": pipeline})
    assert "insert-qdq" in message
    assert "'calibrate'" in message


# --- output ----------------------------------------------------------------------------------


def test_output_directory_missing_in_save(tmp_path, model_path):
    """CompileResult.save into a folder that does not exist is an OutputError naming the folder."""
    before = model_path.read_bytes()
    result = qcompile.compile(str(model_path), cnn_batches(2), config={"measure_latency": False})
    target = tmp_path / "no_such_dir" / "out.onnx"
    with pytest.raises(QcompileError) as info:
        result.save(target, report_path=target.with_name("report.json"))
    assert type(info.value) is OutputError
    assert "no_such_dir" in str(info.value)
    assert not target.parent.exists()
    assert model_path.read_bytes() == before


def test_output_directory_missing_in_cli(tmp_path, model_path, capsys):
    """`qcompile compile -o missing_dir/out.onnx` exits 2 with an OutputError message naming the folder."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, batch in enumerate(cnn_batches(2)):
        np.savez(calib / f"batch_{i:02d}.npz", **batch)
    before = model_path.read_bytes()
    target = tmp_path / "no_such_dir" / "out.onnx"
    files_before = _files(tmp_path)
    code = main(["compile", str(model_path), "--calib", str(calib), "-o", str(target), "--no-latency", "-q"])
    err = capsys.readouterr().err
    assert code == OutputError.exit_code == 2
    assert "qcompile: error:" in err
    assert "no_such_dir" in err
    assert "Traceback" not in err
    assert model_path.read_bytes() == before
    assert _files(tmp_path) == files_before


# --- accuracy gate ---------------------------------------------------------------------------


def test_accuracy_gate_failure(model_path, out):
    """min_sqnr=200 dB cannot be met: AccuracyGateError, with the result and its failing report attached."""
    before = model_path.read_bytes()
    files_before = _files(out.parent)
    with pytest.raises(QcompileError) as info:
        result = qcompile.compile(
            str(model_path), cnn_batches(4), config={"min_sqnr": 200.0, "measure_latency": False}
        )
        result.save(out)
    error = info.value
    assert type(error) is AccuracyGateError
    assert error.exit_code == 3
    assert "logits" in str(error) and "200" in str(error)
    assert error.result is not None
    gate = error.result.report.accuracy_gate
    assert gate["passed"] is False
    assert gate["min_sqnr"] == 200.0
    assert "logits" in gate["failing"]
    assert model_path.read_bytes() == before
    assert not out.exists()
    assert _files(out.parent) == files_before


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final files must not stay owner-only."""
    import os

    from tiny_models import cnn_batches, tiny_cnn

    import qcompile

    result = qcompile.compile(tiny_cnn(), cnn_batches(3), config={"measure_latency": False})
    umask = os.umask(0)
    os.umask(umask)
    result.save(tmp_path / "m.onnx", report_path=tmp_path / "report.json")
    for name in ("m.onnx", "report.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
