"""Accuracy and speed of the compiled model against the float one, on the same batches."""

from __future__ import annotations

__all__ = ["OutputError", "compare_outputs", "compare_to_outputs", "measure_latency", "sqnr_db"]

import dataclasses
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from qcompile.log import Progress


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """Signal-to-quantization-noise ratio: 10 log10(sum x^2 / sum (x - x_q)^2), inf when exact."""
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


@dataclasses.dataclass
class OutputError:
    """Streaming error statistics of one output over all evaluation batches."""

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    norm_float: float = 0.0
    norm_quant: float = 0.0
    max_abs: float = 0.0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        x = reference.astype(np.float64).ravel()
        y = candidate.astype(np.float64).ravel()
        diff = x - y
        self.signal += float(x @ x)
        self.noise += float(diff @ diff)
        self.dot += float(x @ y)
        self.norm_float += float(x @ x)
        self.norm_quant += float(y @ y)
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))

    def summary(self) -> dict:
        denominator = math.sqrt(self.norm_float * self.norm_quant)
        return {
            "sqnr_db": round(sqnr_db(self.signal, self.noise), 3),
            "cosine": round(self.dot / denominator, 6) if denominator else (1.0 if self.noise == 0 else 0.0),
            "max_abs_error": float(f"{self.max_abs:.6g}"),
        }


def compare_outputs(
    reference: ort.InferenceSession, candidate: ort.InferenceSession, batches: Sequence[dict], *,
    progress: Progress | None = None,
) -> dict[str, dict]:
    """Per-output SQNR (dB), cosine similarity and max abs error of candidate vs reference."""
    names = [o.name for o in reference.get_outputs()]
    return compare_to_outputs(names, (reference.run(names, batch) for batch in batches), candidate, batches,
                              progress=progress)


def compare_to_outputs(
    names: Sequence[str], expected: Iterable[Sequence[np.ndarray]], candidate: ort.InferenceSession,
    batches: Sequence[dict], *, progress: Progress | None = None,
) -> dict[str, dict]:
    """``compare_outputs`` against outputs computed earlier (``expected``: one list per batch), so
    the reference session need not be alive at the same time as the candidate (large models).
    ``progress`` hears of every batch (step ``evaluating``)."""
    errors = {name: OutputError() for name in names}
    start, done = time.perf_counter(), 0
    for batch, outputs in zip(batches, expected, strict=True):
        for name, x, y in zip(names, outputs, candidate.run(list(names), batch)):
            if np.issubdtype(np.asarray(x).dtype, np.floating):
                errors[name].update(np.asarray(x), np.asarray(y))
        done += 1
        if progress is not None:
            progress("evaluating", done, time.perf_counter() - start, done == len(batches))
    return {name: e.summary() for name, e in errors.items()}


def measure_latency(session: ort.InferenceSession, batch: dict, runs: int = 20, warmup: int = 3, *,
                    progress: Progress | None = None, step: str = "latency") -> dict:
    """Median and 90th percentile of wall time per run, in milliseconds, after warm-up runs.
    ``progress`` hears of every run, warm-up included (step ``step``, the runs as its batches)."""
    begin = time.perf_counter()
    for index in range(warmup):
        session.run(None, batch)
        if progress is not None:
            progress(step, index + 1, time.perf_counter() - begin, False)
    times = []
    for index in range(runs):
        start = time.perf_counter()
        session.run(None, batch)
        times.append((time.perf_counter() - start) * 1000.0)
        if progress is not None:
            progress(step, warmup + index + 1, time.perf_counter() - begin, index == runs - 1)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 3),
        "runs": runs,
    }
