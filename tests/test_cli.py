"""The `qcompile` command line, driven in process through ``qcompile.cli.main``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tiny_models import cnn_batches

from qcompile.cli import main
from qcompile.core.pipeline import parse_pipeline


@pytest.fixture
def calib(tmp_path):
    """12 .npz batches: enough for one to be held out for evaluation."""
    directory = tmp_path / "calib"
    directory.mkdir()
    for i, batch in enumerate(cnn_batches(12)):
        np.savez(directory / f"batch_{i:02d}.npz", **batch)
    return directory


def compile_args(model_path, calib, *extra):
    return ["compile", str(model_path), "--calib", str(calib), "--no-latency", *extra]


def test_compile_writes_model_and_report(tmp_path, model_path, calib, capsys):
    """compile writes a valid, runnable model and its report beside it (model.q.report.json), and returns 0."""
    out = tmp_path / "model.q.onnx"
    assert main(compile_args(model_path, calib, "-o", str(out))) == 0
    stdout = capsys.readouterr().out
    assert str(out) in stdout

    report_path = tmp_path / "model.q.report.json"
    assert out.is_file() and report_path.is_file()
    assert not (tmp_path / "report.json").exists()
    report = json.loads(report_path.read_text())
    for key in ("evaluation", "size", "passes", "fusion", "plan"):
        assert key in report, key
    assert report["evaluation"]["outputs"]["logits"]["sqnr_db"] > 20

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, cnn_batches(1)[0])
    assert logits.shape == (4, 10)
    assert np.isfinite(logits).all()


def test_default_output_name(tmp_path, model_path, calib):
    """Without -o the output is MODEL.<target>.onnx beside the input."""
    assert main(compile_args(model_path, calib, "-q")) == 0
    assert (tmp_path / "model.cpu.onnx").is_file()
    assert (tmp_path / "model.cpu.report.json").is_file()


def test_print_pipeline_round_trips(model_path, capsys):
    """--print-pipeline prints a pipeline that, passed back via --pipeline, prints the same."""
    assert main(["compile", str(model_path), "--print-pipeline"]) == 0
    printed = capsys.readouterr().out.strip()
    assert "," in printed and "calibrate" in printed and "insert-qdq" in printed

    assert main(["compile", str(model_path), "--pipeline", printed, "--print-pipeline"]) == 0
    assert capsys.readouterr().out.strip() == printed


def test_a_recipe_prints_as_an_ordinary_pipeline(model_path, capsys):
    """--recipe llm-int4 expands to passes with options that --pipeline accepts back unchanged."""
    assert main(["compile", str(model_path), "--recipe", "llm-int4", "--print-pipeline"]) == 0
    printed = capsys.readouterr().out.strip()
    assert "awq-scale(" in printed and "quantize-weights(" in printed and "method=gptq" in printed
    assert main(["compile", str(model_path), "--pipeline", printed, "--print-pipeline"]) == 0
    assert capsys.readouterr().out.strip() == printed
    assert main(["compile", str(model_path), "--recipe", "llm-int3", "--print-pipeline"]) == 2


def test_print_pipeline_round_trips_with_options(model_path, capsys):
    """Pass options survive the print -> --pipeline -> print round trip."""
    pipeline = "shape-inference,plan-quantization,calibrate(method=percentile,percentile=99.9),insert-qdq"
    assert main(["compile", str(model_path), "--pipeline", pipeline, "--print-pipeline"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == pipeline
    assert main(["compile", str(model_path), "--pipeline", printed, "--print-pipeline"]) == 0
    assert capsys.readouterr().out.strip() == printed


def test_dump_after_all_writes_one_model_per_pass(tmp_path, model_path, calib):
    """--dump-after all writes one .onnx per pipeline element into the dump dir."""
    out = tmp_path / "out.onnx"
    dumps = tmp_path / "dumps"
    args = compile_args(model_path, calib, "-o", str(out), "--dump-after", "all", "--dump-dir", str(dumps), "-q")
    assert main(args) == 0
    report = json.loads((tmp_path / "out.report.json").read_text())
    files = sorted(dumps.glob("*.onnx"))
    assert len(files) == len(report["passes"])
    assert [f.name for f in files] == [f"{i:02d}-{p['name']}.onnx" for i, p in enumerate(report["passes"])]
    for f in files:
        onnx.load(str(f))  # each dump is a complete model


def test_dump_after_unknown_pass_exits_2(tmp_path, model_path, calib, capsys):
    """--dump-after a pass the pipeline does not run exits 2, naming it, and writes nothing."""
    out = tmp_path / "out.onnx"
    code = main(compile_args(model_path, calib, "-o", str(out), "--dump-after", "nosuchpass"))
    assert code == 2
    err = capsys.readouterr().err
    assert "qcompile: error:" in err and "nosuchpass" in err
    assert not out.exists()
    assert not (tmp_path / "out.report.json").exists()
    assert not (tmp_path / "out.onnx.dumps").exists()


def test_passes_lists_passes(capsys):
    """`qcompile passes` lists calibrate and insert-qdq."""
    assert main(["passes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "calibrate" in names
    assert "insert-qdq" in names


def test_targets_lists_cpu(capsys):
    """`qcompile targets` lists the cpu target."""
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("cpu:") for line in out.splitlines())


def test_inspect_prints_inputs_and_plan(model_path, capsys):
    """`qcompile inspect` prints the model's inputs and what would be quantized."""
    before = model_path.read_bytes()
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "input  x:" in out
    assert "float32" in out
    assert "would quantize" in out
    assert model_path.read_bytes() == before


def test_inspect_json(model_path, capsys):
    """`qcompile inspect --json` prints parseable JSON with inputs and would_quantize."""
    assert main(["inspect", str(model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in info["inputs"]] == ["x"]
    assert info["would_quantize"]["quantized_nodes"] > 0
    # Static dims are numbers, symbolic ones their names (a static dim was the string "1000").
    for value in info["inputs"] + info["outputs"]:
        assert all(isinstance(d, int) or (isinstance(d, str) and not d.isdigit()) for d in value["shape"]), value


def test_accuracy_gate_exits_3_and_writes_only_the_report(tmp_path, model_path, calib, capsys):
    """--min-sqnr 200 exits 3, writes the report with the gate failed, and does not write the model."""
    out = tmp_path / "out.onnx"
    code = main(compile_args(model_path, calib, "-o", str(out), "--min-sqnr", "200"))
    assert code == 3
    err = capsys.readouterr().err
    assert "qcompile: error:" in err and "Accuracy gate failed" in err
    assert not out.exists()
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["accuracy_gate"]["passed"] is False
    assert report["accuracy_gate"]["min_sqnr"] == 200.0


def test_bad_input_exits_2_without_traceback(tmp_path, calib, capsys):
    """A missing model file exits 2 with a one-line 'qcompile: error:' and no traceback."""
    missing = tmp_path / "missing.onnx"
    code = main(compile_args(missing, calib))
    assert code == 2
    captured = capsys.readouterr()
    assert "qcompile: error:" in captured.err
    assert "missing.onnx" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_bad_calibration_data_exits_2_without_traceback(tmp_path, model_path, capsys):
    """A float64 .npz batch exits 2 naming the input and the file, with no traceback."""
    calib = tmp_path / "calib64"
    calib.mkdir()
    np.savez(calib / "batch_00.npz", x=cnn_batches(1)[0]["x"].astype(np.float64))
    code = main(compile_args(model_path, calib))
    assert code == 2
    err = capsys.readouterr().err
    assert "qcompile: error:" in err
    assert "batch_00.npz" in err and "'x'" in err and "float64" in err
    assert "Traceback" not in err


def test_output_equal_to_input_exits_2(model_path, calib, capsys):
    """-o pointing at the input model exits 2 and leaves the input byte-identical."""
    before = model_path.read_bytes()
    code = main(compile_args(model_path, calib, "-o", str(model_path)))
    assert code == 2
    err = capsys.readouterr().err
    assert "qcompile: error:" in err and "overwrite the input" in err
    assert model_path.read_bytes() == before
    assert sorted(p.name for p in model_path.parent.iterdir() if p.suffix == ".json") == []


def test_config_file_reaches_report(tmp_path, model_path, calib):
    """calibration_method from --config qcompile.toml shows up in the report's config and calibration."""
    toml = tmp_path / "qcompile.toml"
    toml.write_text('calibration_method = "percentile"\npercentile = 99.9\n')
    out = tmp_path / "out.onnx"
    assert main(compile_args(model_path, calib, "-o", str(out), "--config", str(toml), "-q")) == 0
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["config"]["calibration_method"] == "percentile"
    assert report["config"]["percentile"] == 99.9
    assert report["calibration"]["method"] == "percentile"


def test_cli_flag_overrides_config_file(tmp_path, model_path, calib):
    """A --calibration-method flag wins over the same key in qcompile.toml."""
    toml = tmp_path / "qcompile.toml"
    toml.write_text('calibration_method = "percentile"\n')
    out = tmp_path / "out.onnx"
    args = compile_args(model_path, calib, "-o", str(out), "--config", str(toml), "--calibration-method", "mse", "-q")
    assert main(args) == 0
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["config"]["calibration_method"] == "mse"


def test_report_has_one_timed_entry_per_pass(tmp_path, model_path, calib):
    """The report's passes list has one entry per pipeline element, in order, each with seconds."""
    out = tmp_path / "out.onnx"
    assert main(compile_args(model_path, calib, "-o", str(out), "-q")) == 0
    report = json.loads((tmp_path / "out.report.json").read_text())
    expected = [spec.name for spec in parse_pipeline(report["pipeline"])]
    assert [p["name"] for p in report["passes"]] == expected
    for entry in report["passes"]:
        assert isinstance(entry["seconds"], float) and entry["seconds"] >= 0


def test_version_and_help_texts_name_every_choice(capsys):
    """--version prints the installed version; compile's help lists every calibration method and
    recipe there is (auto and llm-fp8 were missing), and run/inspect explain their arguments."""
    from importlib import metadata

    from qcompile.core.recipes import RECIPES
    from qcompile.numerics.statistics import CALIBRATION_METHODS

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"qcompile {metadata.version('qcompile')}"
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in (*CALIBRATION_METHODS, *RECIPES):
        assert name in text, name
    for command in ("run", "inspect"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "the float ONNX model" in capsys.readouterr().out or command == "run"


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_heavy_module(flag):
    """`qcompile --help` took 2.4 s (1.2 s on a quiet machine) because the package imported onnx,
    onnx-ir, onnxruntime and onnxscript before argparse ran; they wait for a command that needs them."""
    import subprocess
    import sys

    heavy = ("onnx", "onnx_ir", "onnxruntime", "onnxscript", "torch", "numpy")
    code = ("import sys\nfrom qcompile.cli import main\ntry:\n    main([%r])\nexcept SystemExit:\n    pass\n"
            "print('loaded:', [m for m in %r if m in sys.modules], file=sys.stderr)" % (flag, heavy))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stderr.strip().splitlines()[-1] == "loaded: []", run.stderr
    assert "qcompile" in run.stdout


def test_the_package_still_exports_compile_lazily():
    """``qcompile.compile`` and friends are imported on first use, and are the real objects."""
    import qcompile
    import qcompile.api
    import qcompile.core.config

    assert qcompile.compile is qcompile.api.compile and qcompile.CompileResult is qcompile.api.CompileResult
    assert qcompile.CompileConfig is qcompile.core.config.CompileConfig and qcompile.load_config is qcompile.core.config.load_config
    assert set(qcompile.__all__) <= set(dir(qcompile))
    with pytest.raises(AttributeError):
        qcompile.no_such_name  # noqa: B018


def test_models_compiled_into_one_folder_keep_one_report_each(tmp_path, model_path, calib):
    """The report is named after its model (it was report.json for every model, so the second
    compile into a folder replaced the first one's report); verify finds it by that name."""
    out = tmp_path / "out"
    out.mkdir()
    for name, method in (("a.int8.onnx", "minmax"), ("b.int8.onnx", "mse")):
        assert main(compile_args(model_path, calib, "-o", str(out / name), "--calibration-method", method, "-q")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.int8.onnx", "a.int8.report.json", "b.int8.onnx", "b.int8.report.json"]
    reports = {n: json.loads((out / f"{n}.int8.report.json").read_text()) for n in "ab"}
    assert reports["a"]["config"]["calibration_method"] == "minmax" and reports["b"]["config"]["calibration_method"] == "mse"
    assert main(["verify", str(out / "a.int8.onnx")]) == 0 and main(["verify", str(out / "b.int8.onnx")]) == 0


def test_report_path_for():
    from pathlib import Path

    from qcompile.io.outputs import report_path_for

    assert report_path_for(Path("out/model.int8.onnx")) == Path("out/model.int8.report.json")
    assert report_path_for(Path("m.ONNX")) == Path("m.report.json")
    assert report_path_for(Path("out/model")) == Path("out/model.report.json")
    assert report_path_for(Path(".onnx")) == Path(".onnx.report.json")
