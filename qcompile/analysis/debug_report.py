"""The per-layer error analysis's results (``qcompile debug``, ``debug.analyze``): one record per
quantized activation and weight, the report that holds them, its JSON, text and HTML forms, and
the definitions of every number in it."""

from __future__ import annotations

__all__ = ["DEFINITIONS", "OUTLIER_STDS", "DebugReport", "TensorError", "WeightError"]

import dataclasses
import json
import math
from typing import Any

import numpy as np

from qcompile.analysis.debug_html import percent, render_html

# Values farther than this many standard deviations from the mean count as outliers.
OUTLIER_STDS = 6.0

DEFINITIONS = {
    "accumulated_sqnr_db": "10 log10(sum x^2 / sum (x - q)^2): x the float value of the tensor, q the "
    "quantized model's (its DequantizeLinear output, every quantization upstream included); sums over all data",
    "isolated_sqnr_db": "10 log10(sum x^2 / sum (x - dq(q(x)))^2): the float tensor rounded on the quantized "
    "model's grid (its scale and zero point); the error if only this tensor were quantized",
    "clipped_fraction": "share of float values the grid saturates: outside [(qmin - zero_point - 1/2) * scale, "
    "(qmax - zero_point + 1/2) * scale], so their error exceeds half a step (grid_min/grid_max: the representable "
    "range itself)",
    "outlier_fraction": f"share of float values farther than {OUTLIER_STDS:g} standard deviations from the mean "
    "(counted on a 4096-bin histogram: exact to one bin, max|x| / 2048)",
    "peak_to_rms_db": "20 log10(max|x| / rms(x)): how much of a full-range grid the peaks use up; "
    "an 8-bit grid over [-max, max] gives about 53 - peak_to_rms_db dB SQNR",
    "grid_steps_used": "(the part of the grid's range the data covers) / scale: integer levels in use",
    "weight sqnr_db": "SQNR of the dequantized weight against the float weight it replaced, whole tensor and per "
    "output channel (the DequantizeLinear axis, or the consumer's output-channel axis)",
}


@dataclasses.dataclass
class TensorError:
    """Error and range statistics of one quantized activation, over all the data."""

    tensor: str  # the QuantizeLinear input in the quantized model
    dequantized: str  # the DequantizeLinear output that readers see
    index: int  # position in graph order among the quantized activations
    producer: str | None  # node name; None for a graph input
    producer_op: str  # "input" for a graph input
    consumers: list[str]
    consumer_ops: list[str]
    qtype: str | None  # None: a format this analysis does not simulate (no isolated SQNR)
    scale: float | list[float]
    zero_point: int | list[int]
    grid_min: float | None
    grid_max: float | None
    count: int = 0
    accumulated_sqnr_db: float | None = None
    isolated_sqnr_db: float | None = None
    clipped_fraction: float | None = None
    outlier_fraction: float | None = None
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    dynamic_range: float | None = None
    peak_to_rms_db: float | None = None
    abs_p9999: float | None = None
    grid_steps_used: float | None = None
    # Float values' histogram over [start, stop] (the data and the grid), HISTOGRAM_BINS bins.
    histogram: dict[str, Any] | None = None

    @property
    def consumer_summary(self) -> str:
        ops = sorted(set(self.consumer_ops))
        return ", ".join(ops) if ops else "(graph output)"


@dataclasses.dataclass
class WeightError:
    """Error of one dequantized constant against the float constant it replaced."""

    name: str  # the DequantizeLinear output
    quantized: str  # the integer initializer
    kind: str  # "weight" or "bias" (int32)
    consumers: list[str]
    consumer_ops: list[str]
    shape: list[int]
    qtype: str
    float_name: str | None  # the float model's constant; None when none was found
    match: str  # "same", "rescaled rows", "rescaled columns", "float constant" or "not found"
    channel_axis: int | None = None
    channels: int = 0
    sqnr_db: float | None = None
    worst_channel: int | None = None
    worst_channel_sqnr_db: float | None = None
    mean_channel_sqnr_db: float | None = None


def rounded(value: float | None, digits: int = 3) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return round(float(value), digits)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan: "inf" means no error at all
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def _sort_key(value: float | None) -> float:
    return math.inf if value is None or math.isnan(value) else value


@dataclasses.dataclass
class DebugReport:
    """Per-layer errors of a quantized model; ``to_json()``, ``to_html()``, ``str()`` for a summary."""

    float_model: str
    quant_model: str
    data: str
    batches: int
    tensors: list[TensorError]  # graph order
    weights: list[WeightError]  # graph order
    outputs: dict[str, dict]  # quantized vs float reference, per graph output
    reference: dict[str, Any]
    run: dict[str, Any]

    def worst(self, n: int | None = 10, by: str = "isolated") -> list[TensorError]:
        """The ``n`` tensors with the lowest ``by`` ("isolated" or "accumulated") SQNR, worst first."""
        if by not in ("isolated", "accumulated"):
            raise ValueError(f"by must be 'isolated' or 'accumulated', not {by!r}")
        ranked = sorted(self.tensors, key=lambda t: (_sort_key(getattr(t, f"{by}_sqnr_db")), t.index))
        return ranked if n is None else ranked[:n]

    def worst_weights(self, n: int | None = 10) -> list[WeightError]:
        ranked = sorted(self.weights, key=lambda w: _sort_key(w.worst_channel_sqnr_db))
        return ranked if n is None else ranked[:n]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "schema": "qcompile.analysis.debug/1",
            "float_model": self.float_model,
            "quant_model": self.quant_model,
            "data": self.data,
            "batches": self.batches,
            "definitions": DEFINITIONS,
            "outputs": self.outputs,
            "reference": self.reference,
            "run": self.run,
            "worst": [t.tensor for t in self.worst(None, "isolated")],
            "worst_accumulated": [t.tensor for t in self.worst(None, "accumulated")],
            "tensors": [dataclasses.asdict(t) for t in self.tensors],
            "worst_weights": [w.name for w in self.worst_weights(None)],
            "weights": [dataclasses.asdict(w) for w in self.weights],
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def to_html(self, top: int = 20, histograms: int = 6) -> str:
        """A self-contained HTML page (inline SVG and CSS, no scripts, nothing fetched)."""
        return render_html(self, DEFINITIONS, top=top, histograms=histograms)

    def text_table(self, n: int = 10) -> str:
        """The worst ``n`` activations and weights as a plain-text table."""
        lines = [(f"{len(self.tensors)} quantized activations, {len(self.weights)} quantized constants; "
                  f"{self.batches} batches in {self.run.get('seconds', 0):.1f} s")]
        for name, metrics in self.outputs.items():
            lines.append(f"output {name}: SQNR {_fmt(metrics.get('sqnr_db'))} dB vs float")
        if self.tensors:
            lines.append(f"worst activations (by isolated SQNR; {n} of {len(self.tensors)}):")
            lines.append(f"  {'#':>3} {'tensor':40} {'read by':18} {'isolated':>9} {'accum.':>8} "
                         f"{'clipped':>8} {'outliers':>9} {'scale':>10}")
            for rank, t in enumerate(self.worst(n), 1):
                lines.append(
                    f"  {rank:>3} {_clip(t.tensor, 40):40} {_clip(t.consumer_summary, 18):18} "
                    f"{_fmt(t.isolated_sqnr_db):>9} {_fmt(t.accumulated_sqnr_db):>8} "
                    f"{percent(t.clipped_fraction):>8} {percent(t.outlier_fraction):>9} {_scale(t.scale):>10}"
                )
        matched = [w for w in self.weights if w.worst_channel_sqnr_db is not None]
        if matched:
            lines.append(f"worst weights (by worst channel; {min(n, len(matched))} of {len(self.weights)}):")
            lines.append(f"  {'#':>3} {'weight':48} {'read by':14} {'tensor dB':>9} {'worst ch':>9} {'channel':>8}")
            for rank, w in enumerate(self.worst_weights(min(n, len(matched))), 1):
                lines.append(
                    f"  {rank:>3} {_clip(w.name, 48):48} {_clip(', '.join(sorted(set(w.consumer_ops))), 14):14} "
                    f"{_fmt(w.sqnr_db):>9} {_fmt(w.worst_channel_sqnr_db):>9} {w.worst_channel!s:>8}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text_table()


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _scale(value: float | list[float]) -> str:
    if isinstance(value, list):
        return f"{min(value):.3g}..{max(value):.3g}"
    return f"{value:.4g}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


