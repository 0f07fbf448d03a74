"""Per-channel scale migration between an activation and the MatMul weights that read it.

For an activation X read by MatMuls with constant weights W_k, and any positive vector s over X's
channels (its last axis): X W_k = (X / s) (diag(s) W_k). SmoothQuant (``smooth-quant``) picks s to
make X easier to quantize; AWQ (``awq-scale``) picks s to protect the weights that matter most
before they are rounded to 4 bits. Both find the same groups, observe them on calibration data
with the same bounded-memory statistics, and rewrite the graph the same way: this module.
"""

from __future__ import annotations

__all__ = ["Reader", "Group", "matmul_input_groups", "observe_groups", "apply_channel_scale"]

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompile.io.chunked_runs import observe_calibration
from qcompile.core.graph_edit import add_initializer, initializer_array
from qcompile.io.workspace import release_tensor

# Rows of X kept (a uniform reservoir sample over all batches) to score candidate scales: bounded,
# whatever the data size, and enough to rank candidates whose errors differ by 10% or more.
_SAMPLE_ROWS = 512


@dataclasses.dataclass
class Reader:
    """A MatMul (or Gemm) that reads X as its first input and a constant weight as its second."""

    node: ir.Node
    transposed: bool  # Gemm transB=1 stores it as [out, in]

    @property
    def weight(self) -> np.ndarray:
        """[in_channels, out_channels], as X multiplies it. Read on each use, not kept: a large
        model's weights are memory-mapped files, unmapped once a group is done with them."""
        weight = self.node.inputs[1].const_value.numpy()
        return weight.T if self.transposed else weight


@dataclasses.dataclass
class Group:
    value: ir.Value
    readers: list[Reader]
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    abs_sum: np.ndarray | None = None  # sum of |x| per channel (AWQ's activation salience)
    sample: np.ndarray | None = None  # [<= _SAMPLE_ROWS, channels]
    seen_rows: int = 0  # rows offered to the reservoir
    rows_seen: int = 0  # rows observed in all
    rng: np.random.Generator = dataclasses.field(default_factory=lambda: np.random.default_rng(0))

    @property
    def channels(self) -> int:
        return self.readers[0].weight.shape[0]

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows_seen, 1)

    def observe(self, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1])
        self.rows_seen += len(rows)
        low, high = rows.min(axis=0), rows.max(axis=0)
        self.channel_min = low if self.channel_min is None else np.minimum(self.channel_min, low)
        self.channel_max = high if self.channel_max is None else np.maximum(self.channel_max, high)
        magnitude = np.abs(rows).sum(axis=0, dtype=np.float64)
        self.abs_sum = magnitude if self.abs_sum is None else self.abs_sum + magnitude
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




def _reader(node: ir.Node, index: int) -> Reader | None:
    if index != 0 or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = initializer_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32 or weight.size == 0:
        return None
    if node.op_type == "MatMul":
        return Reader(node, transposed=False)
    if node.op_type == "Gemm":
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        if attributes.get("transA", 0):
            return None
        transposed = bool(attributes.get("transB", 0))
        return Reader(node, transposed)
    return None


def matmul_input_groups(graph: ir.Graph) -> list[Group]:
    """Float activations read by at least one MatMul/Gemm with a constant 2-D weight."""
    groups = []
    for value in list(graph.inputs) + [o for node in graph for o in node.outputs]:
        if value.dtype not in (ir.DataType.FLOAT, None) or value.const_value is not None:
            continue
        readers = [r for use in value.uses() if (r := _reader(use.node, use.idx)) is not None]
        if readers and len({r.weight.shape[0] for r in readers}) == 1:
            groups.append(Group(value, readers))
    return groups


def observe_groups(
    model: ir.Model, groups: list[Group], context, *, batches: int | None, chunk: int, what: str
) -> None:
    """Run the model on the calibration data (the first ``batches`` batches, or all) and let each
    group observe its tensor, chunk by chunk: memory holds one chunk's activations."""
    names = [g.value.name for g in groups]
    for runs in observe_calibration(model, names, context, chunk=chunk, what=what, limit=batches):
        for outputs in runs:
            for group, values in zip(groups, outputs):
                if values.dtype == np.float32 and values.ndim >= 2 and values.shape[-1] == group.channels:
                    group.observe(values)


def apply_channel_scale(graph: ir.Graph, group: Group, s: np.ndarray) -> str:
    """Rewrite the graph so that the group's MatMuls read X / s with weights diag(s) W.

    1/s is folded into X's producer where X has no other reader: a LayerNormalization's scale and
    bias, or a Mul by a per-channel constant (how RMSNorm's weight is exported). Otherwise a Mul
    by 1/s is inserted before the MatMuls. Returns where 1/s went."""
    x = group.value
    inverse = (1.0 / s).astype(np.float32)
    producer = x.producer()
    reader_nodes = {id(r.node) for r in group.readers}
    only_matmuls = all(id(use.node) in reader_nodes for use in x.uses()) and not x.is_graph_output()
    gamma = initializer_array(producer.inputs[1]) if producer is not None and len(producer.inputs) > 1 else None
    beta = initializer_array(producer.inputs[2]) if producer is not None and len(producer.inputs) > 2 else None
    if (
        producer is not None and producer.op_type == "LayerNormalization" and producer.domain in ("", "ai.onnx")
        and only_matmuls and gamma is not None and gamma.shape == s.shape
        and (len(producer.inputs) < 3 or producer.inputs[2] is None or (beta is not None and beta.shape == s.shape))
    ):
        # LayerNorm(x) * gamma + beta, divided by s: fold 1/s into gamma and beta.
        producer.replace_input_with(1, add_initializer(graph, f"{x.name}_smoothed_gamma", gamma * inverse))
        if beta is not None:
            producer.replace_input_with(2, add_initializer(graph, f"{x.name}_smoothed_beta", beta * inverse))
        smoothed, how = x, "LayerNormalization"
    elif producer is not None and producer.op_type == "Mul" and producer.domain in ("", "ai.onnx") and only_matmuls and (
        (index := _per_channel_constant_input(producer, s.shape)) is not None
    ):
        # x = y * w with w a per-channel constant (RMSNorm's weight): fold 1/s into w.
        w = initializer_array(producer.inputs[index])
        producer.replace_input_with(index, add_initializer(graph, f"{x.name}_smoothed_scale", (w * inverse).astype(np.float32)))
        smoothed, how = x, "Mul"
    else:
        factor = add_initializer(graph, f"{x.name}_smoothing", inverse)
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
        how = "inserted Mul"
    for reader in group.readers:
        weight = reader.weight * s[:, None]
        stored = weight.T if reader.transposed else weight
        old = reader.node.inputs[1]
        reader.node.replace_input_with(1, add_initializer(graph, f"{old.name}_smoothed", np.ascontiguousarray(stored)))
        del weight, stored
        release_tensor(old.const_value)
        if smoothed is not x:
            reader.node.replace_input_with(0, smoothed)
    return how


def _per_channel_constant_input(node: ir.Node, shape: tuple[int, ...]) -> int | None:
    """The index of a Mul input that is a float constant of exactly ``shape`` (one value per channel)."""
    for index, value in enumerate(node.inputs[:2]):
        array = initializer_array(value)
        if array is not None and array.dtype == np.float32 and array.shape == shape:
            return index
    return None
