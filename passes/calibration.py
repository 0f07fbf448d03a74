"""Calibration: run the model on representative data and collect activation statistics."""

from __future__ import annotations

__all__ = ["Calibrate", "calibrate_shard", "collect_statistics", "sharded_statistics"]

import functools
import logging
import time
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompile.io.chunked_runs import DEFAULT_CHUNK, observe
from qcompile.io.data import read_items
from qcompile.errors import CalibrationDataError, ModelError
from qcompile.scaleout.executors import Executor
from qcompile.log import Progress
from qcompile.passes.quantization_plan import require_plan
from qcompile.passes.registry import register_pass
from qcompile.io.runtime import make_session, session_source
from qcompile.numerics.statistics import CalibrationTable

logger = logging.getLogger(__name__)


def collect_statistics(
    model: ir.Model,
    tensor_names: list[str],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    threads: int = 0,
    progress: Progress | None = None,
    histograms: bool = True,
    chunk: int = DEFAULT_CHUNK,
    workspace=None,
) -> CalibrationTable:
    """Run ``model`` on each batch with ``tensor_names`` exposed as outputs, folding each into
    running statistics right away: memory holds one batch's activations, whatever the data size.
    ``histograms=False`` collects min/max only (all that minmax calibration reads). Batches are run
    in chunks of at most ``chunk`` samples (0: whole), see ``ChunkedRunner``. ``progress`` is told
    after each batch (``qcompile.log.Progress``); the command line shows it."""
    # Basic optimizations only: fusions could not remove observed tensors, but they cost start-up time.
    session = make_session(
        model, extra_outputs=tensor_names, workspace=workspace, threads=threads,
        optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, what="model for calibration", low_memory=True,
    )
    graph_outputs = [o.name for o in model.graph.outputs]
    return _fold_batches(session, tensor_names, graph_outputs, batches, histograms, chunk, progress)


def _fold_batches(session, tensor_names, graph_outputs, batches, histograms, chunk, progress) -> CalibrationTable:
    table = CalibrationTable(histograms=histograms)
    start = time.perf_counter()
    for runs in observe(session, tensor_names, graph_outputs, batches, chunk=chunk):
        for outputs in runs:
            for name, values in zip(tensor_names, outputs):
                table.update(name, values)
        table.batches += 1
        if progress is not None:
            progress("calibrating", table.batches, time.perf_counter() - start, False)
    if progress is not None:
        progress("calibrating", table.batches, time.perf_counter() - start, True)
    return table


def calibrate_shard(items: list, shared: dict, threads: int) -> CalibrationTable:
    """One worker's part of sharded calibration: the statistics of its shard of the data, collected
    by the same code as a single-process run (``_fold_batches``), for the driver to merge."""
    session = make_session(
        shared["model"], threads=threads, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        what="model for calibration", low_memory=True,
    )
    batches = read_items(items, shared["specs"])
    return _fold_batches(session, shared["tensors"], shared["graph_outputs"], batches, shared["histograms"],
                         shared["chunk"], None)


def sharded_statistics(
    model: ir.Model,
    tensor_names: list[str],
    shards: list[list],
    executor: Executor,
    *,
    specs,
    threads: int = 0,
    histograms: bool = True,
    chunk: int = DEFAULT_CHUNK,
    workspace=None,
) -> CalibrationTable:
    """``collect_statistics`` over ``shards`` (from ``BatchSource.calibration_shards``), one task
    each on ``executor``'s workers, merged in shard order. Statistics merge exactly
    (``qcompile.numerics.statistics``), so the table equals a single-process run's over the same batches.
    The model goes to the workers once: serialized, or (large models) as a path into the workspace."""
    with session_source(model, tensor_names, workspace) as source:
        shared = {"model": source, "tensors": list(tensor_names), "specs": specs, "histograms": histograms,
                  "chunk": chunk, "graph_outputs": [o.name for o in model.graph.outputs]}
        tables = executor.map(calibrate_shard, shards, shared=shared, threads=executor.threads_per_task(threads),
                              what="calibration shard")
    return functools.reduce(CalibrationTable.merge, tables)


@register_pass("calibrate", needs_data=True,
               config_options={"method": "calibration_method", "percentile": "percentile"})
class Calibrate(ir.passes.InPlacePass):
    """Collect min/max and a histogram of every tensor the plan quantizes, over the calibration data.

    Requires: the ``plan`` analysis and calibration data. Guarantees: the ``calibration``
    analysis (a ``CalibrationTable``) has statistics per tensor the plan observes, and nothing
    else changes: ``assign-qparams`` turns them into scales. The graph is unchanged.

    On a parallel executor (``executor = "local"`` or ``"ray"``) the data is cut into ``shards``
    (default: one per worker) that workers calibrate and the driver merges; the table is identical
    to a single-process run's. A one-shot iterator cannot be sharded and is read here.
    ``method`` and ``percentile`` are the config's ``calibration_method`` and ``percentile``, for
    the whole run (the pipeline sets them before any pass is built); here the method only decides
    whether histograms are collected (minmax needs none).
    """

    def __init__(self, context, *, method: str | None = None, percentile: float | None = None, chunk: int = DEFAULT_CHUNK,
                 shards: int = 0):
        super().__init__()
        self.context = context
        self.chunk, self.shards = chunk, shards

    def requires(self, model: ir.Model) -> None:
        require_plan(self.context, model, "calibrate")
        if self.context.data is None:
            raise CalibrationDataError(
                "This pipeline calibrates, but no calibration data was given. Pass --calib DIR "
                "(a directory of .npz batches) or calibration_data=... in the Python API."
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.context.analyses.plan
        config, data = self.context.config, self.context.data
        histograms = config.calibration_method != "minmax"
        executor = self.context.executor()
        shards = data.calibration_shards(self.shards or executor.workers) if executor.parallel else None
        if shards is not None:
            start = time.perf_counter()
            table = sharded_statistics(
                model, plan.calibrate, shards, executor, specs=data.specs, threads=config.threads,
                histograms=histograms, chunk=self.chunk, workspace=self.context.workspace,
            )
            seconds = time.perf_counter() - start
            self.context.records["calibrate"] = {
                **executor.describe(), "shards": len(shards), "batches_per_shard": [len(s) for s in shards],
                "seconds": round(seconds, 3),
            }
            if self.context.progress is not None:  # the shards report nothing while they run
                self.context.progress("calibrating", table.batches, seconds, True)
        else:
            if executor.parallel:
                logger.info("calibration data is a one-shot iterator: calibrating in this process, not sharded")
            table = collect_statistics(
                model, plan.calibrate, data.calibration(), threads=config.threads, progress=self.context.progress,
                histograms=histograms, chunk=self.chunk, workspace=self.context.workspace,
            )
        if table.batches == 0:
            raise ModelError("Calibration saw no batches.")
        self.context.analyses.calibration = table
        logger.info("Calibrated %d tensors on %d batches", len(table.tensors), table.batches)
        return ir.passes.PassResult(model, False)
