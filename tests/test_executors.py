"""Executors (qcompile.scaleout.executors) and the work they run: results in order, a killed worker's task
retried, the user's errors raised as themselves; sharded calibration equal to a single-process run
(bit for bit, histograms included, in any shard order); the accuracy search and the sensitivity
analysis giving the same answer on every executor. The tests taking ``parallel`` run on local
processes here and on a local Ray in tests/test_executors_ray.py."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from test_accuracy_search import CONFIG as SEARCH_CONFIG
from test_accuracy_search import spiky_batches, spiky_model
from tiny_models import cnn_batches, tiny_cnn, tiny_transformer, transformer_batches

import qcompile
from qcompile.analysis.accuracy_search import compile_within_budget
from qcompile.cli import main
from qcompile.core.config import CompileConfig
from qcompile.io.data import BatchSource, input_specs
from qcompile.errors import CalibrationDataError, ConfigError, ExecutorError
from qcompile.scaleout.executors import InProcessExecutor, LocalProcessExecutor
from qcompile.passes.calibration import collect_statistics, sharded_statistics
from qcompile.passes.quantization_plan import build_plan
from qcompile.analysis.sensitivity import activation_sensitivity, node_sensitivity
from qcompile.numerics.statistics import CalibrationTable


# ----- tasks (module level: workers import them) -----

def square_plus(item, shared, threads):
    return item * item + shared["add"], threads


def die_once(item, shared, threads):
    """Kills its worker process the first time it runs item 1; returns the item after that."""
    marker = Path(shared) / f"died-{item}"
    if item == 1 and not marker.exists():
        marker.write_text("killed")
        os._exit(1)
    return item


def always_die(item, shared, threads):
    os._exit(1)


def bad_data(item, shared, threads):
    raise CalibrationDataError(f"batch {item} is bad: give a good one")


# ----- fixtures -----

@pytest.fixture(scope="module")
def local_pool():
    executor = LocalProcessExecutor(2)
    yield executor
    executor.close()


@pytest.fixture
def parallel(local_pool):
    """The parallel executor the shared tests run on: local processes here, Ray in
    tests/test_executors_ray.py (which runs these same tests), so that Ray is up only there."""
    return local_pool


@pytest.fixture
def cnn_calib(tmp_path) -> Path:
    directory = tmp_path / "calib"
    directory.mkdir()
    for index, batch in enumerate(cnn_batches(23)):
        np.savez(directory / f"batch{index:03d}.npz", **batch)
    return directory


def model_sha(result) -> str:
    return hashlib.sha256(result.to_proto().SerializeToString(deterministic=True)).hexdigest()


# ----- the executors themselves -----

def test_map_keeps_item_order_sends_shared_once_and_splits_threads(parallel):
    results = parallel.map(square_plus, [3, 1, 2, 5], shared={"add": 10}, threads=1)
    assert results == [(19, 1), (11, 1), (14, 1), (35, 1)]
    assert parallel.parallel and parallel.workers == 2
    # Ray caps a task's CPUs at the largest node's (2 here): asking for more would wait forever.
    assert parallel.threads_per_task() >= 1 and parallel.threads_per_task(3) == (2 if parallel.name == "ray" else 3)
    assert parallel.map(square_plus, [1], shared={"add": 0}, threads=4) == [(1, 2 if parallel.name == "ray" else 4)]
    assert InProcessExecutor().map(square_plus, [2], shared={"add": 1}) == [(5, 0)]


def test_a_killed_worker_loses_only_its_task_which_is_retried(parallel, tmp_path):
    assert parallel.map(die_once, [0, 1, 2, 3], shared=str(tmp_path)) == [0, 1, 2, 3]
    assert (tmp_path / "died-1").exists()  # it did die once


def test_a_task_that_always_kills_its_worker_is_named(local_pool):
    with pytest.raises(ExecutorError, match=r"died 2 times running test task 0 \(1 retries\)"):
        local_pool.map(always_die, [0], retries=1, what="test task")
    # The pool recovers for the next call.
    assert local_pool.map(square_plus, [2], shared={"add": 0}, threads=1) == [(4, 1)]


def test_the_users_error_comes_back_as_itself(parallel):
    with pytest.raises(CalibrationDataError, match="batch 7 is bad: give a good one"):
        parallel.map(bad_data, [7])
    if parallel.name == "local":  # the workers were fine: the same pool serves the next call
        pool = parallel._pool
        assert parallel.map(square_plus, [3], shared={"add": 0}, threads=1) == [(9, 1)]
        assert parallel._pool is pool


def test_config_names_the_executor_and_refuses_nonsense():
    assert CompileConfig(executor="local", workers=2).workers == 2
    with pytest.raises(ConfigError, match="choose inprocess, local or ray"):
        CompileConfig(executor="threads")
    with pytest.raises(ConfigError, match="needs executor = 'ray'"):
        CompileConfig(ray_address="auto")
    with pytest.raises(ConfigError, match="needs executor = 'local' or 'ray'"):
        CompileConfig(workers=2)
    with pytest.raises(ConfigError, match="at least 1 worker"):
        LocalProcessExecutor(0)


# ----- sharded calibration -----

def _table_state(table: CalibrationTable) -> dict:
    return {name: (s.count, s.min, s.max, s.width_exponent, None if s.counts is None else s.counts.tobytes())
            for name, s in table.tensors.items()}


@pytest.mark.parametrize("histograms", [True, False], ids=["histograms", "minmax"])
def test_sharded_statistics_equal_a_single_pass_in_any_shard_order(local_pool, cnn_calib, histograms):
    model = ir.serde.deserialize_model(tiny_cnn())
    specs = input_specs(model)
    config = CompileConfig()
    from qcompile.backends import get_target

    names = build_plan(model, get_target("cpu"), config).calibrate
    # A single pass over the same batches (calibration() skips the held-out every 10th, as shards do).
    single = collect_statistics(model, names, BatchSource(str(cnn_calib), specs).calibration(),
                                histograms=histograms)
    shards = BatchSource(str(cnn_calib), specs).calibration_shards(4)
    assert [len(shard) for shard in shards] == [5, 5, 6, 5]  # 23 files less 2 held out, cut evenly
    sharded = sharded_statistics(model, names, shards, local_pool, specs=specs, histograms=histograms)
    assert _table_state(sharded) == _table_state(single)
    assert sharded.batches == single.batches == 21
    # Any merge order gives the same table: the workers' tables, merged backwards.
    tables = local_pool.map(
        functools.partial(_shard_table, histograms=histograms), shards,
        shared={"names": names}, threads=1)
    backwards = functools.reduce(CalibrationTable.merge, reversed(tables))
    assert _table_state(backwards) == _table_state(sharded)


def _shard_table(items, shared, threads, *, histograms):
    from qcompile.io.data import read_items

    model = ir.serde.deserialize_model(tiny_cnn())
    return collect_statistics(model, shared["names"], read_items(items, input_specs(model)), histograms=histograms,
                              threads=threads)


@pytest.mark.parametrize("method", ["mse", "minmax", "entropy"])
def test_compiled_model_is_byte_identical_on_every_executor(parallel, cnn_calib, method):
    config = {"calibration_method": method, "measure_latency": False}
    alone = qcompile.compile(tiny_cnn(), str(cnn_calib), config=config)
    sharded = qcompile.compile(tiny_cnn(), str(cnn_calib), config=config, executor=parallel)
    assert model_sha(sharded) == model_sha(alone)
    record = sharded.report.transformations["calibrate"]
    assert record["shards"] == 2 and record["batches_per_shard"] == [10, 11]
    assert record["executor"] == parallel.name
    assert sharded.report.evaluation == alone.report.evaluation  # the same held-out batches


def test_in_memory_batches_shard_too_and_an_iterator_is_read_here(local_pool):
    batches = transformer_batches(7)
    config = {"measure_latency": False}
    alone = qcompile.compile(tiny_transformer(), batches, config=config)
    sharded = qcompile.compile(tiny_transformer(), batches, config=config, executor=local_pool)
    assert model_sha(sharded) == model_sha(alone)
    assert sharded.report.transformations["calibrate"]["shards"] == 2
    streamed = qcompile.compile(tiny_transformer(), iter(batches), config=config, executor=local_pool)
    assert model_sha(streamed) == model_sha(alone)
    assert "calibrate" not in streamed.report.transformations


def test_bad_data_in_a_worker_is_the_same_clear_error(local_pool, tmp_path):
    directory = tmp_path / "calib"
    directory.mkdir()
    for index, batch in enumerate(cnn_batches(4)):
        np.savez(directory / f"b{index}.npz", **batch)
    np.savez(directory / "b9.npz", wrong_name=np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(CalibrationDataError, match="b9.npz"):
        qcompile.compile(tiny_cnn(), str(directory), executor=local_pool, config={"measure_latency": False})


def test_cli_compile_on_local_workers_writes_the_same_model(tmp_path, cnn_calib):
    model = tmp_path / "cnn.onnx"
    import onnx

    onnx.save(tiny_cnn(), str(model))
    outputs = {}
    for executor in ("inprocess", "local"):
        out = tmp_path / f"{executor}.onnx"
        workers = ["--workers", "2"] if executor == "local" else []
        assert main(["compile", str(model), "--calib", str(cnn_calib), "-o", str(out), "--no-latency", "-q",
                     "--executor", executor, *workers]) == 0
        outputs[executor] = out.read_bytes()
    assert outputs["local"] == outputs["inprocess"]


# ----- parallel accuracy search and sensitivity -----

def _search_summary(result, search):
    return model_sha(result), [(s["stage"], s["change"], s.get("min_sqnr_db"), s.get("error")) for s in search["steps"]]


@pytest.mark.parametrize("min_sqnr", [25.0, 80.0], ids=["met", "never-met"])
def test_accuracy_search_is_the_same_on_every_executor(parallel, min_sqnr):
    summaries = []
    for executor in (InProcessExecutor(), parallel):
        try:
            result, search = compile_within_budget(spiky_model(), spiky_batches(), config=SEARCH_CONFIG,
                                                   min_sqnr=min_sqnr, executor=executor)
        except qcompile.AccuracyGateError as error:
            result, search = error.result, error.search
        summaries.append(_search_summary(result, search))
        assert search["executor"]["executor"] == executor.name
    assert summaries[0] == summaries[1]
    assert len(summaries[0][1]) >= 5  # it went past the accuracy passes into promotions


METRIC_THAT_KILLS = '''
import multiprocessing, os
from pathlib import Path
import numpy as np

def score(run, batches):
    marker = Path(__file__).with_name("killed-once")
    if multiprocessing.parent_process() is not None and not marker.exists():
        marker.write_text("x")
        os._exit(1)  # the worker dies in the middle of scoring a candidate
    return -float(np.mean([np.abs(run(b)[0]).mean() for b in batches]))
'''


def test_a_worker_dying_during_the_search_loses_only_its_candidate(local_pool, tmp_path):
    metric = tmp_path / "metric.py"
    metric.write_text(METRIC_THAT_KILLS)
    runs = []
    for executor in (InProcessExecutor(), local_pool):
        result, search = compile_within_budget(spiky_model(), spiky_batches(), config=SEARCH_CONFIG,
                                               metric=f"{metric}:score", max_loss=0.5, executor=executor)
        runs.append((model_sha(result), [(s["change"], s.get("score")) for s in search["steps"]]))
    assert (tmp_path / "killed-once").exists()
    assert runs[0] == runs[1]


def test_activation_sensitivity_is_the_same_on_every_executor(local_pool):
    compiled = qcompile.compile(spiky_model(), spiky_batches(), config=SEARCH_CONFIG)
    alone, _ = activation_sensitivity(spiky_model(), compiled.model, spiky_batches(3))
    spread, summary = activation_sensitivity(spiky_model(), compiled.model, spiky_batches(3), executor=local_pool)
    assert [r.to_dict() for r in spread] == [r.to_dict() for r in alone]
    assert alone[0].tensor == "hidden" and alone[0].gain_db > 15  # the spiky channel's grid costs most
    assert summary["executor"] == "local" and summary["tensors"] == len(alone) >= 3


def test_node_sensitivity_is_the_same_on_every_executor(parallel):
    alone, summary = node_sensitivity(spiky_model(), spiky_batches(), config=SEARCH_CONFIG)
    spread, _ = node_sensitivity(spiky_model(), spiky_batches(), config=SEARCH_CONFIG, executor=parallel)
    assert spread == alone
    assert alone[0]["node"] == "mm2" and alone[0]["gain_db"] > 15  # mm2 reads the spiky tensor
    assert {"mm1", "mm2", "mm3"} <= {r["node"] for r in alone}
    assert summary["nodes"] == len(alone) and summary["compiled_min_sqnr_db"] < 10


def test_cli_sensitivity_prints_and_writes_the_ranking(tmp_path, capsys):
    import onnx

    model = tmp_path / "spiky.onnx"
    onnx.save(spiky_model(), str(model))
    calib = tmp_path / "calib"
    calib.mkdir()
    for index, batch in enumerate(spiky_batches()):
        np.savez(calib / f"b{index}.npz", **batch)
    config = tmp_path / "qcompile.toml"
    config.write_text("pipeline = [" + ", ".join(f'"{p}"' for p in SEARCH_CONFIG["pipeline"]) + "]\n")
    out = tmp_path / "sensitivity.json"
    assert main(["sensitivity", str(model), "--calib", str(calib), "--config", str(config), "--json", str(out),
                 "--executor", "local", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "on local (2 workers)" in printed
    first = printed.splitlines()[2]
    assert first.startswith("mm2 ")
    import json

    written = json.loads(out.read_text())
    assert written["nodes"][0]["node"] == "mm2" and written["summary"]["workers"] == 2



def test_a_cache_hit_keeps_this_runs_executor(local_pool, cnn_calib):
    """The pass cache restores what earlier passes left (config included), but where this run's
    work runs is this run's choice: a sharded run's entry must not make the next run shard."""
    stored = qcompile.compile(tiny_cnn(), str(cnn_calib), executor=local_pool,
                              config={"measure_latency": False, "cache": True, "executor": "local", "workers": 2})
    assert stored.report.transformations["calibrate"]["executor"] == "local"
    pipeline = stored.report.pipeline.replace("calibrate", "calibrate(chunk=4)")
    assert pipeline != stored.report.pipeline
    again = qcompile.compile(tiny_cnn(), str(cnn_calib), config={"measure_latency": False, "cache": True,
                                                                 "pipeline": [pipeline]})
    assert any(p["cache"] == "hit" for p in again.report.passes)
    assert "calibrate" not in again.report.transformations  # calibrated here, not on the old workers
    assert again.report.config["executor"] == "inprocess"
    assert model_sha(again) == model_sha(stored)
    # The thread count is not part of what is built: the config digest ignores it.
    assert again.report.hashes["config"] != stored.report.hashes["config"]  # the pipeline text differs
    threads = qcompile.compile(tiny_cnn(), str(cnn_calib), config={"measure_latency": False, "threads": 1})
    plain = qcompile.compile(tiny_cnn(), str(cnn_calib), config={"measure_latency": False})
    assert threads.report.hashes["config"] == plain.report.hashes["config"]
    assert model_sha(threads) == model_sha(plain)
