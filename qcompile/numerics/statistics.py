"""Streaming, mergeable activation statistics and the ranges calibration methods derive from them.

A ``TensorStatistics`` holds a tensor's exact min/max and a fixed-size histogram whose bin width is
a power of two. Widening the histogram merges neighbouring bins exactly, so statistics collected in
any order, in any number of pieces, and then merged are identical to a single pass over all data:
calibration memory depends on the number of tensors, never on the number of samples.
"""

from __future__ import annotations

__all__ = ["TensorStatistics", "CalibrationTable", "CALIBRATION_METHODS"]

import dataclasses
import math

import numpy as np

from qcompile.errors import ConfigError
from qcompile.numerics.qparams import QuantType, dequantize, quantize

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
# What "auto" chooses from, per tensor; on a tie, the earlier one.
AUTO_CANDIDATES = ("mse", "percentile", "minmax", "entropy")

# Bins on each side of zero. Bin i covers [i * width, (i + 1) * width) for i in [-HALF_BINS, HALF_BINS).
HALF_BINS = 2048


@dataclasses.dataclass
class TensorStatistics:
    """Running statistics of one tensor over all calibration batches.

    ``with_histogram=False`` keeps only count and min/max: enough for minmax calibration, and it
    skips the histogram's cost (most of the statistics time on large activations).
    """

    with_histogram: bool = True
    count: int = 0
    nonfinite: int = 0
    min: float = math.inf
    max: float = -math.inf
    # Bin width is 2 ** width_exponent; None until the first finite value arrives.
    width_exponent: int | None = None
    counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.with_histogram and self.counts is None:
            self.counts = np.zeros(2 * HALF_BINS, dtype=np.int64)

    # ----- collection -----
    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).ravel()
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = x[finite]
        if x.size == 0:
            return
        self.count += int(x.size)
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if not self.with_histogram:
            return
        self._widen_to(self._exponent_for(max(abs(lo), abs(hi))))
        # The width is a power of two, so x * 2**-e is exact in float32 (|x / width| < HALF_BINS:
        # no overflow) and floor() gives every value its true bin. Tiny widths (all-zero tensors
        # so far) need float64, where 2**-e itself does not overflow.
        dtype = np.float32 if self.width_exponent > -120 else np.float64
        bins = x.astype(dtype, copy=False) * dtype(2.0 ** -self.width_exponent)
        np.floor(bins, out=bins)
        bins += HALF_BINS
        np.clip(bins, 0, 2 * HALF_BINS - 1, out=bins)
        self.counts += np.bincount(bins.astype(np.intp), minlength=2 * HALF_BINS)

    def merge(self, other: TensorStatistics) -> TensorStatistics:
        """Combine two partial collections into the one a single pass over both would give."""
        merged = TensorStatistics(
            with_histogram=self.with_histogram and other.with_histogram,
            count=self.count + other.count,
            nonfinite=self.nonfinite + other.nonfinite,
            min=min(self.min, other.min),
            max=max(self.max, other.max),
        )
        for part in (self, other) if merged.with_histogram else ():
            if part.width_exponent is None:
                continue
            aligned = dataclasses.replace(part, counts=part.counts.copy())
            target = max(e for e in (self.width_exponent, other.width_exponent) if e is not None)
            aligned._widen_to(target)
            merged.width_exponent = target
            merged.counts = merged.counts + aligned.counts
        return merged

    @staticmethod
    def _exponent_for(amax: float) -> int:
        """Smallest power-of-two bin width whose HALF_BINS bins strictly contain amax."""
        if amax == 0.0:
            return -149  # the smallest float32 subnormal: any later value widens from here
        exponent = math.ceil(math.log2(amax / HALF_BINS))
        while amax >= HALF_BINS * 2.0**exponent:
            exponent += 1
        return exponent

    def _widen_to(self, exponent: int) -> None:
        if self.width_exponent is None:
            self.width_exponent = exponent
            return
        quarter = HALF_BINS // 2
        while self.width_exponent < exponent:
            # Bin b becomes floor(b / 2): pairs of neighbours merge into the middle half.
            halved = self.counts.reshape(HALF_BINS, 2).sum(axis=1)
            self.counts = np.zeros_like(self.counts)
            self.counts[quarter : quarter + HALF_BINS] = halved
            self.width_exponent += 1

    # ----- derived ranges -----
    @property
    def is_empty(self) -> bool:
        return self.count == 0

    @property
    def abs_max(self) -> float:
        return 0.0 if self.is_empty else max(abs(self.min), abs(self.max))

    def _bin_edges(self) -> np.ndarray:
        width = 2.0 ** (self.width_exponent or 0)
        return (np.arange(2 * HALF_BINS + 1) - HALF_BINS) * width

    def range(
        self, method: str, levels: int, percentile: float = 99.999, qtype: QuantType | None = None
    ) -> tuple[float, float]:
        """The (rmin, rmax) that ``method`` chooses for a format with ``levels`` integer values.

        - minmax: the observed extremes.
        - percentile: the two-sided ``percentile`` of the values (e.g. 99.999 clips 0.001% per side).
        - entropy: the clip threshold minimising KL divergence between the float histogram and its
          quantized form (TensorRT's method), applied to |x|.
        - mse: the shrink of [min, max] minimising the expected squared quantization error.
        - auto: per tensor, whichever of the above ``best_method`` finds quantizes it best.
        Every clipped range stays inside [min, max].

        For an FP8 ``qtype`` (``levels`` is then unused): minmax and percentile as above; mse
        searches the symmetric clip |x| <= a over FP8's own grid (each histogram bin's centre
        rounded with ml_dtypes); entropy is refused, since its KL search quantizes the histogram
        into evenly spaced groups, which an FP8 grid is not.
        """
        if self.is_empty:
            return 0.0, 0.0
        if qtype is not None and qtype.is_float and method == "entropy":
            raise ConfigError(
                f"Calibration method 'entropy' assumes an evenly spaced integer grid; {qtype.name} is "
                "not one. Use calibration_method = 'mse' (searched over the FP8 grid), 'minmax' or 'percentile'."
            )
        if method == "auto":
            method = self.best_method(levels, percentile, qtype)
        if method == "minmax":
            return self.min, self.max
        if not self.with_histogram:
            raise ConfigError(
                f"Calibration method {method!r} needs histograms, but these statistics were collected "
                "without them (minmax calibration). Calibrate again with that method."
            )
        if method == "percentile":
            return self._percentile_range(percentile)
        if method == "entropy":
            threshold = self._entropy_threshold(levels)
            return max(self.min, -threshold), min(self.max, threshold)
        if method == "mse":
            return self._float_mse_range(qtype) if qtype is not None and qtype.is_float else self._mse_range(levels)
        raise ConfigError(
            f"Unknown calibration method {method!r}. Use one of: {', '.join(CALIBRATION_METHODS)}."
        )

    def best_method(self, levels: int, percentile: float = 99.999, qtype: QuantType | None = None) -> str:
        """The calibration method whose range quantizes this tensor's calibration values with the
        least squared error, simulated on the histogram (each bin's values at its centre, rounded
        on the format's grid over that range: ``levels`` evenly spaced steps, or FP8's own grid).

        The histogram bins are finer than a step of any 8-bit or wider grid (2 x 2048 bins over
        the power-of-two span of the values), so the simulation sees both the clipped tails and the
        rounding inside the range, unlike mse's own estimate (step^2 / 12 inside the range).
        """
        if self.is_empty or not self.with_histogram:
            return "minmax"
        errors = {}
        for method in AUTO_CANDIDATES:
            if method == "entropy" and qtype is not None and qtype.is_float:
                continue
            errors[method] = self._grid_error(*self.range(method, levels, percentile, qtype), levels, qtype)
        return min(errors, key=errors.get)  # dicts keep AUTO_CANDIDATES' order: ties go to the earlier

    def _grid_error(self, rmin: float, rmax: float, levels: int, qtype: QuantType | None) -> float:
        edges = self._bin_edges()
        centers = (edges[:-1] + edges[1:]) / 2
        nonzero = self.counts > 0
        x, n = centers[nonzero], self.counts[nonzero].astype(np.float64)
        if qtype is not None and qtype.is_float:
            scale = np.float32(max(max(abs(rmin), abs(rmax)) / qtype.qmax, 1e-12))
            zero = np.zeros((), dtype=qtype.numpy_dtype)
            rounded = dequantize(quantize(x.astype(np.float32), scale, zero, qtype), scale, zero).astype(np.float64)
        else:
            low, high = min(rmin, 0.0), max(rmax, 0.0)  # every grid holds 0 exactly
            step = max((high - low) / (levels - 1), 1e-12)
            rounded = low + np.clip(np.round((x - low) / step), 0, levels - 1) * step
        return float(np.sum((x - rounded) ** 2 * n))

    def _percentile_range(self, percentile: float) -> tuple[float, float]:
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}.")
        cumulative = np.cumsum(self.counts)
        total = cumulative[-1]
        tail = total * (100.0 - percentile) / 100.0
        edges = self._bin_edges()
        low_bin = int(np.searchsorted(cumulative, tail, side="right"))
        high_bin = int(np.searchsorted(cumulative, total - tail, side="left"))
        rmin = max(self.min, float(edges[low_bin]))
        rmax = min(self.max, float(edges[min(high_bin + 1, len(edges) - 1)]))
        return rmin, rmax

    def _folded_abs_histogram(self) -> np.ndarray:
        """Counts of |x| per bin [i * width, (i + 1) * width), i in [0, HALF_BINS)."""
        negative = self.counts[:HALF_BINS][::-1]  # bin -i-1 holds |x| in (i * w, (i + 1) * w]
        return self.counts[HALF_BINS:] + negative

    def _entropy_threshold(self, levels: int) -> float:
        hist = self._folded_abs_histogram().astype(np.float64)
        # The first bin holds the exact zeros of a Relu/Clip output (half its values): a spike that
        # says nothing about the range but, spread over a whole quantization group, makes the KL
        # divergence favour ever smaller thresholds (a Clip(0, 6) output clipped at a fifth of its
        # range, 4 dB SQNR). Count it like its neighbour, as NVIDIA's pytorch-quantization does.
        hist[0] = hist[1]
        width = 2.0 ** (self.width_exponent or 0)
        last = int(np.nonzero(hist)[0].max()) + 1 if hist.any() else 1
        target_bins = max(levels // 2, 2)
        if last <= target_bins:
            return self.abs_max
        best_kl, best_stop = math.inf, last
        nonzero = hist > 0
        # A threshold clips a tail, never the bulk: it keeps at least half the values. (Values far
        # from zero, all in [-1.5, -0.5], once got a threshold below all of them: clipped into
        # one bin, they are a point mass that its quantized form matches exactly, KL 0.)
        first = max(target_bins, int(np.searchsorted(np.cumsum(hist), hist.sum() / 2)) + 1)
        # Candidate thresholds from there up to the last non-empty bin, ~256 candidates.
        for stop in np.unique(np.linspace(first, last, num=min(256, last - first + 1)).astype(int)):
            stop = int(stop)
            reference = hist[:stop].copy()
            reference[stop - 1] += hist[stop:].sum()  # clipped values land in the last bin
            # Quantize the first `stop` bins into target_bins groups (np.array_split's sizes), and
            # spread each group's mass evenly over its non-empty bins.
            size, extra = divmod(stop, target_bins)
            sizes = np.full(target_bins, size)
            sizes[:extra] += 1
            starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            group_mass = np.add.reduceat(hist[:stop], starts)
            group_nonzero = np.add.reduceat(nonzero[:stop].astype(np.int64), starts)
            per_bin = np.divide(group_mass, group_nonzero, out=np.zeros(target_bins), where=group_nonzero > 0)
            candidate = np.repeat(per_bin, sizes) * nonzero[:stop]
            q_total = candidate.sum()
            if q_total == 0:
                continue
            p = reference / reference.sum()
            q = candidate / q_total
            mask = p > 0
            q_masked = np.where(q[mask] > 0, q[mask], 1e-12)
            kl = float(np.sum(p[mask] * np.log(p[mask] / q_masked)))
            if kl < best_kl:
                best_kl, best_stop = kl, stop
        return min(self.abs_max, best_stop * width)

    def _mse_range(self, levels: int) -> tuple[float, float]:
        edges = self._bin_edges()
        centers = (edges[:-1] + edges[1:]) / 2
        nonzero = self.counts > 0
        x, n = centers[nonzero], self.counts[nonzero].astype(np.float64)
        # Shrink factors for the range [min * a, max * a] (both sides include 0 already).
        shrink = np.linspace(0.05, 1.0, 96)[:, None]
        lo = min(self.min, 0.0) * shrink
        hi = max(self.max, 0.0) * shrink
        scale = np.maximum((hi - lo) / (levels - 1), 1e-12)
        clipped = np.clip(x[None, :], lo, hi)
        rounding = scale**2 / 12.0  # uniform rounding error inside the range
        error = ((x[None, :] - clipped) ** 2 + rounding) * n[None, :]
        best = int(np.argmin(error.sum(axis=1)))
        return float(max(self.min, lo[best, 0])), float(min(self.max, hi[best, 0]))


    def _float_mse_range(self, qtype: QuantType) -> tuple[float, float]:
        """The symmetric clip a (range [-a, a], scale a / qmax) minimising the squared error of
        FP8 quantize-dequantize over the histogram, each bin's values taken at its centre.

        Clipping more moves small values out of FP8's subnormals at the cost of the clipped tail;
        relative precision elsewhere does not depend on a, so the best a is usually near max|x|.
        """
        edges = self._bin_edges()
        centers = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)
        nonzero = self.counts > 0
        x, n = centers[nonzero], self.counts[nonzero].astype(np.float64)
        best, best_error = self.abs_max, math.inf
        for shrink in np.linspace(0.05, 1.0, 96)[::-1]:
            amax = self.abs_max * float(shrink)
            scale = np.float32(max(amax / qtype.qmax, 1e-12))
            zero = np.zeros((), dtype=qtype.numpy_dtype)
            rounded = dequantize(quantize(x, scale, zero, qtype), scale, zero).astype(np.float64)
            error = float(np.sum((x - rounded) ** 2 * n))
            if error < best_error:
                best, best_error = amax, error
        return float(max(self.min, -best)), float(min(self.max, best))


@dataclasses.dataclass
class CalibrationTable:
    """Statistics per tensor name: the analysis result calibration produces and the planner reads."""

    tensors: dict[str, TensorStatistics] = dataclasses.field(default_factory=dict)
    batches: int = 0
    histograms: bool = True
    # Observed tensors that turned out not to be float32 (name -> dtype): never quantized.
    non_float: dict[str, str] = dataclasses.field(default_factory=dict)

    def update(self, name: str, values: np.ndarray) -> None:
        if values.dtype != np.float32:
            self.non_float[name] = str(values.dtype)
            return
        statistics = self.tensors.get(name)
        if statistics is None:
            statistics = self.tensors[name] = TensorStatistics(with_histogram=self.histograms)
        statistics.update(values)

    def merge(self, other: CalibrationTable) -> CalibrationTable:
        merged = CalibrationTable(
            batches=self.batches + other.batches, non_float={**self.non_float, **other.non_float},
            histograms=self.histograms and other.histograms,
        )
        for name in sorted(set(self.tensors) | set(other.tensors)):
            parts = [t for t in (self.tensors.get(name), other.tensors.get(name)) if t is not None]
            merged.tensors[name] = parts[0] if len(parts) == 1 else parts[0].merge(parts[1])
        return merged

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorStatistics:
        return self.tensors[name]
