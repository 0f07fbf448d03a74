"""`qcompile build`: many (model, target) entries from one build file, each compiled as its own task."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from tiny_models import cnn_batches, tiny_cnn, tiny_transformer, transformer_batches

import qcompile.scaleout.build
from qcompile.scaleout.build import build, load_build_file, worst_exit_code
from qcompile.cli import main
from qcompile.errors import ConfigError

# Three models: two CNNs (different weights, one with 16-bit activations) and a transformer block.
# Latency is not measured: it is not what these tests are about, and it is the slow part.
BUILD = """
[defaults]
measure_latency = false

[[model]]
model = "models/cnn.onnx"
calib = "data/cnn"

[[model]]
name = "cnn7"
model = "models/cnn_seed7.onnx"
calib = "data/cnn"
config = { activation_type = "uint16" }

[[model]]
model = "models/transformer.onnx"
calib = "data/transformer"
"""
OUTPUTS = ("cnn.cpu", "cnn7.cpu", "transformer.cpu")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder with models/ (three tiny models) and data/ (.npz batches for each kind)."""
    root = tmp_path_factory.mktemp("project")
    (root / "models").mkdir()
    onnx.save(tiny_cnn(seed=0), str(root / "models" / "cnn.onnx"))
    onnx.save(tiny_cnn(seed=7), str(root / "models" / "cnn_seed7.onnx"))
    onnx.save(tiny_transformer(seed=0), str(root / "models" / "transformer.onnx"))
    for name, batches in (("cnn", cnn_batches(6)), ("transformer", transformer_batches(6))):
        (root / "data" / name).mkdir(parents=True)
        for i, batch in enumerate(batches):
            np.savez(root / "data" / name / f"batch_{i}.npz", **batch)
    return root


def build_file(project, text: str = BUILD, name: str = "models.toml"):
    path = project / name
    path.write_text(text)
    return path


def test_three_models_in_process_and_on_two_local_workers(project, tmp_path, monkeypatch, capsys):
    """Three artifacts, three reports and one build report, on either executor; the models are
    byte-identical between the two."""
    path = build_file(project)
    here = tmp_path / "inprocess"
    assert main(["build", str(path), "-o", str(here)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed[:3]] == [["ok", name] for name in OUTPUTS]
    assert "3 entries (3 ok)" in printed[3] and "exit code 0" in printed[3]
    report = json.loads((here / "build-report.json").read_text())
    assert [(e["name"], e["target"], e["status"], e["exit_code"]) for e in report["entries"]] == [
        ("cnn", "cpu", "ok", 0), ("cnn7", "cpu", "ok", 0), ("transformer", "cpu", "ok", 0)]
    assert report["summary"]["by_status"] == {"ok": 3} and report["summary"]["exit_code"] == 0
    assert report["summary"]["executor"] == {"executor": "inprocess", "workers": 1}
    for entry, name in zip(report["entries"], OUTPUTS):
        assert entry["output"] == str(here / f"{name}.onnx") and entry["min_sqnr_db"] > 20
        model = onnx.load(entry["output"])
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        own = json.loads((here / f"{name}.report.json").read_text())
        assert own["target"] == "cpu" and own["config"]["measure_latency"] is False
    # The entry's own config reached its compile, and only its compile.
    assert json.loads((here / "cnn7.cpu.report.json").read_text())["config"]["activation_type"] == "uint16"
    assert json.loads((here / "cnn.cpu.report.json").read_text())["config"]["activation_type"] is None

    # A fresh pass cache, so the workers compile rather than read the first build's results.
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache2"))
    workers = tmp_path / "local"
    assert main(["build", str(path), "-o", str(workers), "--executor", "local", "--workers", "2", "-q"]) == 0
    report = json.loads((workers / "build-report.json").read_text())
    assert report["summary"]["executor"] == {"executor": "local", "workers": 2}
    assert all(e["status"] == "ok" for e in report["entries"])
    for name in OUTPUTS:
        assert (workers / f"{name}.onnx").read_bytes() == (here / f"{name}.onnx").read_bytes(), name


def test_the_exit_code_is_the_worst_entrys(project, tmp_path, capsys):
    """An entry that misses its min_sqnr exits 3, without its model, while the others are built;
    an entry with bad data (exit 2) beats it; an earlier build's model for a failing entry is gone."""
    gate = BUILD.replace('config = { activation_type = "uint16" }', 'config = { min_sqnr = 200 }')
    out = tmp_path / "out"
    out.mkdir()
    (out / "cnn7.cpu.onnx").write_bytes(b"a model from an earlier build")
    assert main(["build", str(build_file(project, gate)), "-o", str(out)]) == 3
    printed = capsys.readouterr().out
    assert "accuracy-gate-failed" in printed and "model not written" in printed and "exit code 3" in printed
    report = json.loads((out / "build-report.json").read_text())
    assert [e["exit_code"] for e in report["entries"]] == [0, 3, 0]
    assert report["summary"]["by_status"] == {"ok": 2, "accuracy-gate-failed": 1}
    failed = report["entries"][1]
    assert failed["output"] is None and "Accuracy gate failed" in failed["error"] and failed["min_sqnr_db"] < 200
    assert not (out / "cnn7.cpu.onnx").exists()
    assert json.loads((out / "cnn7.cpu.report.json").read_text())["accuracy_gate"]["passed"] is False
    assert (out / "cnn.cpu.onnx").is_file() and (out / "transformer.cpu.onnx").is_file()

    # The CNN's data for the transformer: a calibration data error (2) is worse than a missed gate (3).
    bad_data = gate + '\n[[model]]\nname = "mismatched"\nmodel = "models/transformer.onnx"\ncalib = "data/cnn"\n'
    assert main(["build", str(build_file(project, bad_data)), "-o", str(out), "-q"]) == 2
    quiet = capsys.readouterr()  # -q: only the failed entries, on stderr
    assert quiet.out == "" and [line.split()[1:3] for line in quiet.err.splitlines()] == [
        ["accuracy-gate-failed", "cnn7.cpu"], ["error", "mismatched.cpu"]]
    report = json.loads((out / "build-report.json").read_text())
    assert [e["exit_code"] for e in report["entries"]] == [0, 3, 0, 2]
    assert "attention_mask" in report["entries"][3]["error"] and report["entries"][3]["report"] is None
    assert (out / "cnn.cpu.onnx").is_file() and not (out / "mismatched.cpu.onnx").exists()


def test_an_unexpected_error_in_one_entry_exits_1_and_the_others_are_built(project, tmp_path, monkeypatch):
    real = qcompile.scaleout.build._compile

    def broken_for_the_transformer(entry, config):
        if entry.name == "transformer":
            raise RuntimeError("a bug")
        return real(entry, config)

    monkeypatch.setattr(qcompile.scaleout.build, "_compile", broken_for_the_transformer)
    report = build(build_file(project), tmp_path / "out")
    assert report.exit_code == 1
    assert [e["status"] for e in report.entries] == ["ok", "ok", "internal-error"]
    assert "RuntimeError: a bug" in report.entries[2]["error"] and "a bug" in report.entries[2]["traceback"]
    assert (tmp_path / "out" / "cnn.cpu.onnx").is_file() and (tmp_path / "out" / "cnn7.cpu.onnx").is_file()


@pytest.mark.parametrize(("codes", "worst"), [
    ([], 0), ([0, 0], 0), ([0, 3], 3), ([3, 2, 0], 2), ([2, 1, 3], 1), ([0, 1], 1),
])
def test_severity_is_0_then_3_then_2_then_1(codes, worst):
    assert worst_exit_code(codes) == worst


def test_a_missing_calib_dir_exits_2_before_anything_compiles(project, tmp_path, capsys):
    text = BUILD.replace('calib = "data/transformer"', 'calib = "data/transformr"')
    out = tmp_path / "out"
    assert main(["build", str(build_file(project, text)), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "[[model]] #3 (transformer)" in err and "calib 'data/transformr' does not exist" in err
    assert not out.exists()  # nothing compiled, nothing written, not even the folder


def test_dry_run_lists_the_entries_and_writes_nothing(project, tmp_path, capsys):
    text = BUILD.replace('model = "models/cnn.onnx"', 'model = "models/cnn.onnx"\ntargets = ["cpu", "qnn-htp"]')
    out = tmp_path / "out"
    assert main(["build", str(build_file(project, text)), "-o", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["cnn.cpu", "cnn.qnn-htp", "cnn7.cpu", "transformer.cpu"]
    assert lines[4] == "4 entries; the build file is valid"
    assert not out.exists()


def test_configs_layer_and_paths_are_relative_to_the_build_file(project, tmp_path, monkeypatch):
    """CompileConfig defaults < [defaults] < the entry's config < its target; paths in the file are
    relative to the file, -o to the working directory; out_dir defaults to <stem>-build/."""
    (project / "sub").mkdir(exist_ok=True)
    (project / "sub" / "htp.toml").write_text('activation_type = "uint16"\ncalibration_method = "percentile"\n')
    text = """
[defaults]
calibration_method = "minmax"
min_sqnr = 20
target = "qnn-htp"

[[model]]
model = "models/cnn.onnx"
calib = "data/cnn"
eval = "data/cnn"

[[model]]
name = "cnn-b"
model = "models/cnn.onnx"
calib = "data/cnn"
targets = ["cpu", "qnn-htp"]
config = "sub/htp.toml"
"""
    monkeypatch.chdir(tmp_path)
    plan = load_build_file(build_file(project, text, "layers.toml"))
    assert plan.out_dir == project / "layers-build"
    first, cpu, htp = plan.entries
    assert (first.name, first.target, cpu.target, htp.target) == ("cnn", "qnn-htp", "cpu", "qnn-htp")
    assert first.config["calibration_method"] == "minmax" and first.config["min_sqnr"] == 20
    assert first.model == str(project / "models" / "cnn.onnx") and first.eval == str(project / "data" / "cnn")
    assert cpu.config["calibration_method"] == "percentile" and cpu.config["activation_type"] == "uint16"
    assert cpu.config["min_sqnr"] == 20 and cpu.config["target"] == "cpu"
    assert htp.output == str(project / "layers-build" / "cnn-b.qnn-htp.onnx")
    assert htp.report == str(project / "layers-build" / "cnn-b.qnn-htp.report.json")
    assert load_build_file(project / "layers.toml", "here").out_dir == tmp_path / "here"


BAD_BUILD_FILES = [
    pytest.param("[[models]]\nmodel = 'models/cnn.onnx'\n", r"Unknown key 'models' in build file .* Did you mean 'model'\?", id='unknown-top-key'),
    pytest.param("out_dir = 3\n[[model]]\nmodel = 'models/cnn.onnx'\n", "out_dir .* must be a folder path", id='bad-out-dir'),
    pytest.param("[defaults]\ncalibraton_method = 'mse'\n[[model]]\nmodel = 'models/cnn.onnx'\n",
        r"Unknown key 'calibraton_method' in \[defaults\].* Did you mean 'calibration_method'\?", id='unknown-default-key'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\ncalibration = 'data/cnn'\n",
        r"Unknown key 'calibration' in models.toml, \[\[model\]\] #1\. Did you mean 'calib'\?", id='unknown-entry-key'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\nconfig = { activation_typ = 'uint16' }\n",
        r"Unknown key 'activation_typ' in the config of models.toml, \[\[model\]\] #1 \(cnn\)\. Did you mean 'activation_type'\?", id='unknown-entry-config-key'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\nconfig = { activation_type = 'uint3' }\n", "activation_type = 'uint3' is not a known type", id='bad-type'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\nconfig = { pipeline = ['calibrat'] }\n", r"#1 \(cnn\), target 'cpu': Unknown pass 'calibrat'.* Did you mean 'calibrate'", id='unknown-pass'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\ntarget = 'gpu9'\n", r"#1 \(cnn\), target 'gpu9': Unknown target 'gpu9'", id='unknown-target'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\ntarget = 'cpu'\ntargets = ['cpu']\n", "gives both target and targets", id='target-and-targets'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\ntargets = ['cpu', 'cpu']\n", "lists target 'cpu' twice", id='target-twice'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\ntargets = []\n", "targets must be a list of target names", id='no-targets'),
    pytest.param("[[model]]\nmodel = 'models/cnn.onnx'\n[[model]]\nmodel = 'models/cnn.onnx'\n",
        r"#2 \(cnn\) and models.toml, \[\[model\]\] #1 \(cnn\) both write cnn.cpu.onnx .* another name", id='duplicate-output'),
    pytest.param("[[model]]\nmodel = 'models/nothere.onnx'\n", r"model 'models/nothere.onnx' does not exist", id='missing-model'),
    pytest.param("[[model]]\ncalib = 'data/cnn'\n", r"#1 has no model: add model = ", id='no-model-key'),
    pytest.param("[[model]]\nname = 'a/b'\nmodel = 'models/cnn.onnx'\n", "name = 'a/b' must start with a letter or digit", id='bad-name'),
    pytest.param("[model]\nmodel = 'models/cnn.onnx'\n", r"\[\[model\]\] \(double brackets\)", id='single-brackets'),
    pytest.param("[defaults]\nmin_sqnr = 20\n", "lists no models", id='no-models'),
    pytest.param("[[model]\nmodel = 'x'\n", "is not valid TOML", id='bad-toml'),
]


@pytest.mark.parametrize(("text", "message"), BAD_BUILD_FILES)
def test_a_bad_build_file_is_a_config_error_naming_the_problem(project, text, message):
    with pytest.raises(ConfigError, match=message):
        load_build_file(build_file(project, text))


def test_workers_without_a_parallel_executor_is_refused(project, tmp_path, capsys):
    assert main(["build", str(build_file(project)), "-o", str(tmp_path / "out"), "--workers", "2"]) == 2
    assert "--executor local" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (2 CPUs); a Ray another module left running is used as it is."""
    try:
        import ray
    except ImportError:
        pytest.skip("Ray is not installed: pip install 'qcompile[ray]'")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _node_ip_address="127.0.0.1")
    yield ray
    if started:
        ray.shutdown()


def test_a_build_on_ray_gives_the_same_models(project, tmp_path, ray_cluster):
    from qcompile.scaleout.executors import RayExecutor

    path = build_file(project)
    here = build(path, tmp_path / "inprocess")
    with RayExecutor(workers=2) as executor:
        on_ray = build(path, tmp_path / "ray", executor=executor)
    assert here.exit_code == on_ray.exit_code == 0
    assert on_ray.summary["executor"]["executor"] == "ray" and on_ray.summary["executor"]["workers"] == 2
    for name in OUTPUTS:
        assert (tmp_path / "ray" / f"{name}.onnx").read_bytes() == (tmp_path / "inprocess" / f"{name}.onnx").read_bytes()
