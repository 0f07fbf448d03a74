"""SmoothQuant: move activation outliers into the weights of the MatMuls that read them.

For an activation X read by MatMuls with constant weights W_k, and any positive vector s over X's
channels (its last axis): X W_k = (X / s) (diag(s) W_k). Transformer activations have a few
channels with values 10-20x larger than the rest, and one per-tensor activation scale must cover
them, so every other channel gets a handful of integer levels. Dividing those channels by s and
multiplying the matching weight rows by s moves the difficulty into the weights, which are
quantized per output channel and can take it (Xiao et al., "SmoothQuant", ICML 2023).

s_j = max|X_j|^alpha / max_k max|W_k[j, :]|^(1 - alpha). alpha is searched per tensor: each
candidate is scored by the relative output error of quantizing X / s and diag(s) W_k as the
target would (per-tensor activation range from X's per-channel min/max over the data, per-channel
symmetric weights), measured on a sample of X's rows, and a tensor is smoothed only when the best
candidate lowers that error by at least ``min_gain``.
"""

from __future__ import annotations

__all__ = ["SmoothQuant"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.errors import CalibrationDataError
from qcompile.passes.calibration import DEFAULT_CHUNK
from qcompile.passes.channel_scaling import Group, apply_channel_scale, matmul_input_groups, observe_groups
from qcompile.passes.registry import register_pass
from qcompile.qparams import activation_qparams, dequantize, quant_type, quantize, weight_qparams

logger = logging.getLogger(__name__)

_DEFAULT_ALPHAS = (0.5, 0.65, 0.75, 0.85, 0.95)


@register_pass("smooth-quant", needs_data=True)
class SmoothQuant(ir.passes.InPlacePass):
    """Divide outlier channels of MatMul inputs by s and fold s into the weights (SmoothQuant).

    Requires: calibration data that can be read more than once (a directory or a list; all of it,
    or the first ``batches`` batches: the channel ranges should cover what ``calibrate`` will see). Guarantees: the float model computes the same function (up to
    float rounding); a smoothed tensor's MatMuls read ``X / s`` from a new Mul (or from its
    LayerNormalization, whose scale and bias absorb 1/s when the MatMuls are its only readers)
    and use new weights diag(s) W. Each smoothed tensor, its alpha and its simulated error before
    and after are recorded in the report.
    """

    def __init__(
        self, context, *, alpha: float | None = None, batches: int | None = None, min_gain: float = 0.1,
        chunk: int = DEFAULT_CHUNK,
    ):
        super().__init__()
        self.context = context
        self.chunk = chunk
        self.alphas = (alpha,) if alpha is not None else _DEFAULT_ALPHAS
        self.batches = batches
        self.min_gain = min_gain

    def requires(self, model: ir.Model) -> None:
        if self.context.data is None:
            raise CalibrationDataError(
                "smooth-quant needs calibration data to measure activation channels. Pass --calib DIR, "
                "or remove smooth-quant from the pipeline."
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        records = self.context.records.setdefault("smooth-quant", {})
        if not self.context.data.rereadable:
            records["skipped"] = "calibration data is a one-shot iterator; pass a list or a directory to smooth"
            logger.warning("smooth-quant skipped: %s", records["skipped"])
            return ir.passes.PassResult(model, False)
        groups = matmul_input_groups(model.graph)
        if not groups:
            return ir.passes.PassResult(model, False)
        observe_groups(model, groups, self.context, batches=self.batches, chunk=self.chunk, what="smooth-quant")
        config, target = self.context.config, self.context.target
        act_type = quant_type(config.activation_type or target.default_activation_type)
        symmetric = target.activation_symmetric if config.activation_symmetric is None else config.activation_symmetric
        weight_type = quant_type(config.weight_type or target.default_weight_type)
        per_channel = target.weight_per_channel if config.per_channel is None else config.per_channel
        smoothed = {}
        for group in groups:
            if group.channel_min is None:
                continue
            scorer = _Scorer(group, act_type, symmetric, weight_type, per_channel)
            baseline = scorer.error(np.ones_like(group.channel_max))
            best_alpha, best_error, best_s = None, baseline, None
            for alpha in self.alphas:
                s = scorer.smoothing(alpha)
                error = scorer.error(s)
                if error < best_error:
                    best_alpha, best_error, best_s = alpha, error, s
            if best_s is None or best_error > (1.0 - self.min_gain) * baseline:
                continue
            how = apply_channel_scale(model.graph, group, best_s)
            smoothed[group.value.name] = {
                "alpha": best_alpha, "relative_error_before": float(baseline),
                "relative_error_after": float(best_error), "folded_into": how,
            }
        records["smoothed"] = smoothed
        records["candidates"] = len(groups)
        logger.info("smooth-quant: smoothed %d of %d MatMul inputs", len(smoothed), len(groups))
        return ir.passes.PassResult(model, bool(smoothed))

class _Scorer:
    """Relative output error of one group quantized with smoothing vector s, on the sampled rows."""

    def __init__(self, group: Group, act_type, symmetric: bool, weight_type, per_channel: bool):
        self.group = group
        self.x = group.sample
        self.reference = [self.x @ r.weight for r in group.readers]
        self.energy = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in self.reference) or 1.0
        self.act_type, self.symmetric = act_type, symmetric
        self.weight_type, self.per_channel = weight_type, per_channel
        self.activation_max = np.maximum(np.abs(group.channel_min), np.abs(group.channel_max))
        self.weight_max = np.max([np.abs(r.weight).max(axis=1) for r in group.readers], axis=0)

    def smoothing(self, alpha: float) -> np.ndarray:
        a = np.maximum(self.activation_max, 1e-5) ** alpha
        w = np.maximum(self.weight_max, 1e-5) ** (1.0 - alpha)
        return (a / w).astype(np.float32)

    def error(self, s: np.ndarray) -> float:
        # X / s spans exactly [min_j min_j / s_j, max_j max_j / s_j] over the observed data.
        rmin = float(np.min(self.group.channel_min / s))
        rmax = float(np.max(self.group.channel_max / s))
        scale, zero_point = activation_qparams(rmin, rmax, self.act_type, self.symmetric)
        x_q = dequantize(quantize(self.x / s, scale, np.asarray(zero_point), self.act_type), scale, np.asarray(zero_point))
        total = 0.0
        for reader, reference in zip(self.group.readers, self.reference):
            w = reader.weight * s[:, None]
            axis = 1 if self.per_channel else None
            w_scale, w_zero = weight_qparams(w, axis, self.weight_type)
            w_q = dequantize(quantize(w, w_scale, w_zero, self.weight_type, axis), w_scale, w_zero, axis)
            total += float(np.sum((reference - x_q @ w_q).astype(np.float64) ** 2))
        return total / self.energy


