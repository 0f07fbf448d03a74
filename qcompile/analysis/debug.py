"""Per-layer error analysis: where a quantized model loses accuracy against its float original.

For every activation the quantized model rounds (a tensor T read by a QuantizeLinear whose output a
DequantizeLinear reads), on the same data:

- **accumulated SQNR**: the quantized model's value of T (the DequantizeLinear output, with every
  quantization upstream of it) against the float model's T. This is ONNX Runtime's
  ``qdq_loss_debug`` "xmodel_err".
- **isolated SQNR**: the float T rounded on the quantized model's grid (numpy QuantizeLinear then
  DequantizeLinear with its scale and zero point) against the float T: the error if only T were
  quantized. ORT's "qdq_err" rounds the quantized model's own T, whose inputs already carry the
  upstream error; rounding the float T instead separates a tensor's own error from what it
  inherits (the per-quantizer view of AIMET's QuantAnalyzer, measured at the tensor).

SQNR is 10 log10(sum x^2 / sum (x - y)^2) with the sums taken over all the data, not averaged
per batch. Weights (DequantizeLinear of a constant) are compared with the float weight they
replaced, per output channel; activations also get range statistics (``TensorError``).

The float value of T is read from the *reference*: the quantized graph with its quantization
undone (activation Q/DQ pairs bypassed, each weight DequantizeLinear replaced by the float weight
it came from, found through the float model's node of the same name). The reference computes
the float model's function in the quantized graph's form, so tensors that the compiler created
or rescaled (SmoothQuant's ``X / s``) have a float value too, and names never have to match. It
is checked against the float model's outputs on the first batch.

Memory stays bounded: the tensors are analysed in groups of ``group_size``; for each group a
session of each model exposes only that group's tensors as extra outputs, the data is run through
both (in chunks of ``chunk`` samples), and every tensor's values are folded into running sums at
once. Peak memory holds ``group_size`` tensors of one chunk, whatever the number of tensors or
batches; the cost is one pass over the data per group.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_GROUP_SIZE", "DEFINITIONS", "DebugReport", "TensorError", "WeightError", "activation_errors", "analyze",
]

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.io.chunked_runs import DEFAULT_CHUNK, ChunkedRunner, split_batch
from qcompile.io.data import input_specs, read_npz, validate_batch
from qcompile.analysis.debug_html import percent, render_html
from qcompile.errors import CalibrationDataError, ModelError, detail
from qcompile.analysis.evaluate import OutputError, sqnr_db
from qcompile.core.graph_edit import add_initializer
from qcompile.io.loader import describe_source, load_model
from qcompile.numerics.qparams import QUANT_TYPES, LookupQuantized, QuantType, dequantize, quantize
from qcompile.io.runtime import make_session
from qcompile.numerics.statistics import HALF_BINS, TensorStatistics

logger = logging.getLogger(__name__)

# Tensors exposed per ONNX Runtime session: peak memory holds this many activations of one chunk.
DEFAULT_GROUP_SIZE = 32
# A float weight is taken as a quantized weight's original when they agree to within this SQNR
# (int8 per channel gives 35-50 dB, int4 15-25 dB; an unrelated weight of the same shape about 0).
# 8-bit codes need 25 dB: PP-OCR's direction classifier has a Conv whose weight before BatchNorm
# folding is 10.6 dB from its folded, quantized form, and taking it as the original made the
# reference compute another function.
_WEIGHT_MATCH_DB = 10.0
_WEIGHT_MATCH_DB_8BIT = 25.0
# A per-row (or per-column) rescaling of the float weight is its original only when it fits this
# much better than the weight as it is (SmoothQuant's scales gain 10-40 dB).
_RESCALE_GAIN_DB = 3.0
# The reference must compute the float model's function: outputs below this SQNR mean QUANT was
# not compiled from FLOAT.
_REFERENCE_MIN_DB = 10.0
# Values farther than this many standard deviations from the mean count as outliers.
OUTLIER_STDS = 6.0
HISTOGRAM_BINS = 64

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
# A stored element type's full range (int8, not the narrower int7 that shares its storage).
_BY_IR_DTYPE = {t.ir_dtype: t for t in sorted(QUANT_TYPES.values(), key=lambda t: t.qmax - t.qmin)}

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


# ----------------------------------------------------------------------------- results


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


def _rounded(value: float | None, digits: int = 3) -> float | None:
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


# ----------------------------------------------------------------------------- the QDQ structure


@dataclasses.dataclass
class _Activation:
    """One activation Q/DQ pair of the quantized model, as numpy parameters."""

    error: TensorError
    reference_name: str  # the float value's name in the reference model
    q_scale: np.ndarray
    q_zero_point: np.ndarray
    dq_scale: np.ndarray
    dq_zero_point: np.ndarray
    axis: int | None
    qtype: QuantType | None
    # Values outside [clip_low, clip_high] saturate: the representable range widened by half a
    # step, per tensor or per axis.
    clip_low: np.ndarray | None = None
    clip_high: np.ndarray | None = None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _is_qdq(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in _QDQ_DOMAINS


def _qdq_params(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None, int | None, int | None]:
    """scale, zero point, axis (None when per tensor) and block size of a Q or DQ node."""
    scale = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if scale is None:
        raise _NotStatic(node.name)
    zero_point = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    axis = node.attributes["axis"].value if "axis" in node.attributes else 1  # ONNX's default
    block = node.attributes["block_size"].value if "block_size" in node.attributes else 0
    return scale.astype(np.float32), zero_point, (axis if scale.size > 1 or block else None), (block or None)


class _NotStatic(Exception):
    """A Q/DQ node whose scale is computed at run time (dynamic quantization): not analysed."""


def _q_type(q_node: ir.Node, zero_point: np.ndarray | None) -> QuantType | None:
    if zero_point is not None:
        dtype = ir.DataType.from_numpy(zero_point.dtype)
    elif "output_dtype" in q_node.attributes and q_node.attributes["output_dtype"].value:
        dtype = ir.DataType(q_node.attributes["output_dtype"].value)
    else:
        dtype = ir.DataType.UINT8  # QuantizeLinear's default
    qtype = _BY_IR_DTYPE.get(dtype)
    return qtype if qtype is not None and qtype.name != "int32" else None


def _dequantize_constant(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                         axis: int | None, block: int | None) -> np.ndarray:
    """ONNX DequantizeLinear of a constant: per tensor, per axis, or blocked along ``axis``."""
    zero_point = np.zeros(scale.shape, np.int64) if zero_point is None else zero_point.astype(np.int64)
    if block:
        axis = axis % q.ndim
        size = q.shape[axis]
        scale = np.repeat(scale, block, axis=axis).take(range(size), axis=axis)
        zero_point = np.repeat(zero_point, block, axis=axis).take(range(size), axis=axis)
        return ((q.astype(np.int64) - zero_point) * scale.astype(np.float32)).astype(np.float32)
    return dequantize(q, scale, zero_point, axis % q.ndim if axis is not None else None)


def _row_lookup(mul: ir.Node):
    """(last node, codes, scales, ids, other nodes) when ``mul`` is Cast(Gather(int codes, ids)) *
    Gather(float scales, ids): a table stored as integer rows with scales per row, or per block of
    a row and then reshaped back to rows (``qdq_insertion.dequantize_after_lookup``); else None."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2:
        return None
    for cast_value, scale_value in (mul.inputs, mul.inputs[::-1]):
        cast, scale_gather = cast_value.producer(), scale_value.producer()
        if cast is None or scale_gather is None or cast.op_type != "Cast" or scale_gather.op_type != "Gather":
            continue
        rows = cast.inputs[0].producer()
        if rows is None or rows.op_type != "Gather" or rows.inputs[1] is not scale_gather.inputs[1]:
            continue
        codes, scales = _const(rows.inputs[0]), _const(scale_gather.inputs[0])
        if codes is None or scales is None or codes.dtype.kind not in "iu" or scales.dtype.kind != "f" or codes.ndim < 2:
            continue
        nodes = [cast, rows, scale_gather]
        if scales.size == codes.shape[0]:
            return mul, rows.inputs[0], scale_gather.inputs[0], rows.inputs[1], nodes
        uses = mul.outputs[0].uses()
        if codes.ndim == 3 and scales.shape == (*codes.shape[:2], 1) and len(uses) == 1 and uses[0].node.op_type == "Reshape":
            reshape = uses[0].node
            shape_nodes = [n for n in (reshape.inputs[1].producer(),) if n is not None]
            shape_nodes += [i.producer() for n in shape_nodes for i in n.inputs if i.producer() is not None]
            return reshape, rows.inputs[0], scale_gather.inputs[0], rows.inputs[1], [mul, *shape_nodes, *nodes]
    return None


def _value_summary(node: ir.Node) -> tuple[list[str], list[str]]:
    readers = [use.node for out in node.outputs for use in out.uses()]
    return [n.name or "" for n in readers], [n.op_type for n in readers]


def _channel_axis(weight: np.ndarray, axis: int | None, consumers: list[tuple[ir.Node, int]]) -> int | None:
    """The output-channel axis of a weight: its DequantizeLinear axis, else its reader's convention."""
    if weight.ndim == 0:
        return None
    if axis is not None:
        return axis % weight.ndim
    if weight.ndim == 1:
        return 0
    node, index = consumers[0] if consumers else (None, 0)
    op = node.op_type if node is not None else ""
    if op == "ConvTranspose" and index == 1:
        return 1
    if op == "Gemm" and index == 1:
        trans_b = node.attributes["transB"].value if "transB" in node.attributes else 0
        return 0 if trans_b else 1
    if op == "Gemm" and index == 0:
        return 0
    if op == "MatMul":
        return weight.ndim - 1 if index == 1 else weight.ndim - 2
    return 0


def _channel_sqnr(reference: np.ndarray, dequantized: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        reference, dequantized, axis = reference.reshape(1), dequantized.reshape(1), 0
    x = np.moveaxis(reference.astype(np.float64), axis, 0).reshape(reference.shape[axis], -1)
    d = x - np.moveaxis(dequantized.astype(np.float64), axis, 0).reshape(x.shape)
    return np.array([sqnr_db(s, n) for s, n in zip((x * x).sum(axis=1), (d * d).sum(axis=1))])


def _whole_sqnr(reference: np.ndarray, dequantized: np.ndarray) -> float:
    return sqnr_db(_sum_of_squares(reference), _sum_of_squares(reference - dequantized))


def _match_floor_db(code_dtype: np.dtype) -> float:
    """How close a float weight must be to codes of ``code_dtype`` dequantized to be their original."""
    code_dtype = np.dtype(code_dtype)
    narrow = code_dtype.name in ("int4", "uint4", "int2", "uint2") or code_dtype.kind not in "iu"  # and float8
    return _WEIGHT_MATCH_DB if narrow else _WEIGHT_MATCH_DB_8BIT


def _float_original(dequantized: np.ndarray, candidates: list[tuple[str, np.ndarray]],
                    code_dtype: np.dtype = np.dtype(np.int8)) -> tuple[str, np.ndarray, str] | None:  # noqa: B008
    """The float constant ``dequantized`` was quantized from: (name, the float values in the
    quantized graph's form, how they were matched), or None. The match must be as close as codes
    of ``code_dtype`` allow (``_match_floor_db``).

    A candidate of the same shape matches as is, or after a per-row or per-column rescaling
    (SmoothQuant multiplies a MatMul weight's rows by s): the scale of each row is the least-squares
    fit of the dequantized row to the float row."""
    best = None
    for name, original in candidates:
        if original.shape != dequantized.shape or original.dtype.kind != "f":
            continue
        original = original.astype(np.float32)
        options = [(_whole_sqnr(original, dequantized), original, "same")]
        if original.ndim == 2:
            for axis, label in ((0, "rescaled rows"), (1, "rescaled columns")):
                spec = "ij,ij->i" if axis == 0 else "ij,ij->j"
                num = np.einsum(spec, original, dequantized, dtype=np.float64)
                den = np.einsum(spec, original, original, dtype=np.float64)
                s = np.divide(num, den, out=np.ones_like(num), where=den > 0)
                fitted = (original * _along(s, 2, axis)).astype(np.float32)
                options.append((_whole_sqnr(fitted, dequantized), fitted, label))
        same = options[0][0]
        score, values, how = max(options, key=lambda o: o[0])
        if how != "same" and same >= score - _RESCALE_GAIN_DB:
            score, values, how = options[0]  # fitting n scales to noise alone gains ~10 log10(n / (n - 1)) dB
        if score >= _match_floor_db(code_dtype) and (best is None or score > best[0]):
            best = (score, name, values, how)
    return None if best is None else best[1:]


def _weight_candidates(dq: ir.Node, float_nodes: dict[str, ir.Node], float_values: dict[str, ir.Value]):
    """Float constants that ``dq``'s output may have replaced: what the float model's node of the
    same name reads at the same input, then the names our and ORT's quantizers derive."""
    seen = set()
    for use in dq.outputs[0].uses():
        node = float_nodes.get(use.node.name)
        if node is not None and node.op_type == use.node.op_type and use.idx < len(node.inputs):
            value = node.inputs[use.idx]
            array = _const(value)
            if array is not None and value.name not in seen:
                seen.add(value.name)
                yield value.name, array
    names = [dq.inputs[0].name or "", dq.outputs[0].name or ""]
    for name in names:
        for suffix in ("_quantized", "_dequantized", "_DequantizeLinear_Output"):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                value = float_values.get(base)
                if value is not None and base not in seen:
                    array = _const(value)
                    if array is not None:
                        seen.add(base)
                        yield base, array


class _QuantizedGraph:
    """The quantized model's Q/DQ structure, and its reference: the same graph with quantization undone."""

    def __init__(self, quant: ir.Model, float_model: ir.Model):
        self.reference = quant  # rewritten in place below
        graph = quant.graph
        self.activations: list[_Activation] = []
        self.weights: list[WeightError] = []
        self.notes: list[str] = []
        float_nodes = {n.name: n for n in float_model.graph if n.name}
        float_values = {v.name: v for v in float_model.graph.initializers.values()}
        float_values.update({o.name: o for n in float_model.graph if n.op_type == "Constant" for o in n.outputs})

        pairs, weight_dqs, lookups, dynamic = [], [], [], 0
        for node in graph:
            if _is_qdq(node, "QuantizeLinear"):
                dqs = [u.node for u in node.outputs[0].uses() if _is_qdq(u.node, "DequantizeLinear")]
                if dqs:
                    pairs.append((node, dqs))
            elif _is_qdq(node, "DequantizeLinear") and _const(node.inputs[0]) is not None:
                weight_dqs.append(node)
            elif (lookup := _row_lookup(node)) is not None:
                lookups.append(lookup)
        alias: dict[str, str] = {}  # a bypassed DQ output -> the float value that replaces it
        position = 0
        for q_node, dqs in pairs:
            source = q_node.inputs[0]
            constant = _const(source)
            for dq in dqs:
                alias[dq.outputs[0].name] = source.name
                try:
                    q_scale, q_zp, q_axis, q_block = _qdq_params(q_node)
                    dq_scale, dq_zp, dq_axis, dq_block = _qdq_params(dq)
                except _NotStatic:
                    dynamic += 1
                    continue
                qtype = _q_type(q_node, q_zp)
                if constant is not None and qtype is not None and not q_block:
                    # A float constant stored with its own Q/DQ: it is its own original.
                    original = constant.astype(np.float32)
                    zero_point = q_zp if q_zp is not None else np.zeros(q_scale.shape, qtype.numpy_dtype)
                    q = quantize(original, q_scale, zero_point, qtype, q_axis)
                    dequantized = _dequantize_constant(q, dq_scale, dq_zp, dq_axis, dq_block)
                    self.weights.append(self._weight_error(
                        dq, source.name, q.dtype, dequantized, (source.name, original, "float constant"), dq_axis))
                elif constant is None:
                    axis = q_axis if q_axis is not None else dq_axis
                    self.activations.append(self._activation(q_node, dq, position, q_scale, q_zp, axis, q_block,
                                                              dq_scale, dq_zp))
                    position += 1
        if dynamic:
            self.notes.append(f"{dynamic} QuantizeLinear nodes with a scale computed at run time were skipped.")
        for activation in self.activations:
            name = activation.reference_name
            while name in alias:
                name = alias[name]
            activation.reference_name = name

        # Undo the quantization: readers of each DQ read the float value again.
        for q_node, dqs in pairs:
            for dq in dqs:
                ir.convenience.replace_all_uses_with(dq.outputs[0], q_node.inputs[0], replace_graph_outputs=True)
                graph.remove(dq, safe=True)
            if not q_node.outputs[0].uses() and not q_node.outputs[0].is_graph_output():
                graph.remove(q_node, safe=True)
            else:
                self.notes.append(f"QuantizeLinear {q_node.name!r} also feeds non-DequantizeLinear nodes; "
                                  "they read its integers in the reference too.")
        for dq in weight_dqs:
            self._replace_weight(dq, float_nodes, float_values)
        for lookup in lookups:
            self._replace_lookup(*lookup, float_nodes, float_values)

    def _activation(self, q_node, dq, position, q_scale, q_zp, axis, block, dq_scale, dq_zp) -> _Activation:
        source = q_node.inputs[0]
        producer = source.producer()
        consumers, consumer_ops = _value_summary(dq)
        qtype = _q_type(q_node, q_zp) if not block else None
        if q_zp is None:
            q_zp = np.zeros(q_scale.shape, (qtype or QUANT_TYPES["uint8"]).numpy_dtype)
        if dq_zp is None:
            dq_zp = np.zeros(dq_scale.shape, q_zp.dtype)
        clip_low = clip_high = grid_min = grid_max = None
        if qtype is not None:
            zero_point = q_zp.astype(np.float64)
            grid_min = float(np.min((qtype.qmin - zero_point) * q_scale))
            grid_max = float(np.max((qtype.qmax - zero_point) * q_scale))
            clip_low = ((qtype.qmin - zero_point - qtype.top_half_step) * q_scale).astype(np.float32)
            clip_high = ((qtype.qmax - zero_point + qtype.top_half_step) * q_scale).astype(np.float32)
        per_tensor = q_scale.size == 1
        error = TensorError(
            tensor=source.name,
            dequantized=dq.outputs[0].name,
            index=position,
            producer=producer.name if producer is not None else None,
            producer_op=producer.op_type if producer is not None else "input",
            consumers=consumers,
            consumer_ops=consumer_ops,
            qtype=qtype.name if qtype is not None else None,
            scale=float(q_scale.ravel()[0]) if per_tensor else [float(s) for s in q_scale.ravel()],
            zero_point=int(q_zp.ravel()[0]) if per_tensor else [int(z) for z in q_zp.ravel()],
            grid_min=grid_min,
            grid_max=grid_max,
        )
        return _Activation(error, source.name, q_scale, q_zp, dq_scale, dq_zp, axis, qtype, clip_low, clip_high)

    def _weight_error(self, dq, quantized_name, q_dtype, dequantized, original, axis) -> WeightError:
        consumers = [(u.node, u.idx) for u in dq.outputs[0].uses()]
        kind = "bias" if np.dtype(q_dtype) == np.int32 else "weight"
        qtype = np.dtype(q_dtype).name
        error = WeightError(
            name=dq.outputs[0].name,
            quantized=quantized_name,
            kind=kind,
            consumers=[n.name or "" for n, _ in consumers],
            consumer_ops=[n.op_type for n, _ in consumers],
            shape=list(dequantized.shape),
            qtype=str(qtype),
            float_name=original[0] if original else None,
            match=original[2] if original else "not found",
        )
        if original is None:
            return error
        reference = original[1]
        channel_axis = _channel_axis(dequantized, axis, consumers)
        per_channel = _channel_sqnr(reference, dequantized, channel_axis)
        finite = per_channel[np.isfinite(per_channel)]
        worst = int(np.argmin(per_channel))
        error.channel_axis = channel_axis
        error.channels = int(per_channel.size)
        error.sqnr_db = _rounded(_whole_sqnr(reference, dequantized))
        error.worst_channel = worst
        error.worst_channel_sqnr_db = _rounded(float(per_channel[worst]))
        error.mean_channel_sqnr_db = _rounded(float(finite.mean())) if finite.size else _rounded(float(per_channel.max()))
        return error

    def _replace_lookup(self, mul: ir.Node, codes: ir.Value, scales: ir.Value, ids: ir.Value, nodes: list[ir.Node],
                        float_nodes, float_values) -> None:
        """Gather(int8 rows) -> Cast -> Mul by the rows' scales (an embedding table stored per row,
        or per block of a row and reshaped back): the reference gathers from the float table instead."""
        q, row_scales = _const(codes), _const(scales).astype(np.float32)
        blocked = row_scales.size != q.shape[0]
        row_scales = row_scales if blocked else row_scales.reshape(-1, *([1] * (q.ndim - 1)))
        dequantized = LookupQuantized(q, row_scales, q.shape[-1] if blocked else None).dequantize()
        candidates = []
        float_value = next((o for n in float_nodes.values() for o in n.outputs if o.name == mul.outputs[0].name), None)
        producer = float_value.producer() if float_value is not None else None
        if producer is not None and producer.op_type == "Gather" and _const(producer.inputs[0]) is not None:
            candidates.append((producer.inputs[0].name, _const(producer.inputs[0])))
        if codes.name.endswith("_quantized") and codes.name[: -len("_quantized")] in float_values:
            base = codes.name[: -len("_quantized")]
            candidates.append((base, _const(float_values[base])))
        original = _float_original(dequantized, candidates, q.dtype)
        error = self._weight_error(mul, codes.name, q.dtype, dequantized, original, 0)
        error.kind = "lookup table"
        self.weights.append(error)
        if original is None:
            return
        graph = self.reference.graph
        table = add_initializer(graph, f"{codes.name}_float", np.ascontiguousarray(original[1]))
        gather = ir.node("Gather", [table, ids], attributes={"axis": 0}, name=f"{mul.name}_float_lookup")
        graph.insert_before(mul, gather)
        out, replacement = mul.outputs[0], gather.outputs[0]
        name = out.name
        ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
        for node in [mul, *nodes]:
            if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                graph.remove(node, safe=True)
        out.name, replacement.name = None, name

    def _replace_weight(self, dq: ir.Node, float_nodes, float_values) -> None:
        q_value = dq.inputs[0]
        q = _const(q_value)
        try:
            scale, zero_point, axis, block = _qdq_params(dq)
        except _NotStatic:
            return
        dequantized = _dequantize_constant(q, scale, zero_point, axis, block)
        original = _float_original(dequantized, list(_weight_candidates(dq, float_nodes, float_values)), q.dtype)
        self.weights.append(self._weight_error(dq, q_value.name, q.dtype, dequantized, original, axis))
        if original is None:
            return  # the reference keeps the dequantized weight
        graph = self.reference.graph
        replacement = add_initializer(graph, f"{dq.outputs[0].name}_float", np.ascontiguousarray(original[1]))
        ir.convenience.replace_all_uses_with(dq.outputs[0], replacement, replace_graph_outputs=True)
        graph.remove(dq, safe=True)


# ----------------------------------------------------------------------------- data


def _batch_source(data: Any) -> tuple[str, Callable[[], Iterator[tuple[str, Any]]]]:
    """(description, opener): the opener yields (where, batch) each time it is called."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_file() and path.suffix == ".npz":
            return str(path), lambda: iter([(path.name, read_npz(path, label="debug data"))])
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise CalibrationDataError(
                    f"debug data: directory {str(path)!r} has no .npz files. Save each batch with "
                    "numpy.savez(path, **{input_name: array})."
                )
            return f"{len(files)} .npz files in {path}", lambda: ((f.name, read_npz(f, label="debug data")) for f in files)
        raise CalibrationDataError(
            f"debug data: {str(path)!r} is neither a directory of .npz files nor an .npz file."
        )
    if isinstance(data, Mapping):
        return "1 in-memory batch", lambda: iter([("batch 0", data)])
    if isinstance(data, Iterable):
        # Each group of tensors reads the data again: an iterator's batches (model inputs, not
        # activations) are kept.
        items = list(data)
        return f"{len(items)} in-memory batches", lambda: ((f"batch {i}", b) for i, b in enumerate(items))
    raise CalibrationDataError(
        f"debug data must be a directory of .npz files, an .npz file, a dict or an iterable of dicts, "
        f"not {type(data).__name__}."
    )


# ----------------------------------------------------------------------------- streaming statistics


def _sum_of_squares(x: np.ndarray) -> float:
    flat = x.reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def _along(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Per-tensor (or per-axis) values shaped to broadcast against a tensor of rank ``ndim``."""
    if axis is None or values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


class _Accumulator:
    """Running sums for one activation; ``update`` folds one run's values and keeps nothing of them."""

    def __init__(self, activation: _Activation):
        self.activation = activation
        self.statistics = TensorStatistics()
        self.count = self.nonfinite = self.clipped = 0
        self.signal = self.noise = self.isolated_noise = self.total = 0.0

    def update(self, reference: np.ndarray, quantized: np.ndarray) -> None:
        a = self.activation
        if reference.shape != quantized.shape:
            raise ModelError(
                f"Tensor {a.error.tensor!r} has shape {list(reference.shape)} in the float reference but "
                f"{list(quantized.shape)} in the quantized model: the two models do not match."
            )
        x = np.asarray(reference, dtype=np.float32)
        y = np.asarray(quantized, dtype=np.float32)
        finite = np.isfinite(x) & np.isfinite(y)
        count = x.size
        if not finite.all():
            count = int(np.count_nonzero(finite))
            self.nonfinite += x.size - count
            # Zeros add nothing to any sum below; the shape stays, for per-axis parameters.
            x, y = np.where(finite, x, np.float32(0)), np.where(finite, y, np.float32(0))
        self.statistics.update(x[finite] if count < x.size else x)
        self.count += count
        # Sums of squares in float64 (einsum accumulates in its dtype without a float64 copy).
        self.signal += _sum_of_squares(x)
        self.total += float(np.sum(x, dtype=np.float64))
        self.noise += _sum_of_squares(x - y)
        if a.qtype is not None:
            axis = a.axis % x.ndim if a.axis is not None else None
            rounded = dequantize(quantize(x, a.q_scale, a.q_zero_point, a.qtype, axis), a.dq_scale, a.dq_zero_point, axis)
            self.isolated_noise += _sum_of_squares(x - rounded)
            low, high = _along(a.clip_low, x.ndim, axis), _along(a.clip_high, x.ndim, axis)
            outside = (x < low) | (x > high)
            self.clipped += int(np.count_nonzero(outside & finite if count < x.size else outside))

    def finish(self) -> TensorError:
        error, stats = self.activation.error, self.statistics
        error.count = self.count
        if not self.count:
            return error
        mean = self.total / self.count
        variance = max(self.signal / self.count - mean * mean, 0.0)
        std, rms = math.sqrt(variance), math.sqrt(self.signal / self.count)
        error.accumulated_sqnr_db = _rounded(sqnr_db(self.signal, self.noise))
        if self.activation.qtype is not None:
            error.isolated_sqnr_db = _rounded(sqnr_db(self.signal, self.isolated_noise))
            error.clipped_fraction = self.clipped / self.count
        error.min, error.max = float(stats.min), float(stats.max)
        error.mean, error.std = mean, std
        error.dynamic_range = error.max - error.min
        peak = max(abs(error.min), abs(error.max))
        error.peak_to_rms_db = _rounded(20 * math.log10(peak / rms)) if rms > 0 and peak > 0 else None
        width = 2.0 ** (stats.width_exponent or 0)
        centers = (np.arange(2 * HALF_BINS) - HALF_BINS + 0.5) * width
        if std > 0:
            error.outlier_fraction = float(stats.counts[np.abs(centers - mean) > OUTLIER_STDS * std].sum()) / stats.count
        else:
            error.outlier_fraction = 0.0
        folded = stats.counts[HALF_BINS:] + stats.counts[:HALF_BINS][::-1]
        cumulative = np.cumsum(folded)
        index = int(np.searchsorted(cumulative, 0.9999 * cumulative[-1], side="left"))
        error.abs_p9999 = min(float((index + 1) * width), peak)
        if error.grid_min is not None and error.scale:
            covered = max(0.0, min(error.max, error.grid_max) - max(error.min, error.grid_min))
            error.grid_steps_used = _rounded(covered / float(np.max(self.activation.q_scale)), 1)
        error.histogram = _histogram(stats, centers, error)
        return error


def _histogram(stats: TensorStatistics, centers: np.ndarray, error: TensorError) -> dict[str, Any]:
    """The float values' fine histogram regrouped into HISTOGRAM_BINS bins over the data and the grid."""
    low = min(error.min, error.grid_min if error.grid_min is not None else error.min)
    high = max(error.max, error.grid_max if error.grid_max is not None else error.max)
    if high <= low:
        high = low + 1.0
    occupied = stats.counts > 0
    index = np.clip(((centers[occupied] - low) / (high - low) * HISTOGRAM_BINS).astype(np.int64), 0, HISTOGRAM_BINS - 1)
    counts = np.bincount(index, weights=stats.counts[occupied], minlength=HISTOGRAM_BINS)
    return {"start": low, "stop": high, "counts": [int(c) for c in counts]}


# ----------------------------------------------------------------------------- running


def _with_outputs(proto: onnx.ModelProto, names: list[str], what: str, threads: int,
                  optimization: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    """A session on ``proto`` with ``names`` exposed as graph outputs (``proto`` is left as it was)."""
    existing = {o.name for o in proto.graph.output}
    count = len(proto.graph.output)
    for name in dict.fromkeys(names):
        if name not in existing:
            # No declared type: ORT reports the real one.
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        return make_session(proto, threads=threads, optimization=optimization, what=what, low_memory=True)
    finally:
        del proto.graph.output[count:]


def _paired_runs(reference: ChunkedRunner, quantized: ChunkedRunner, batch, where: str):
    """Both models' outputs on the same chunks of ``batch``: the reference decides how to cut it."""
    reference_runs = reference.runs(batch, where)
    first = next(reference_runs)
    quantized.independent = reference.independent
    quantized_runs = quantized.runs(batch, where)
    yield first, next(quantized_runs)
    yield from zip(reference_runs, quantized_runs)


def _load(model: Any, role: str) -> ir.Model:
    try:
        return load_model(model)
    except ModelError as error:
        raise ModelError(f"{role}: {error}") from None


def analyze(
    float_model: Any,
    quant_model: Any,
    data: Any,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    chunk: int = DEFAULT_CHUNK,
    max_batches: int | None = None,
    threads: int = 0,
    progress: Callable[[str], None] | None = None,
) -> DebugReport:
    """Per-layer errors of ``quant_model`` (a QDQ model) against ``float_model`` on ``data``.

    Models: .onnx paths, ``onnx.ModelProto`` or ``onnx_ir.Model`` (not modified). ``data``: a
    directory of .npz batches (keys = input names, as for calibration), one .npz file, a dict, or
    an iterable of dicts. ``group_size`` tensors are exposed per ONNX Runtime session (memory
    bound), batches run in chunks of ``chunk`` samples (0: whole). ``progress`` receives a
    one-line status now and then.
    """
    if group_size < 1:
        raise ValueError("group_size must be at least 1")
    start = time.perf_counter()
    float_ir = _load(float_model, "float model")
    quant_ir = _load(quant_model, "quantized model")
    _check_interfaces(float_ir, quant_ir)
    specs = input_specs(float_ir)
    description, opener = _batch_source(data)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for index, (where, batch) in enumerate(opener()):
            if max_batches is not None and index >= max_batches:
                return
            yield validate_batch(batch, specs, f"debug data, {where}")

    first = next(batches(), None)
    if first is None:
        raise CalibrationDataError("debug data has no batches.")
    piece = (split_batch(first, chunk) or [first])[0]
    # One model's session at a time: the float model's outputs on the first chunk, for the check below.
    float_outputs = _run_once(ir.serde.serialize_model(float_ir), piece, threads, "float model")
    quant_proto = ir.serde.serialize_model(quant_ir)
    # Q/DQ nodes inside If/Loop/Scan subgraphs, which the analysis does not reach.
    inside = sum(1 for n in ir.traversal.RecursiveGraphIterator(quant_ir.graph)
                 if n.graph is not quant_ir.graph and n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    structure = _QuantizedGraph(quant_ir, float_ir)  # quant_ir becomes the reference
    del float_ir, quant_ir
    if not structure.activations and not structure.weights and inside:
        # silero-vad: its whole 16 kHz network is one If branch.
        raise ModelError(
            f"The quantized model's {inside} QuantizeLinear/DequantizeLinear nodes are all inside "
            "If/Loop/Scan subgraphs, which qcompile debug does not analyse yet (ONNX Runtime cannot "
            "return a subgraph's values). Its outputs can still be compared: qcompile compile ... --eval DIR "
            "reports each output's SQNR, and qcompile sensitivity ranks its nodes."
        )
    if inside:
        logger.warning("qcompile debug analyses the main graph only: %d Q/DQ nodes inside If/Loop/Scan "
                       "subgraphs are not analysed", inside)
    if not structure.activations and not structure.weights:
        raise ModelError(
            "The quantized model has no QuantizeLinear -> DequantizeLinear pairs and no DequantizeLinear "
            "of a constant: there is nothing to analyse. Pass a QDQ model (qcompile compile's output, or "
            "ONNX Runtime's quantize_static with QuantFormat.QDQ) as QUANT."
        )
    reference_proto = ir.serde.serialize_model(structure.reference)
    del structure.reference
    reference_values = _run_once(reference_proto, piece, threads, "float reference (QUANT with its quantization undone)")
    check = _check_reference([o.name for o in reference_proto.graph.output], float_outputs, reference_values)
    del first, piece, float_outputs, reference_values

    activations = structure.activations
    groups = [activations[i : i + group_size] for i in range(0, len(activations), group_size)]
    output_names = [o.name for o in quant_proto.graph.output]
    reference_outputs = [o.name for o in reference_proto.graph.output]
    output_errors = {name: OutputError() for name in output_names}
    independent, batch_count, max_exposed = None, 0, 0
    finished: list[TensorError] = []
    for group_index, group in enumerate(groups):
        reference_names = [a.reference_name for a in group]
        quantized_names = [a.error.dequantized for a in group]
        with_outputs = group_index == 0  # the graph outputs ride along with the first group
        if with_outputs:
            reference_names, quantized_names = reference_names + reference_outputs, quantized_names + output_names
        max_exposed = max(max_exposed, len(group))
        basic, plain = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        reference_runner = ChunkedRunner(
            _with_outputs(reference_proto, reference_names, "float reference", threads, basic),
            reference_names, reference_outputs, chunk)
        # No graph optimizations: Q and DQ run as the reference kernels, no fusion hides a tensor.
        quantized_runner = ChunkedRunner(
            _with_outputs(quant_proto, quantized_names, "quantized model", threads, plain),
            quantized_names, output_names, chunk)
        reference_runner.independent = quantized_runner.independent = independent
        accumulators = [_Accumulator(a) for a in group]
        batch_count = 0
        for batch_index, batch in enumerate(batches()):
            for reference_values, quantized_values in _paired_runs(
                reference_runner, quantized_runner, batch, f"debug data batch {batch_index}"
            ):
                for accumulator, x, y in zip(accumulators, reference_values, quantized_values):
                    accumulator.update(x, y)
                if with_outputs:
                    for name, x, y in zip(output_names, reference_values[len(group):], quantized_values[len(group):]):
                        if np.issubdtype(np.asarray(x).dtype, np.floating):
                            output_errors[name].update(np.asarray(x), np.asarray(y))
            batch_count += 1
            if progress is not None:
                progress(f"tensors {group_index * group_size + 1}-{group_index * group_size + len(group)} "
                         f"of {len(activations)}: batch {batch_index + 1}, {time.perf_counter() - start:.1f} s")
        independent = reference_runner.independent
        if batch_count == 0:
            raise CalibrationDataError("debug data has no batches.")
        finished.extend(a.finish() for a in accumulators)
        del reference_runner, quantized_runner, accumulators
    if not groups:  # weights only: the outputs are still worth comparing
        batch_count = _compare_outputs(reference_proto, quant_proto, batches(), output_errors, chunk, threads)

    weights = structure.weights
    unmatched = [w.name for w in weights if w.float_name is None]
    reference = {
        "outputs_vs_float": check,
        "weights": len(weights),
        "weights_rescaled": sum(w.match.startswith("rescaled") for w in weights),
        "weights_without_float_original": unmatched,
        "notes": structure.notes + ([(
            f"{len(unmatched)} quantized constants have no float original in the float model; the reference "
            "keeps their dequantized values, so their rounding is not in the accumulated SQNR."
        )] if unmatched else []),
    }
    run = {
        "seconds": round(time.perf_counter() - start, 2),
        "group_size": group_size,
        "groups": len(groups),
        "max_tensors_per_session": max_exposed,
        "chunk": chunk,
        "simulation": "quantized model run by ONNX Runtime with graph optimizations off (QuantizeLinear/"
        "DequantizeLinear kernels, float compute); fused integer kernels may differ by a rounding step",
    }
    logger.debug("debug: %d activations, %d weights, %d batches, %.1f s", len(finished), len(weights), batch_count, run["seconds"])
    return DebugReport(
        float_model=describe_source(float_model),
        quant_model=describe_source(quant_model),
        data=description if max_batches is None else f"{description} (first {batch_count} batches)",
        batches=batch_count,
        tensors=sorted(finished, key=lambda t: t.index),
        weights=weights,
        outputs={name: e.summary() for name, e in output_errors.items() if e.norm_float or e.noise},
        reference=reference,
        run=run,
    )


def activation_errors(float_model: Any, quant_model: Any, data: Any, **options: Any) -> list[TensorError]:
    """Accumulated and isolated SQNR (and range statistics) of every quantized activation, in graph
    order: ``analyze(...).tensors``, for tools that rank tensors (``options`` as ``analyze``'s)."""
    return analyze(float_model, quant_model, data, **options).tensors


def _check_interfaces(float_ir: ir.Model, quant_ir: ir.Model) -> None:
    float_inputs = {s.name for s in input_specs(float_ir)}
    quant_inputs = {s.name for s in input_specs(quant_ir)}
    if float_inputs != quant_inputs:
        raise ModelError(
            f"The float model's inputs {sorted(float_inputs)} differ from the quantized model's "
            f"{sorted(quant_inputs)}. Pass the float model that QUANT was compiled from."
        )
    float_outputs = [o.name for o in float_ir.graph.outputs]
    quant_outputs = [o.name for o in quant_ir.graph.outputs]
    if float_outputs != quant_outputs:
        raise ModelError(
            f"The float model's outputs {float_outputs} differ from the quantized model's {quant_outputs}. "
            "Pass the float model that QUANT was compiled from."
        )


def _run_once(proto: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int, what: str) -> list[np.ndarray]:
    session = make_session(proto, threads=threads, what=what)
    try:
        return session.run(None, feed)
    except Exception as error:  # noqa: BLE001  (ORT raises its own exception types from C++)
        raise CalibrationDataError(f"ONNX Runtime failed on the first debug batch ({what}): {detail(error)}") from None


def _check_reference(names: list[str], float_values: list[np.ndarray], reference_values: list[np.ndarray]) -> dict[str, dict]:
    """The reference against the float model on the first chunk of the first batch: the same
    function, or QUANT was not compiled from FLOAT (and the analysis would mislead)."""
    results = {}
    for name, x, y in zip(names, float_values, reference_values):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            raise ModelError(
                f"Output {name!r} has shape {list(x.shape)} in the float model but {list(y.shape)} in the "
                "quantized one. Pass the float model that QUANT was compiled from."
            )
        if not np.issubdtype(x.dtype, np.floating):
            continue
        error = OutputError()
        error.update(x, y)
        results[name] = error.summary()
        if results[name]["sqnr_db"] < _REFERENCE_MIN_DB:
            raise ModelError(
                f"With its quantization undone, the quantized model's output {name!r} differs from the float "
                f"model's (SQNR {results[name]['sqnr_db']} dB): QUANT does not look like a quantization of "
                "FLOAT. Pass the float model that QUANT was compiled from."
            )
    return results


def _compare_outputs(reference_proto, quant_proto, batches, errors: dict[str, OutputError], chunk, threads) -> int:
    names = list(errors)
    reference = ChunkedRunner(make_session(reference_proto, threads=threads, what="float reference"), names, names, chunk)
    quantized = ChunkedRunner(make_session(quant_proto, threads=threads, what="quantized model"), names, names, chunk)
    count = 0
    for index, batch in enumerate(batches):
        for xs, ys in _paired_runs(reference, quantized, batch, f"debug data batch {index}"):
            for name, x, y in zip(names, xs, ys):
                if np.issubdtype(np.asarray(x).dtype, np.floating):
                    errors[name].update(np.asarray(x), np.asarray(y))
        count += 1
    return count
