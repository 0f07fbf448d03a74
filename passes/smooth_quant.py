"""SmoothQuant: move activation outliers into the weights of the MatMuls that read them.

For an activation X read by MatMuls with constant weights W_k, and any positive vector s over X's
channels (its last axis): X W_k = (X / s) (diag(s) W_k). Transformer activations have a few
channels with values 10-20x larger than the rest, and one per-tensor activation scale must cover
them, so every other channel gets a handful of integer levels. Dividing those channels by s and
multiplying the matching weight rows by s moves the difficulty into the weights, which are
quantized per output channel and can take it (Xiao et al., "SmoothQuant", ICML 2023).

s_j = max|X_j|^alpha / max_k max|W_k[j, :]|^(1 - alpha). alpha is searched per tensor: each
candidate is scored by the relative output error of quantizing X / s and diag(s) W_k as the
target would (per-tensor activation range from X's per-channel min/max, per-channel symmetric
weights) on a sample of X's rows, held out: s and the range come from one half of the sample and
the error is measured on the other, both ways round. A tensor is smoothed only when the best
candidate lowers that error by at least ``min_gain``. Smoothing puts every channel at the edge of
its own calibrated range, where the next input beyond the calibration data clips; scored on the
rows that set the range, that cost never shows, and small calibration sets were smoothed at a loss
(found by the fuzzer: a Softmax -> MatMul scored 38 -> 41 dB and measured 38 -> 16 dB on fresh
inputs; a Clip -> Gemm 47 -> 15 dB). Where the data has many more rows than the sample (8x), the
range rests on far more rows than it is scored on, and candidates are scored in sample instead.
"""

from __future__ import annotations

__all__ = ["SmoothQuant"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.io.chunked_runs import DEFAULT_CHUNK
from qcompile.errors import CalibrationDataError
from qcompile.passes.channel_scaling import Group, apply_channel_scale, matmul_input_groups, observe_groups
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import activation_qparams, dequantize, quant_type, quantize, weight_qparams
from qcompile.io.workspace import release_tensor

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
        weight_type = quant_type(target.weight_type_name(config))
        per_channel = target.weight_per_channel if config.per_channel is None else config.per_channel
        smoothed, not_finite = {}, {}
        for group in groups:
            try:
                if group.channel_min is None:
                    continue
                why = _not_finite(group)
                if why:
                    # No scale can be computed from NaN/Inf; the tensor is left as it is.
                    not_finite[group.value.name] = why
                    logger.warning("smooth-quant: %s left unsmoothed: %s", group.value.name, why)
                    continue
                scorer = _Scorer(group, act_type, symmetric, weight_type, per_channel)
                baseline = scorer.score(None)
                best_alpha, best_error = None, baseline
                for alpha in self.alphas:
                    error = scorer.score(alpha)
                    if error < best_error:
                        best_alpha, best_error = alpha, error
                if best_alpha is None or best_error > (1.0 - self.min_gain) * baseline:
                    continue
                best_s = scorer.smoothing(best_alpha)
                how = apply_channel_scale(model.graph, group, best_s)
                smoothed[group.value.name] = {
                    "alpha": best_alpha, "relative_error_before": float(baseline),
                    "relative_error_after": float(best_error), "folded_into": how,
                }
            finally:  # a large model's weights were mapped to score them: unmap them
                for reader in group.readers:
                    release_tensor(reader.node.inputs[1].const_value)
        records["smoothed"] = smoothed
        if not_finite:
            records["not_finite"] = not_finite
        records["candidates"] = len(groups)
        logger.info("smooth-quant: smoothed %d of %d MatMul inputs", len(smoothed), len(groups))
        return ir.passes.PassResult(model, bool(smoothed))

def _not_finite(group: Group) -> str | None:
    """Why a group cannot be scored (NaN/Inf in a weight or in the observed activations), or None."""
    for reader in group.readers:
        if not np.isfinite(reader.weight).all():
            return f"weight {reader.node.inputs[1].name!r} of {reader.node.name!r} holds NaN or Inf"
    for values in (group.channel_min, group.channel_max, group.sample):
        if values is not None and not np.isfinite(values).all():
            return "its calibrated values hold NaN or Inf"
    return None


# Per-channel weights are quantized column by column, so the error over an evenly spaced subset of
# a wide weight's output columns estimates the whole: scoring a 8192 x 8192 weight costs 1/2 of it.
_SCORED_COLUMNS = 4096
# Candidates are scored in sample once the calibration data has this many times the sample's rows.
_IN_SAMPLE_ABOVE = 8


class _Scorer:
    """Relative output error of one group quantized with smoothing vector s, on the sampled rows."""

    def __init__(self, group: Group, act_type, symmetric: bool, weight_type, per_channel: bool):
        self.group = group
        self.x = group.sample
        widest = max(r.weight.shape[1] for r in group.readers)
        self.columns = [
            np.linspace(0, r.weight.shape[1] - 1, _SCORED_COLUMNS).round().astype(np.int64)
            if per_channel and widest > _SCORED_COLUMNS and r.weight.shape[1] > _SCORED_COLUMNS else slice(None)
            for r in group.readers
        ]
        self.reference = [self.x @ r.weight[:, c] for r, c in zip(group.readers, self.columns)]
        self.energy = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in self.reference) or 1.0
        self.act_type, self.symmetric = act_type, symmetric
        self.weight_type, self.per_channel = weight_type, per_channel
        self.activation_max = np.maximum(np.abs(group.channel_min), np.abs(group.channel_max))
        self.weight_max = np.max([np.abs(r.weight).max(axis=1) for r in group.readers], axis=0)

    def smoothing(self, alpha: float, activation_max: np.ndarray | None = None) -> np.ndarray:
        a = np.maximum(self.activation_max if activation_max is None else activation_max, 1e-5) ** alpha
        w = np.maximum(self.weight_max, 1e-5) ** (1.0 - alpha)
        return (a / w).astype(np.float32)

    def error(self, s: np.ndarray) -> float:
        # X / s spans exactly [min_j min_j / s_j, max_j max_j / s_j] over the observed data.
        return self._squared_error(s, self.group.channel_min, self.group.channel_max, slice(None)) / self.energy

    def score(self, alpha: float | None) -> float:
        """The error smoothing with ``alpha`` is judged by. Held out where the calibrated range rests
        on not many more rows than the sample (the range then overfits them, see ``held_out_error``);
        in sample where it rests on many more: the range from all the data then covers inputs like
        the sample's, and a range from half the sample would understate it and penalise smoothing
        (all-MiniLM-L6-v2, 16k rows: mean embedding cosine 0.9971 in sample, 0.9952 held out)."""
        if self.group.rows_seen > _IN_SAMPLE_ABOVE * len(self.x):
            return self.error(np.ones_like(self.activation_max) if alpha is None else self.smoothing(alpha))
        return self.held_out_error(alpha)

    def held_out_error(self, alpha: float | None) -> float:
        """The error of smoothing with ``alpha`` (None: not smoothing) on rows it was not fitted to:
        s and the activation range from one half of the sampled rows, the error on the other half,
        both ways round. Smoothing puts every channel at the edge of its own range, where the next
        row beyond the calibration data clips; scored on the rows that set the range, that never
        shows (see the module docstring)."""
        rows = np.arange(len(self.x))
        if len(rows) < 2:
            return self.error(np.ones_like(self.activation_max) if alpha is None else self.smoothing(alpha))
        total = 0.0
        for fit, held in ((rows[0::2], rows[1::2]), (rows[1::2], rows[0::2])):
            low, high = self.x[fit].min(axis=0), self.x[fit].max(axis=0)
            s = np.ones_like(high) if alpha is None else self.smoothing(alpha, np.maximum(np.abs(low), np.abs(high)))
            total += self._squared_error(s, low, high, held)
        return total / self.energy  # every sampled row is held out once

    def _squared_error(self, s: np.ndarray, channel_min, channel_max, rows) -> float:
        rmin, rmax = float(np.min(channel_min / s)), float(np.max(channel_max / s))
        scale, zero_point = activation_qparams(rmin, rmax, self.act_type, self.symmetric)
        zero_point = np.asarray(zero_point)
        x_q = dequantize(quantize(self.x[rows] / s, scale, zero_point, self.act_type), scale, zero_point)
        total = 0.0
        for reader, columns, reference in zip(self.group.readers, self.columns, self.reference):
            w = reader.weight[:, columns] * s[:, None]
            axis = 1 if self.per_channel else None
            w_scale, w_zero = weight_qparams(w, axis, self.weight_type)
            w_q = dequantize(quantize(w, w_scale, w_zero, self.weight_type, axis), w_scale, w_zero, axis)
            total += float(np.sum((reference[rows] - x_q @ w_q).astype(np.float64) ** 2))
        return total


