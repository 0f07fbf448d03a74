"""GPTQ rounding for per-channel integer weights: round one input column at a time and let the
columns not yet rounded absorb its error, on the grid ``insert-qdq`` stores.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023), round W [out, D] column by column (largest Hessian diagonal first) and
after each column update the later ones with the upper Cholesky factor U of H^-1, H = X^T X:

    e = (w_i - s * q_i) / U_ii,    W[:, later] -= e U_i,later

which minimises ||W X^T - W~ X^T||^2 greedily. ``quantize-weights(method=gptq)`` does this for
block-wise INT4; this pass does it for the per-channel (or per-tensor) INT8/INT7 weights of Conv,
Gemm and MatMul that a static QDQ compile stores, with the scales fixed first from the float
weights (the ones ``insert-qdq`` computes), so the plan, the calibration and the Q/DQ layout stay
as they are and only the integers change. It needs no iterations (AdaRound's 1000 per layer), so
it suits wide layers: a transformer's 1536-wide projections take milliseconds.
"""

from __future__ import annotations

__all__ = ["GptqRounding", "gptq_layer"]

import numpy as np

from qcompile.io.chunked_runs import DEFAULT_CHUNK
from qcompile.errors import ConfigError
from qcompile.numerics.gptq import gptq_order, gptq_sweep
from qcompile.passes.adaround import AdaRound, Rounding, _reconstruction
from qcompile.passes.registry import register_pass


def gptq_layer(w: np.ndarray, scale: np.ndarray, qmax: int, gram: np.ndarray, fixed: np.ndarray, *,
               damp: float = 0.01, act_order: bool = True) -> Rounding:
    """GPTQ integers for ``w`` [groups, out, D] on the grid ``scale`` (same shape, broadcast).

    ``gram`` [groups, D, D] is X^T X of the layer's input rows; ``fixed`` marks weights that are
    rounded to nearest whatever the columns before them did (the largest of each channel, so the
    scale insert-qdq recomputes from s * q stays the same); their error is passed on like any other.
    ``damp`` adds damp * mean(diag H) to the diagonal; a column whose input was always zero gets a
    diagonal of 1 and, having no correlations, rounds to nearest.
    """
    w64, scale64 = w.astype(np.float64), scale.astype(np.float64)
    ratio = w64 / scale64
    nearest = np.clip(np.rint(ratio), -qmax, qmax)
    q = np.stack([_gptq_group(w64[g], scale64[g], nearest[g], qmax, gram[g], fixed[g], damp, act_order)
                  for g in range(w.shape[0])])
    return Rounding(q, _reconstruction((nearest - ratio) * scale64, gram), _reconstruction((q - ratio) * scale64, gram))


def _gptq_group(w, scale, nearest, qmax, gram, fixed, damp, act_order) -> np.ndarray:
    try:
        order, upper, _ = gptq_order(gram, damp, act_order)
    except np.linalg.LinAlgError:  # not positive definite even damped: keep round-to-nearest
        return nearest
    w = np.asfortranarray(w[:, order], dtype=np.float32)
    scale = np.asfortranarray(scale[:, order], dtype=np.float32)
    fixed, pinned = fixed[:, order], nearest[:, order]

    def round_column(i: int, column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.where(fixed[:, i], pinned[:, i], np.clip(np.rint(column / scale[:, i]), -qmax, qmax))
        return q, q * scale[:, i]

    codes = gptq_sweep(w, upper, round_column)
    restored = np.empty(codes.shape)
    restored[:, order] = codes
    return restored


@register_pass("gptq-rounding", needs_data=True)
class GptqRounding(AdaRound):
    """Round each planned weight with GPTQ on the grid ``insert-qdq`` will store.

    Requires: the ``plan`` analysis and calibration data that can be read again. Runs after
    ``calibrate``, before ``insert-qdq`` (and before ``bias-correction``), as ``adaround`` does.
    Guarantees: every planned Conv/Gemm/MatMul weight (signed symmetric, read by that node only)
    is replaced by s * q, where s are the scales ``insert-qdq`` computes from the float weight
    and q the GPTQ integers, the largest weight of each channel rounded to nearest so the scales
    do not move: ``insert-qdq`` then stores exactly q. A layer keeps round-to-nearest where GPTQ
    is not better on the calibration data (the same measure as ``adaround``: the output error
    over X^T X). The float weights are kept in the ``unrounded_weights`` analysis for
    ``bias-correction``; the report lists each layer's output error relative to round-to-nearest.
    """

    pass_name = "gptq-rounding"
    suffix = "gptq_rounded"

    def __init__(self, context, *, damp: float = 0.01, act_order: bool = True, batches: int | None = None,
                 chunk: int = DEFAULT_CHUNK):
        if not 0.0 < damp < 1.0:
            raise ConfigError(f"gptq-rounding: damp must be in (0, 1) (got {damp}); 0.01 is the paper's.")
        super().__init__(context, batches=batches, chunk=chunk)
        self.options = {"damp": damp, "act_order": act_order}

    def round_layer(self, w, scale, qmax, gram, fixed) -> Rounding:
        return gptq_layer(w, scale, qmax, gram, fixed, **self.options)
