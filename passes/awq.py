"""AWQ: scale up the weight rows that meet the largest activations before rounding them to 4 bits.

Rounding error in a weight matters in proportion to the activation that multiplies it. AWQ (Lin et
al., MLSys 2024) multiplies each input channel's weight row by s_j = mean|X_j|^alpha (normalised)
and divides X by s, which leaves the float function unchanged but gives the salient channels a
finer effective grid. alpha is searched per MatMul input on a sample of calibration rows: each
candidate is scored by the output error of the group's MatMuls with block-wise RTN weights at the
bits/block/symmetry that ``quantize-weights`` will use. 1/s folds into the producer where it can
(LayerNorm, an RMSNorm weight), otherwise a Mul is inserted.
"""

from __future__ import annotations

__all__ = ["AWQScale"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.io.chunked_runs import DEFAULT_CHUNK
from qcompile.passes.channel_scaling import Group, apply_channel_scale, matmul_input_groups, observe_groups
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import quantize_blocks

logger = logging.getLogger(__name__)


def _output_error(group: Group, x: np.ndarray, s: np.ndarray, bits: int, block: int, symmetric: bool) -> float:
    """sum_k ||X W_k - (X / s) Q(diag(s) W_k)||^2 / sum_k ||X W_k||^2 on the sampled rows ``x``."""
    total, energy = 0.0, 0.0
    scaled_x = x / s
    for reader in group.readers:
        reference = x @ reader.weight
        quantized = quantize_blocks(np.ascontiguousarray((reader.weight * s[:, None]).T), bits, block, symmetric).dequantize().T
        total += float(np.sum((reference - scaled_x @ quantized).astype(np.float64) ** 2))
        energy += float(np.sum(reference.astype(np.float64) ** 2))
    return total / max(energy, 1e-30)


@register_pass("awq-scale", needs_data=True)
class AWQScale(ir.passes.InPlacePass):
    """Migrate per-channel scale from activations into the MatMul weights they meet (AWQ), before 4-bit rounding.

    Requires: calibration data that can be read more than once. Guarantees: the float model computes
    the same function (up to float rounding); each scaled tensor, its alpha and its simulated output
    error before and after are recorded in the report. Run it before ``quantize-weights`` with the
    same ``bits``, ``block`` and ``symmetric``.
    """

    def __init__(
        self, context, *, bits: int = 4, block: int = 128, symmetric: bool = True, grid: int = 10,
        batches: int | None = None, chunk: int = DEFAULT_CHUNK,
    ):
        super().__init__()
        self.context = context
        self.bits, self.block, self.symmetric, self.grid = bits, block, symmetric, grid
        self.batches, self.chunk = batches, chunk

    def requires(self, model: ir.Model) -> None:
        self.context.require_rereadable_data("awq-scale", "measures each MatMul's input channels",
                                             "remove awq-scale from the pipeline")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = matmul_input_groups(model.graph)
        if groups:
            observe_groups(model, groups, self.context, batches=self.batches, chunk=self.chunk, what="awq-scale")
        scaled = {}
        for group in groups:
            if group.sample is None:
                continue
            x, salience = group.sample, np.maximum(group.mean_abs, 1e-8)
            block = self.block or group.channels
            baseline = _output_error(group, x, np.ones(group.channels, np.float32), self.bits, block, self.symmetric)
            best = (baseline, 0.0, None)
            for alpha in np.linspace(0.0, 1.0, self.grid + 1)[1:]:
                s = salience**alpha
                s = np.maximum(s / np.sqrt(s.max() * s.min()), 1e-4).astype(np.float32)
                error = _output_error(group, x, s, self.bits, block, self.symmetric)
                if error < best[0]:
                    best = (error, float(alpha), s)
            error, alpha, s = best
            if s is None:
                continue
            how = apply_channel_scale(model.graph, group, s)
            scaled[group.value.name] = {
                "alpha": round(alpha, 3), "relative_error_before": baseline, "relative_error_after": error, "folded_into": how,
            }
        self.context.records["awq-scale"] = {"scaled": scaled, "candidates": len(groups)}
        logger.info("awq-scale: scaled %d of %d MatMul inputs", len(scaled), len(groups))
        return ir.passes.PassResult(model, bool(scaled))
