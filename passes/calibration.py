"""Calibration: run the model on representative data and collect activation statistics."""

from __future__ import annotations

__all__ = ["Calibrate", "collect_statistics"]

import logging
import sys
import time
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.errors import CalibrationDataError, ModelError, detail
from qcompile.passes.quantization_plan import build_plan
from qcompile.passes.registry import register_pass
from qcompile.runtime import make_session
from qcompile.statistics import CalibrationTable

logger = logging.getLogger(__name__)


def collect_statistics(
    model: ir.Model,
    tensor_names: list[str],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    threads: int = 0,
    progress: bool = False,
    histograms: bool = True,
) -> CalibrationTable:
    """Run ``model`` on each batch with ``tensor_names`` exposed as outputs, folding each into
    running statistics right away: memory holds one batch's activations, whatever the data size.
    ``histograms=False`` collects min/max only (all that minmax calibration reads)."""
    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    for name in tensor_names:
        if name not in existing:
            # No declared type: ORT reports the real one, so values shape inference missed still work.
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    # Basic optimizations only: fusions could not remove observed tensors, but they cost start-up time.
    session = make_session(
        proto, threads=threads, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        what="model for calibration",
    )
    table = CalibrationTable(histograms=histograms)
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        try:
            outputs = session.run(tensor_names, batch)
        except Exception as error:
            raise CalibrationDataError(
                f"ONNX Runtime failed on calibration batch {index}: {detail(error)}"
            ) from None
        for name, values in zip(tensor_names, outputs):
            table.update(name, values)
        table.batches += 1
        if progress:
            print(f"\rcalibrating: {index + 1} batches, {time.perf_counter() - start:.1f}s",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return table


@register_pass("calibrate", needs_data=True)
class Calibrate(ir.passes.InPlacePass):
    """Collect min/max and a histogram of every tensor the plan quantizes, over the calibration data.

    Requires: the ``plan`` analysis and calibration data. Guarantees: the ``calibration``
    analysis has statistics per planned tensor, and the plan's scales and zero points are fixed
    from them with the configured method (minmax, percentile, entropy, mse). The graph is unchanged.
    """

    def __init__(self, context, *, method: str | None = None, percentile: float | None = None):
        super().__init__()
        self.context = context
        changes = {k: v for k, v in (("calibration_method", method), ("percentile", percentile)) if v is not None}
        if changes:
            context.config = context.config.replace(**changes)

    def requires(self, model: ir.Model) -> None:
        self.context.require_analysis("plan", "calibrate", "plan-quantization")
        if self.context.data is None:
            raise CalibrationDataError(
                "This pipeline calibrates, but no calibration data was given. Pass --calib DIR "
                "(a directory of .npz batches) or calibration_data=... in the Python API."
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.context.analyses["plan"]
        table = collect_statistics(
            model,
            plan.calibrate,
            self.context.data.calibration(),
            threads=self.context.config.threads,
            progress=self.context.show_progress,
            histograms=self.context.config.calibration_method != "minmax",
        )
        if table.batches == 0:
            raise ModelError("Calibration saw no batches.")
        self.context.analyses["calibration"] = table
        self.context.analyses["plan"] = build_plan(model, self.context.target, self.context.config, table)
        logger.info("Calibrated %d tensors on %d batches", len(table.tensors), table.batches)
        return ir.passes.PassResult(model, False)
