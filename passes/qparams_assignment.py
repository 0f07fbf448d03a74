"""assign-qparams: the plan and the calibration table -> every planned activation's scale and zero point."""

from __future__ import annotations

__all__ = ["AssignQparams"]

import logging

import onnx_ir as ir

from qcompile.passes.quantization_plan import build_plan, require_plan
from qcompile.passes.registry import register_pass

logger = logging.getLogger(__name__)


@register_pass("assign-qparams", config_options={"method": "calibration_method", "percentile": "percentile"})
class AssignQparams(ir.passes.InPlacePass):
    """Fix every planned activation's scale and zero point from the calibration statistics.

    Requires: the ``plan`` analysis (``plan-quantization``) and the ``calibration`` table
    (``calibrate``) of this graph. Guarantees: a tensor the statistics show unfit to quantize (a
    mask or sentinel value, not float32, never computed on the data) stays float, with the nodes
    that would read it; the plan is refined for that, not made again, unless such an exclusion or a
    changed graph asks for it; every other planned activation has a scale and zero point, computed
    by ``qcompile.numerics.qparams`` from the range the configured method picks out of the statistics
    (``calibration_method``: mse, minmax, percentile, entropy, auto). Weights' and biases' scales
    are fixed from the weights themselves where ``insert-qdq`` writes them, also by
    ``qcompile.numerics.qparams``. The graph is unchanged.

    ``method`` and ``percentile`` are the config's ``calibration_method`` and ``percentile``, for
    the whole run (``calibrate`` reads the method too: minmax needs no histograms).
    """

    def __init__(self, context, *, method: str | None = None, percentile: float | None = None):
        super().__init__()
        self.context = context

    def requires(self, model: ir.Model) -> None:
        self.context.require_analysis("calibration", "assign-qparams", "calibrate")
        require_plan(self.context, model, "assign-qparams")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        table = self.context.analyses.calibration
        planned = self.context.analyses.plan
        plan = build_plan(model, self.context.target, self.context.config, table, planned=planned)
        self.context.analyses.plan = plan
        excluded = len(planned.activations) - len(plan.activations)
        logger.info("Assigned the scales of %d activations%s", len(plan.activations),
                    f" ({excluded} fewer: their statistics keep them float)" if excluded > 0 else "")
        return ir.passes.PassResult(model, False)
