"""The structure of a quantized (QDQ) graph, read for the error analysis: its activation Q/DQ pairs,
weight and lookup-table DequantizeLinears, each constant matched with the float weight it came
from, and the *reference* built from it (the quantized graph with its quantization undone)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.analysis.debug_report import TensorError, WeightError, rounded
from qcompile.analysis.evaluate import sqnr_db
from qcompile.core.graph_edit import QdqNames as N, add_initializer
from qcompile.numerics.qparams import QUANT_TYPES, LookupQuantized, QuantType, dequantize, quantize

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

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
# A stored element type's full range (int8, not the narrower int7 that shares its storage).
_BY_IR_DTYPE = {t.ir_dtype: t for t in sorted(QUANT_TYPES.values(), key=lambda t: t.qmax - t.qmin)}


def sum_of_squares(x: np.ndarray) -> float:
    flat = x.reshape(-1)
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def along(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Per-tensor (or per-axis) values shaped to broadcast against a tensor of rank ``ndim``."""
    if axis is None or values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


@dataclasses.dataclass
class Activation:
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
    return sqnr_db(sum_of_squares(reference), sum_of_squares(reference - dequantized))


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
                fitted = (original * along(s, 2, axis)).astype(np.float32)
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
        for suffix in (N.QUANTIZED, N.DEQUANTIZED, *N.LEGACY_QUANTIZED, *N.LEGACY_DEQUANTIZED):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                value = float_values.get(base)
                if value is not None and base not in seen:
                    array = _const(value)
                    if array is not None:
                        seen.add(base)
                        yield base, array


class QuantizedGraph:
    """The quantized model's Q/DQ structure, and its reference: the same graph with quantization undone."""

    def __init__(self, quant: ir.Model, float_model: ir.Model):
        self.reference = quant  # rewritten in place below
        graph = quant.graph
        self.activations: list[Activation] = []
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

    def _activation(self, q_node, dq, position, q_scale, q_zp, axis, block, dq_scale, dq_zp) -> Activation:
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
        return Activation(error, source.name, q_scale, q_zp, dq_scale, dq_zp, axis, qtype, clip_low, clip_high)

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
        error.sqnr_db = rounded(_whole_sqnr(reference, dequantized))
        error.worst_channel = worst
        error.worst_channel_sqnr_db = rounded(float(per_channel[worst]))
        error.mean_channel_sqnr_db = rounded(float(finite.mean())) if finite.size else rounded(float(per_channel.max()))
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
        for suffix in (N.QUANTIZED, *N.LEGACY_QUANTIZED):
            base = codes.name[: -len(suffix)] if codes.name.endswith(suffix) else None
            if base in float_values:
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


