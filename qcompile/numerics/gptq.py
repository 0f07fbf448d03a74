"""GPTQ's column sweep (Frantar et al., ICLR 2023), shared by the block-wise INT4 weights of
``quantize-weights(method=gptq)`` and the per-channel INT8 weights of ``gptq-rounding``: how each
caller rounds one column differs, the error propagation does not.
"""

from __future__ import annotations

__all__ = ["gptq_order", "gptq_sweep"]

from collections.abc import Callable

import numpy as np


def gptq_order(hessian: np.ndarray, damp: float, act_order: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(column order, upper Cholesky factor of the damped H^-1 in that order, dead columns).

    Columns whose input was always zero (a zero diagonal) get a diagonal of 1: with no
    correlations, their rounding moves no other column. ``act_order``: largest diagonal first.
    ``damp`` adds damp * mean(diag H) to the diagonal for numerical stability. Raises
    ``np.linalg.LinAlgError`` when H is not positive definite even so."""
    k = hessian.shape[0]
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    # Row i holds how rounding column i moves the later columns.
    return order, np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32), dead


def gptq_sweep(w: np.ndarray, upper: np.ndarray, round_column: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]],
               *, lazy_batch: int = 128) -> np.ndarray:
    """Round the columns of ``w`` [N, K] (already in ``gptq_order``'s order; float32, modified in
    place) one by one, each rounding error moving the columns after it, and return the codes [N, K].

    ``round_column(i, column)`` gives column i's codes and the values they stand for. Lazy batch
    updates at two levels (the paper's Algorithm 1 uses one): errors of 16 columns reach the rest
    of their ``lazy_batch``-column batch, and errors of a batch reach all later columns, as matrix
    products; rank-1 updates touch only 16 columns, which keeps them in cache."""
    n, k = w.shape
    codes = np.zeros((n, k), dtype=np.float32, order="F")

    def round_columns(first: int, last: int) -> np.ndarray:
        errors = np.empty((n, last - first), dtype=np.float32, order="F")
        for i in range(first, last):
            column = w[:, i]
            codes[:, i], value = round_column(i, column)
            error = (column - value) / upper[i, i]
            w[:, i + 1 : last] -= np.outer(error, upper[i, i + 1 : last])
            errors[:, i - first] = error
        return errors

    inner = 16
    for start in range(0, k, lazy_batch):
        stop = min(start + lazy_batch, k)
        batch_errors = np.empty((n, stop - start), dtype=np.float32, order="F")
        for first in range(start, stop, inner):
            last = min(first + inner, stop)
            errors = round_columns(first, last)
            batch_errors[:, first - start : last - start] = errors
            w[:, last:stop] -= errors @ upper[first:last, last:stop]
        w[:, stop:] -= batch_errors @ upper[start:stop, stop:]
    return codes
