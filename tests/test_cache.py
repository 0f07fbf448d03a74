"""The pass cache (qcompile.core.cache): a rerun that changes only late passes skips calibration and
writes the same bytes; damaged entries are recomputed, never used; --no-cache bypasses it.

Every test has its own empty cache folder (QCOMPILE_CACHE_DIR, set in conftest.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from qcompile.backends import get_target
from tiny_models import cnn_batches, tiny_cnn

import qcompile
from qcompile.core import cache as pass_cache
from qcompile.cli import main
from qcompile.core.config import NON_BUILD_KEYS, RUN_KEYS, CompileConfig
from qcompile.core.context import Analyses, CompileContext
from qcompile.core.pipeline import parse_pipeline

PIPELINE = "fix-names,shape-inference,plan-quantization,calibrate,insert-qdq,lift-constants(size_limit={limit})"


def _compile(limit: int = 16, data=None, **config):
    settings = {"measure_latency": False, "pipeline": [PIPELINE.format(limit=limit)], "cache": True, **config}
    return qcompile.compile(tiny_cnn(), cnn_batches(12) if data is None else data, config=settings)


def _cache_of(result) -> dict[str, str]:
    return {p["name"]: p["cache"] for p in result.report.passes}


def _entries(directory: Path) -> list[Path]:
    return sorted(p.parent for p in directory.rglob("header.json") if not p.parent.name.startswith(".tmp-"))


def test_changing_the_last_pass_reuses_calibration(caplog):
    """Run 2 changes only the last pass's options: calibration is restored, not run, and the
    output and report are those of a compile without the cache."""
    first = _compile(limit=16)
    assert _cache_of(first)["calibrate"] == "stored"
    with caplog.at_level(logging.INFO, logger="qcompile.core.cache"):
        second = _compile(limit=1024)
    passes = _cache_of(second)
    assert passes["calibrate"] == "hit" and passes["plan-quantization"] == "hit"
    assert passes["insert-qdq"] == "ran" and passes["lift-constants"] == "ran"
    assert any("pass cache hit" in r.getMessage() for r in caplog.records)
    calibrate = next(p for p in second.report.passes if p["name"] == "calibrate")
    assert calibrate["seconds"] == 0.0
    assert second.report.cache["hits"] == 4 and second.report.cache["saved_seconds"] > 0

    uncached = _compile(limit=1024, cache=False)
    assert second.to_proto().SerializeToString() == uncached.to_proto().SerializeToString()
    assert second.report.hashes["output_model"] == uncached.report.hashes["output_model"]
    # Evaluation and calibration read the same batches as without the cache.
    for section in ("calibration", "evaluation", "plan", "transformations"):
        assert second.report.to_dict()[section] == uncached.report.to_dict()[section], section


def test_what_changes_the_result_misses_and_what_does_not_hits():
    """Other data or a config key passes read: a miss. A key no pass reads (min_sqnr): a hit."""
    _compile()
    assert _cache_of(_compile(data=cnn_batches(12, seed=7)))["calibrate"] == "stored"
    assert _cache_of(_compile(activation_type="int8"))["calibrate"] == "stored"
    assert _cache_of(_compile(min_sqnr=1.0, latency_runs=3))["calibrate"] == "hit"


def _flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))


DAMAGE = {
    "truncated model": lambda entry: (entry / "model.onnx").write_bytes((entry / "model.onnx").read_bytes()[:100]),
    "flipped byte in the model": lambda entry: _flip_a_byte(entry / "model.onnx"),
    "flipped byte in the state": lambda entry: _flip_a_byte(entry / "state.pkl"),
    "garbled header": lambda entry: (entry / "header.json").write_bytes(b"\x00not json"),
    "missing state": lambda entry: (entry / "state.pkl").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_deleted_and_recomputed(pass_cache_dir, caplog, damage):
    expected = _compile().to_proto().SerializeToString()
    (entry,) = _entries(pass_cache_dir)
    DAMAGE[damage](entry)
    with caplog.at_level(logging.WARNING, logger="qcompile.core.cache"):
        again = _compile()
    assert any("is damaged" in r.getMessage() for r in caplog.records)
    assert _cache_of(again)["calibrate"] == "stored"  # recomputed and stored afresh
    assert again.to_proto().SerializeToString() == expected
    assert _cache_of(_compile())["calibrate"] == "hit"


def test_no_cache_bypasses_the_cache(pass_cache_dir):
    _compile()
    before = {p: p.stat().st_mtime_ns for p in _entries(pass_cache_dir)}
    result = _compile(cache=False)
    assert set(_cache_of(result).values()) == {"off"}
    assert result.report.cache == {"enabled": False, "why": "turned off (cache = false, --no-cache)"}
    assert {p: p.stat().st_mtime_ns for p in _entries(pass_cache_dir)} == before


def test_the_python_api_leaves_the_cache_off_unless_asked(pass_cache_dir):
    """A library call writes no cache by default (sweeps and notebooks would fill the home folder);
    the command line turns it on (test_cli_flags_map_to_cache_keys)."""
    result = qcompile.compile(tiny_cnn(), cnn_batches(3), config={"measure_latency": False})
    assert set(_cache_of(result).values()) == {"off"} and "Python API" in result.report.cache["why"]
    assert not _entries(pass_cache_dir)


def test_cli_flags_map_to_cache_keys(tmp_path, model_path):
    """--no-cache, --cache-dir and --cache-max-mb are the config keys cache, cache_dir, cache_max_mb."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, batch in enumerate(cnn_batches(3)):
        np.savez(calib / f"{i}.npz", **batch)
    own = tmp_path / "own-cache"
    args = ["compile", str(model_path), "--calib", str(calib), "--no-latency", "-q", "-o", str(tmp_path / "q.onnx")]
    assert main([*args, "--cache-dir", str(own), "--cache-max-mb", "50"]) == 0
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["config"]["cache"] is True  # on by default for the command line
    assert report["config"]["cache_dir"] == str(own) and report["config"]["cache_max_mb"] == 50
    assert report["cache"]["dir"] == str(own) and _entries(own)
    assert main([*args, "--no-cache"]) == 0
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["config"]["cache"] is False and report["cache"]["enabled"] is False


def test_cache_directory_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "env"))
    assert pass_cache.cache_directory(str(tmp_path / "config")) == tmp_path / "config"
    assert pass_cache.cache_directory(None) == tmp_path / "env"
    monkeypatch.delenv("QCOMPILE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pass_cache.cache_directory(None) == tmp_path / "xdg" / "qcompile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert pass_cache.cache_directory(None) == Path.home() / ".cache" / "qcompile"


def test_an_unusable_cache_folder_warns_and_compiles(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="qcompile.core.cache"):
        result = _compile()
    assert result.report.cache["enabled"] is False and "cannot create" in result.report.cache["why"]
    assert any("pass cache off" in r.getMessage() for r in caplog.records)


def test_a_folder_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    (shared / f"passes-v{pass_cache.FORMAT}").mkdir(parents=True)
    (shared / f"passes-v{pass_cache.FORMAT}").chmod(0o777)
    store, why = pass_cache.PassCache.open(shared, 10**6)
    assert store is None and "not private" in why


def _entry(index: int) -> pass_cache.CacheEntry:
    model = ir.serde.deserialize_model(tiny_cnn(seed=index))
    return pass_cache.CacheEntry(model, {"analyses": Analyses(), "records": {}, "config": CompileConfig(), "data_read": False},
                                 [{"name": "fix-names", "seconds": 0.1, "modified": False}])


def test_least_recently_used_entries_are_evicted(tmp_path):
    """The cache stays under its limit; a hit makes an entry recent, so the oldest other one goes."""
    store, _ = pass_cache.PassCache.open(tmp_path, 10**9)
    keys = [f"{i:064x}" for i in range(3)]
    for i, key in enumerate(keys):
        assert store.store(key, _entry(i))
    size = sum(f.stat().st_size for f in store.path(keys[0]).iterdir())
    for age, key in enumerate(keys):  # headers 3, 2, 1 seconds old: keys[0] is the oldest
        header = store.path(key) / "header.json"
        t = header.stat().st_mtime - 3 + age
        os.utime(header, (t, t))
    assert store.load(keys[0]) is not None  # keys[0] is now the most recent
    store.max_bytes = 2 * size + size // 2
    store.evict()
    assert [k for k in keys if store.path(k).exists()] == [keys[0], keys[2]]
    assert not list(tmp_path.rglob(".tmp-*"))  # writes leave no temporary folders


def test_keys_are_full_sha256_and_chained(tmp_path):
    store, _ = pass_cache.PassCache.open(tmp_path, 10**9)
    context = CompileContext(config=CompileConfig(), target=get_target("cpu"))
    cache = pass_cache.PipelineCache(store, {"input_model": "0" * 64})
    a = cache.keys(parse_pipeline("fix-names,calibrate,insert-qdq"), context)
    b = cache.keys(parse_pipeline("fix-names,calibrate(method=minmax),insert-qdq"), context)
    assert all(re.fullmatch("[0-9a-f]{64}", k) for k in a)
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]


def test_dumped_passes_run_even_when_cached(tmp_path):
    """--dump-after needs the model after a pass: the run resumes before it, never after."""
    _compile()
    settings = {"measure_latency": False, "pipeline": [PIPELINE.format(limit=16)], "cache": True}
    result = qcompile.compile(tiny_cnn(), cnn_batches(12), config=settings,
                              dump_after=["plan-quantization"], dump_dir=tmp_path / "dumps")
    assert _cache_of(result)["plan-quantization"] != "hit"
    assert (tmp_path / "dumps" / "02-plan-quantization.onnx").is_file()


def test_passes_read_no_key_outside_the_cache_key():
    """NON_BUILD_KEYS are left out of cache keys and the config hash: no pass may read one, except
    the RUN_KEYS (threads, executor), whose effect on the bytes tests/test_executors.py checks."""
    passes = Path(__file__).parents[1] / "passes"
    read = {m for path in passes.glob("*.py") for m in re.findall(r"config\.(\w+)", path.read_text())}
    assert not read & (NON_BUILD_KEYS - RUN_KEYS)
    assert "threads" in read  # the allowance is used, not a leftover
    fields = set(CompileConfig.__dataclass_fields__)
    assert NON_BUILD_KEYS <= fields


def test_a_model_with_external_data_is_cached_with_its_weights(tmp_path):
    """Weights the passes leave in the input's data file are stored in the entry, not referenced."""
    import onnx

    path = tmp_path / "model.onnx"
    onnx.save(tiny_cnn(), str(path), save_as_external_data=True, location="model.data", size_threshold=0)
    settings = {"measure_latency": False, "pipeline": [PIPELINE.format(limit=16)], "cache": True}
    expected = qcompile.compile(str(path), cnn_batches(12), config={**settings, "cache": False}).to_proto()
    qcompile.compile(str(path), cnn_batches(12), config=settings)
    (tmp_path / "model.data").rename(tmp_path / "moved.data")  # an entry must not need it
    again = qcompile.compile(tiny_cnn(), cnn_batches(12), config=settings)  # same content, inline
    assert _cache_of(again)["calibrate"] == "hit"
    assert again.to_proto().SerializeToString() == expected.SerializeToString()


def test_large_models_are_cached_tensor_by_tensor(tmp_path, monkeypatch, pass_cache_dir):
    """The large-model path (weights on disk, qcompile.io.workspace): an entry keeps the weights in a
    data file beside its model, and a hit gives the bytes an uncached large compile gives."""
    from benchmarks.large_model import write_calibration, write_large_model
    from qcompile import api
    from qcompile.core import reproduce
    from qcompile.io import workspace

    model = write_large_model(tmp_path / "model", total_bytes=6 * 64 * 64 * 4, width=64)
    calib = write_calibration(tmp_path / "calib", width=64, batches=3, rows=8)
    for module in (workspace, api, pass_cache, reproduce):
        monkeypatch.setattr(module, "LARGE_MODEL_BYTES", 1024)
    monkeypatch.setattr(workspace, "SPILL_MIN_BYTES", 1024)

    def run(limit, **config):
        settings = {"measure_latency": False, "pipeline": [PIPELINE.format(limit=limit)], "cache": True, **config}
        return qcompile.compile(str(model), str(calib), config=settings)

    assert _cache_of(run(16))["calibrate"] == "stored"
    (entry,) = _entries(pass_cache_dir)
    assert (entry / "model.onnx.data").is_file()
    hit = run(1024)
    assert _cache_of(hit)["calibrate"] == "hit"
    uncached = run(1024, cache=False)
    assert hit.report.hashes["output_model"] == uncached.report.hashes["output_model"]
    hit.save(tmp_path / "hit.onnx", report_path=tmp_path / "report.json")
    uncached.save(tmp_path / "uncached.onnx")
    assert (tmp_path / "hit.onnx").read_bytes() == (tmp_path / "uncached.onnx").read_bytes()
    # Saved inline, a large model's file is recorded as written too, and verifies.
    assert main(["verify", str(tmp_path / "hit.onnx"), "--report", str(tmp_path / "report.json")]) == 0


_CONCURRENT = """
import json, sys
import qcompile
from qcompile import api
from qcompile.core import cache, reproduce
from qcompile.io import workspace
for module in (workspace, api, cache, reproduce):
    module.LARGE_MODEL_BYTES = 1024  # the large-model path: entries keep their weights in model.onnx.data
workspace.SPILL_MIN_BYTES = 1024
# A cache that holds about one entry: every store evicts what other processes may be reading.
init = cache.PassCache.__init__
cache.PassCache.__init__ = lambda self, directory, max_bytes: init(self, directory, 800_000)
# Reading a large entry takes long (SmolLM2: seconds): widen the window between checking an entry
# and linking its weights into the workspace, where an eviction used to pull them away.
import time
adopt = workspace.Workspace.adopt
def slow_adopt(self, model):
    time.sleep(0.05)
    return adopt(self, model)
workspace.Workspace.adopt = slow_adopt
model, calib, pipeline, method = sys.argv[1:5]
hashes = {}
for limit in (16, 1024, 64, 16):
    config = {"measure_latency": False, "pipeline": [pipeline.format(limit=limit)], "cache": True,
              "calibration_method": method}
    result = qcompile.compile(model, calib, config=config)
    result.save(f"{method}-{limit}.onnx")
    hashes[str(limit)] = result.report.hashes["output_model"]
print(json.dumps(hashes))
"""


def test_concurrent_compiles_share_one_cache_safely(tmp_path, monkeypatch, pass_cache_dir):
    """Four processes compile a model with external data against one cache at once, on the large-model
    path (entries keep weights in files), with a cache so small that every store evicts: each
    compile succeeds and gives the bytes a compile without the cache gives (evictions never pull an
    entry from under its reader, readers never see half an entry)."""
    import subprocess
    import sys

    import onnx

    from benchmarks.large_model import write_calibration, write_large_model
    from qcompile import api
    from qcompile.core import reproduce
    from qcompile.io import workspace

    model = write_large_model(tmp_path / "model", total_bytes=6 * 64 * 64 * 4, width=64)
    calib = write_calibration(tmp_path / "calib", width=64, batches=3, rows=8)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(model), load_external_data=False).graph.initializer)
    for module in (workspace, api, pass_cache, reproduce):
        monkeypatch.setattr(module, "LARGE_MODEL_BYTES", 1024)
    monkeypatch.setattr(workspace, "SPILL_MIN_BYTES", 1024)
    # Each process calibrates its own way: four entries for a cache that holds one.
    methods = ("mse", "minmax", "percentile", "entropy")
    expected = {method: {str(limit): qcompile.compile(str(model), str(calib), config={
        "measure_latency": False, "pipeline": [PIPELINE.format(limit=limit)], "cache": False,
        "calibration_method": method}).report.hashes["output_model"] for limit in (16, 1024, 64)} for method in methods}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    runs = {method: subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(model), str(calib), PIPELINE, method],
                                     cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for method in methods}
    for method, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1]) == expected[method]
    assert not list(pass_cache_dir.rglob(".tmp-*"))  # no half-written entry left behind


def test_the_default_size_limit_is_2_gb_and_storing_evicts(tmp_path, model_path, pass_cache_dir, monkeypatch):
    """Without --cache-max-mb the cache is bounded by 2 GB (it was 10 GB: a ResNet-18 compile stores
    ~92 MB, so the cache grew without a limit anyone meets); each store evicts down to the limit."""
    assert CompileConfig().cache_max_mb == 2000
    opened = []
    real_open = pass_cache.PassCache.open
    monkeypatch.setattr(pass_cache.PassCache, "open",
                        classmethod(lambda cls, root, max_bytes: opened.append(max_bytes) or real_open(root, max_bytes)))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, batch in enumerate(cnn_batches(3)):
        np.savez(calib / f"{i}.npz", **batch)
    assert main(["compile", str(model_path), "--calib", str(calib), "--no-latency", "-q", "-o", str(tmp_path / "q.onnx")]) == 0
    assert opened == [2000 * 1_000_000]
    # store() itself keeps the limit: with room for one entry, the second store evicts the first.
    store, _ = pass_cache.PassCache.open(tmp_path / "small", 10**9)
    assert store.store("0" * 64, _entry(0))
    store.max_bytes = sum(f.stat().st_size for f in store.path("0" * 64).iterdir()) * 3 // 2
    assert store.store("1" * 64, _entry(1))
    assert not store.path("0" * 64).exists() and store.path("1" * 64).exists()
