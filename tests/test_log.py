"""qcompile.log and the command line's -v, -q and --log-format; library code never prints."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_models import cnn_batches, tiny_cnn

import qcompile
from qcompile.cli import main
from qcompile.log import JsonFormatter, LogProgress, TerminalProgress, setup_logging

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_logging():
    """setup_logging changes process-wide state; put it back after each test."""
    root, own = logging.getLogger(), logging.getLogger("qcompile")
    levels, handlers = (root.level, own.level), list(root.handlers)
    yield
    root.setLevel(levels[0])
    own.setLevel(levels[1])
    root.handlers[:] = handlers


@pytest.fixture
def files(tmp_path):
    """The tiny CNN as model.onnx, three .npz batches in calib/, and where the output goes."""
    onnx.save(tiny_cnn(), str(tmp_path / "model.onnx"))
    (tmp_path / "calib").mkdir()
    for i, batch in enumerate(cnn_batches(3)):
        np.savez(tmp_path / "calib" / f"batch_{i}.npz", **batch)
    return tmp_path


def compile_argv(files: Path, *flags: str) -> list[str]:
    return ["compile", str(files / "model.onnx"), "--calib", str(files / "calib"), "-o", str(files / "out.onnx"),
            "--no-latency", "--no-cache", *flags]


def test_json_lines_parse_and_name_every_pass(files, capsys):
    """--log-format json -v: every stderr line is a JSON object with time, level, logger and
    message; one per pass carries the pass name and its duration, in pipeline order."""
    assert main(["--log-format", "json", "-v", *compile_argv(files)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert all(r["time"].endswith("Z") for r in records)
    passes = [r for r in records if "pass" in r]
    report = json.loads((files / "out.report.json").read_text())
    assert [r["pass"] for r in passes] == [p["name"] for p in report["passes"]]
    assert all(isinstance(r["seconds"], float) and r["level"] == "DEBUG" for r in passes)
    # Calibration progress is a record too, in JSON mode, ending with the batch count.
    progress = [r for r in records if r.get("step") == "calibrating"]
    assert progress[-1]["finished"] is True and progress[-1]["batches"] == 3


def test_default_shows_info_and_quiet_shows_only_warnings(files, capsys):
    """By default stderr has qcompile's info lines; -q (before or after the subcommand) has none,
    and compile -q prints no summary either."""
    assert main(compile_argv(files)) == 0
    default = capsys.readouterr()
    assert "INFO qcompile.passes.calibration: Calibrated" in default.err
    assert "DEBUG" not in default.err and "wrote" in default.out
    for argv in (["-q", *compile_argv(files)], compile_argv(files, "-q")):
        assert main(argv) == 0
        quiet = capsys.readouterr()
        assert quiet.err == "" and quiet.out == ""


def test_verbose_logs_every_pass_in_text(files, capsys):
    """-v after the subcommand works like before it: a DEBUG line per pass, with its time."""
    assert main(compile_argv(files, "-v")) == 0
    err = capsys.readouterr().err
    assert "DEBUG qcompile.core.pipeline: pass calibrate" in err
    assert "DEBUG qcompile.core.pipeline: pass insert-qdq" in err


def test_flags_are_the_same_on_every_subcommand(files, capsys):
    """Every subcommand takes -v, -q and --log-format; -v with -q is a usage error (exit 2)."""
    assert main(["passes", "-q", "--log-format", "json"]) == 0
    assert "calibrate" in capsys.readouterr().out
    assert main(["inspect", str(files / "model.onnx"), "--log-format", "json"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["-v", "passes", "-q"])
    assert exit_info.value.code == 2
    assert "contradict" in capsys.readouterr().err


def test_json_error_is_one_json_record(tmp_path, capsys):
    """In JSON mode the error is a JSON record (level ERROR, its class, the exit code), not a text line."""
    assert main(["--log-format", "json", "compile", str(tmp_path / "missing.onnx")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["error"] == "ModelError" and record["exit_code"] == 2
    assert "missing.onnx" in record["message"]


def test_json_formatter_keeps_extra_fields_and_exceptions():
    """Fields given with extra= become keys; an exception becomes its formatted traceback."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("qcompile.test").makeRecord(
            "qcompile.test", logging.WARNING, __file__, 1, "pass %s took %.1fs", ("calibrate", 2.0), None,
            extra={"pass": "calibrate", "seconds": 2.0, "path": Path("/x")},
        )
        record.exc_info = __import__("sys").exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "pass calibrate took 2.0s"
    assert entry["pass"] == "calibrate" and entry["seconds"] == 2.0 and entry["path"] == "/x"
    assert entry["level"] == "WARNING" and entry["logger"] == "qcompile.test"
    assert "ValueError: boom" in entry["exception"]


def test_setup_logging_replaces_its_own_handler():
    """Calling setup_logging twice (two main() calls in one process) leaves one handler, not two."""
    setup_logging(0, "text")
    setup_logging(1, "json")
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "qcompile"]
    assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    assert logging.getLogger("qcompile").level == logging.DEBUG


def test_progress_reaches_a_callback_not_stderr(capsys):
    """The API's show_progress takes a callback: calibration calls it after each batch and once
    finished; nothing is printed."""
    calls = []
    qcompile.compile(tiny_cnn(), cnn_batches(4), config={"measure_latency": False, "cache": False},
                     show_progress=lambda *args: calls.append(args))
    calibrating = [c for c in calls if c[0] == "calibrating"]
    assert [c[1] for c in calibrating] == [1, 2, 3, 4, 4] and [c[3] for c in calibrating] == [False] * 4 + [True]
    assert "calibrating" not in capsys.readouterr().err


def test_evaluation_and_latency_report_progress_too():
    """A newcomer saw progress for calibration only; evaluation and both latency measurements
    (float and compiled model) report theirs, each ending with a finished call."""
    calls = []
    qcompile.compile(tiny_cnn(), cnn_batches(6), config={"eval_batches": 2, "latency_runs": 4, "cache": False},
                     eval_data=cnn_batches(3), show_progress=lambda *args: calls.append(args))
    steps = {c[0] for c in calls}
    assert {"calibrating", "evaluating", "latency (float model)", "latency (compiled model)"} <= steps
    evaluating = [c for c in calls if c[0] == "evaluating"]
    assert [c[1] for c in evaluating] == [1, 2] and evaluating[-1][3] is True  # eval_batches caps the 3
    compiled = [c for c in calls if c[0] == "latency (compiled model)"]
    assert compiled[-1][1] == 3 + 4 and compiled[-1][3] is True  # 3 warm-up runs, then the 4 timed


def test_terminal_progress_says_runs_for_latency(capsys):
    TerminalProgress()("latency (float model)", 7, 0.2, True)
    assert "latency (float model): 7 runs, 0.2s" in capsys.readouterr().err


def test_terminal_progress_rewrites_one_line(capsys):
    """TerminalProgress: carriage returns while running, a newline when finished."""
    progress = TerminalProgress()
    progress("calibrating", 1, 0.5, False)
    progress("calibrating", 2, 1.0, True)
    assert capsys.readouterr().err == "\rcalibrating: 1 batches, 0.5s\rcalibrating: 2 batches, 1.0s\n"


def test_log_progress_is_throttled(caplog):
    """LogProgress logs at most one record per interval, and always the finishing one."""
    progress = LogProgress(interval=3600)
    with caplog.at_level(logging.INFO, logger="qcompile"):
        for batch in range(1, 6):
            progress("calibrating", batch, 0.1 * batch, batch == 5)
    assert [r.batches for r in caplog.records] == [1, 5]


def test_progress_reaches_a_build_log_when_stderr_is_not_a_terminal(tmp_path):
    """A compile whose stderr is a pipe (a CI log) still says calibration is running and when it
    ended, as log lines; -q keeps it silent."""
    model, calib = tmp_path / "m.onnx", tmp_path / "calib"
    onnx.save(tiny_cnn(), model)
    calib.mkdir()
    for i, batch in enumerate(cnn_batches(3)):
        np.savez(calib / f"b{i}.npz", **batch)
    command = [sys.executable, "-c", "import sys; from qcompile.cli import main; sys.exit(main())", "compile", str(model), "--calib", str(calib),
               "--no-latency", "--no-cache"]
    piped = subprocess.run([*command, "-o", str(tmp_path / "a.onnx")], capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert "calibrating: 3 batches" in piped.stderr
    quiet = subprocess.run([*command, "-q", "-o", str(tmp_path / "b.onnx")], capture_output=True, text=True)
    assert quiet.returncode == 0 and "calibrating" not in quiet.stderr


def _print_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]


def test_no_library_module_prints():
    """Library code logs (logging.getLogger(__name__)) and never calls print(); only the command
    line (qcompile/cli.py) writes to stdout. A grep over the syntax tree, so docstrings don't count."""
    modules = [p for folder in ("qcompile", "passes", "backends") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(modules) > 20
    offenders = {
        str(p.relative_to(ROOT)): lines
        for p in modules
        if p.relative_to(ROOT) != Path("qcompile/cli.py") and (lines := _print_calls(p))
    }
    assert offenders == {}, f"print() in library code (use logging): {offenders}"
