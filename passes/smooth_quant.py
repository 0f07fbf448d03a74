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

__all__ = ["SmoothQuant", "smoothing_groups"]

import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import CalibrationDataError
from qcompile.passes.calibration import DEFAULT_CHUNK, ChunkedRunner
from qcompile.passes.registry import register_pass
from qcompile.qparams import activation_qparams, dequantize, quant_type, quantize, weight_qparams
from qcompile.runtime import make_session

logger = logging.getLogger(__name__)

_DEFAULT_ALPHAS = (0.5, 0.65, 0.75, 0.85, 0.95)
# Rows of X kept (a uniform reservoir sample over all batches) to score the candidates: bounded,
# whatever the data size, and enough to rank candidates whose errors differ by 10% or more.
_SAMPLE_ROWS = 512


@dataclasses.dataclass
class _Reader:
    """A MatMul (or Gemm) that reads X as its first input and a constant weight as its second."""

    node: ir.Node
    weight: np.ndarray  # [in_channels, out_channels], as X multiplies it
    transposed: bool  # Gemm transB=1 stores it as [out, in]


@dataclasses.dataclass
class _Group:
    value: ir.Value
    readers: list[_Reader]
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    sample: np.ndarray | None = None  # [<= _SAMPLE_ROWS, channels]
    seen_rows: int = 0
    rng: np.random.Generator = dataclasses.field(default_factory=lambda: np.random.default_rng(0))

    def observe(self, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1])
        low, high = rows.min(axis=0), rows.max(axis=0)
        self.channel_min = low if self.channel_min is None else np.minimum(self.channel_min, low)
        self.channel_max = high if self.channel_max is None else np.maximum(self.channel_max, high)
        # Reservoir sampling (seeded, so deterministic): every row seen has the same chance to be kept.
        if self.sample is None:
            self.sample = np.empty((0, rows.shape[1]), dtype=np.float32)
        room = _SAMPLE_ROWS - len(self.sample)
        if room > 0:
            self.sample = np.concatenate([self.sample, rows[:room]])
            self.seen_rows += min(room, len(rows))
            rows = rows[room:]
        if len(rows):
            positions = self.seen_rows + 1 + np.arange(len(rows))
            accepted = np.nonzero(self.rng.random(len(rows)) < _SAMPLE_ROWS / positions)[0]
            self.sample[self.rng.integers(0, _SAMPLE_ROWS, len(accepted))] = rows[accepted]
            self.seen_rows += len(rows)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _reader(node: ir.Node, index: int) -> _Reader | None:
    if index != 0 or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = _constant(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    if node.op_type == "MatMul":
        return _Reader(node, weight, transposed=False)
    if node.op_type == "Gemm":
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        if attributes.get("transA", 0):
            return None
        transposed = bool(attributes.get("transB", 0))
        return _Reader(node, weight.T if transposed else weight, transposed)
    return None


def smoothing_groups(graph: ir.Graph) -> list[_Group]:
    """Float activations read by at least one MatMul/Gemm with a constant 2-D weight."""
    groups = []
    for value in list(graph.inputs) + [o for node in graph for o in node.outputs]:
        if value.dtype not in (ir.DataType.FLOAT, None) or value.const_value is not None:
            continue
        readers = [r for use in value.uses() if (r := _reader(use.node, use.idx)) is not None]
        if readers and len({r.weight.shape[0] for r in readers}) == 1:
            groups.append(_Group(value, readers))
    return groups


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
        groups = smoothing_groups(model.graph)
        if not groups:
            return ir.passes.PassResult(model, False)
        self._observe(model, groups)
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
            how = _apply(model.graph, group, best_s)
            smoothed[group.value.name] = {
                "alpha": best_alpha, "relative_error_before": float(baseline),
                "relative_error_after": float(best_error), "folded_into": how,
            }
        records["smoothed"] = smoothed
        records["candidates"] = len(groups)
        logger.info("smooth-quant: smoothed %d of %d MatMul inputs", len(smoothed), len(groups))
        return ir.passes.PassResult(model, bool(smoothed))

    def _observe(self, model: ir.Model, groups: list[_Group]) -> None:
        proto = ir.serde.serialize_model(model)
        graph_outputs = [o.name for o in proto.graph.output]
        names = [g.value.name for g in groups]
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in graph_outputs)
        session = make_session(proto, threads=self.context.config.threads, what="model for smooth-quant", low_memory=True)
        del proto  # the session has its own copy of the weights
        runner = ChunkedRunner(session, names, graph_outputs, self.chunk)
        for index, batch in enumerate(self.context.data.calibration()):
            if self.batches is not None and index >= self.batches:
                break
            for outputs in runner.runs(batch, f"calibration batch {index} (smooth-quant)"):
                for group, values in zip(groups, outputs):
                    if values.dtype == np.float32 and values.ndim >= 2 and values.shape[-1] == group.readers[0].weight.shape[0]:
                        group.observe(values)


class _Scorer:
    """Relative output error of one group quantized with smoothing vector s, on the sampled rows."""

    def __init__(self, group: _Group, act_type, symmetric: bool, weight_type, per_channel: bool):
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


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    taken = set(graph.initializers) | {o.name for n in graph for o in n.outputs} | {v.name for v in graph.inputs}
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.FLOAT
    graph.register_initializer(value)
    return value


def _apply(graph: ir.Graph, group: _Group, s: np.ndarray) -> str:
    """Rewrite the graph so that the group's MatMuls read X / s with weights diag(s) W."""
    x = group.value
    inverse = (1.0 / s).astype(np.float32)
    producer = x.producer()
    reader_nodes = {id(r.node) for r in group.readers}
    only_matmuls = all(id(use.node) in reader_nodes for use in x.uses()) and not x.is_graph_output()
    gamma = _constant(producer.inputs[1]) if producer is not None and len(producer.inputs) > 1 else None
    beta = _constant(producer.inputs[2]) if producer is not None and len(producer.inputs) > 2 else None
    if (
        producer is not None and producer.op_type == "LayerNormalization" and producer.domain in ("", "ai.onnx")
        and only_matmuls and gamma is not None and gamma.shape == s.shape
        and (len(producer.inputs) < 3 or producer.inputs[2] is None or (beta is not None and beta.shape == s.shape))
    ):
        # LayerNorm(x) * gamma + beta, divided by s: fold 1/s into gamma and beta.
        producer.replace_input_with(1, _initializer(graph, f"{x.name}_smoothed_gamma", gamma * inverse))
        if beta is not None:
            producer.replace_input_with(2, _initializer(graph, f"{x.name}_smoothed_beta", beta * inverse))
        smoothed, how = x, "LayerNormalization"
    else:
        factor = _initializer(graph, f"{x.name}_smoothing", inverse)
        node_names = {n.name for n in graph}
        mul_name, suffix = f"{x.name}_smooth", 1
        while mul_name in node_names:
            mul_name, suffix = f"{x.name}_smooth_{suffix}", suffix + 1
        mul = ir.node("Mul", [x, factor], name=mul_name)
        smoothed = mul.outputs[0]
        smoothed.name, smoothed.dtype, smoothed.shape = f"{x.name}_smoothed", ir.DataType.FLOAT, x.shape
        if producer is not None:
            graph.insert_after(producer, mul)
        else:
            graph.insert_before(next(iter(graph)), mul)
        how = "Mul"
    for reader in group.readers:
        weight = reader.weight * s[:, None]
        stored = weight.T if reader.transposed else weight
        old = reader.node.inputs[1]
        reader.node.replace_input_with(1, _initializer(graph, f"{old.name}_smoothed", np.ascontiguousarray(stored)))
        if smoothed is not x:
            reader.node.replace_input_with(0, smoothed)
    return how
