"""LLM.int8()-style outlier split: the few huge input channels of a MatMul are multiplied in float.

Transformer activations have a handful of channels whose magnitude is far beyond the rest
(Dettmers et al., "LLM.int8()", NeurIPS 2022). One per-tensor activation scale must cover them,
and every other channel is left with a few integer levels. For a MatMul Y = X W this pass writes

    Y = (X * m) W_in + Gather(X, idx, axis=-1) W_out

with idx the outlier channels, m a 0/1 mask over X's last axis (0 at idx), W_in = W with the rows
at idx set to zero and W_out = W[idx, :]. The float function is unchanged (the two products split
the sum over input channels). ``X * m`` then gets its own, much narrower, calibrated range and is
quantized by the plan like any MatMul input; the Gather, the small MatMul and the Add that joins
the branches are marked to stay float (``quantization_plan.KEEP_FLOAT``).

Why a mask and not a Gather of the complement: the masked product keeps X's and W's shapes, so
the integer MatMul is the one the model had, and the Mul is one vectorized elementwise pass over X,
where a Gather of ~99% of the channels on the last axis copies as much, index by index. ORT CPU, one
thread, X [1, 512, 576] with 12 outliers, then Q/DQ and a MatMul with a 576 x 1536 int8 weight:
Mul 21 ms, Gather of the complement (a 564-row weight) 24.6 ms.

Which channels: c_j = calibrated max|X_j| over the calibration data. A channel is an outlier
when c_j >= ``ratio`` x median_j c_j and c_j >= ``threshold``. The paper's criterion is the
absolute magnitude 6.0 on OPT's LayerNorm outputs; an absolute value does not carry from one
model's normalization to another's, so the default is relative (``ratio`` 6) with ``threshold``
0 (off); pass ``threshold=6`` for the paper's rule. At most ``max_fraction`` of the channels
(rounded up; the largest first) are split, so the float branch stays small: 2% of 576 channels is
12 at most.
"""

from __future__ import annotations

__all__ = ["SplitOutliers"]

import logging
import math

import numpy as np
import onnx_ir as ir

from qcompile.io.chunked_runs import DEFAULT_CHUNK
from qcompile.errors import CalibrationDataError, ConfigError
from qcompile.core.graph_edit import Namer, add_initializer
from qcompile.passes.channel_scaling import Group, matmul_input_groups, observe_groups
from qcompile.passes.quantization_plan import KEEP_FLOAT
from qcompile.passes.registry import register_pass
from qcompile.io.workspace import release_tensor

logger = logging.getLogger(__name__)

_WHY_FLOAT = "the float branch of an outlier split (split-outliers)"


@register_pass("split-outliers", needs_data=True)
class SplitOutliers(ir.passes.InPlacePass):
    """Multiply the outlier input channels of MatMuls in float, the rest through the quantized MatMul (LLM.int8()).

    Requires: calibration data (the first ``batches`` batches, or all). Guarantees: the float
    model computes the same function (up to float rounding); each split MatMul reads ``X * mask``
    with the outlier rows of its weight zeroed, and an added float Gather -> MatMul -> Add
    carries the outlier channels, its nodes marked so that ``plan-quantization`` leaves them
    float. Each split tensor, its outlier channels and their magnitudes are recorded in the report.
    """

    def __init__(
        self, context, *, ratio: float = 6.0, threshold: float = 0.0, max_fraction: float = 0.02,
        batches: int | None = None, chunk: int = DEFAULT_CHUNK,
    ):
        super().__init__()
        if not ratio > 1.0:
            raise ConfigError(f"split-outliers: ratio must be > 1 (a multiple of the median channel), got {ratio}.")
        if not 0.0 < max_fraction < 1.0:
            raise ConfigError(f"split-outliers: max_fraction must be in (0, 1), got {max_fraction}.")
        if not threshold >= 0.0:
            raise ConfigError(f"split-outliers: threshold must be >= 0, got {threshold}.")
        self.context = context
        self.ratio, self.threshold, self.max_fraction = ratio, threshold, max_fraction
        self.batches, self.chunk = batches, chunk

    def requires(self, model: ir.Model) -> None:
        if self.context.data is None:
            raise CalibrationDataError(
                "split-outliers needs calibration data to find outlier channels. Pass --calib DIR, "
                "or remove split-outliers from the pipeline."
            )

    def outliers(self, group: Group) -> tuple[np.ndarray, int]:
        """The outlier channels of an observed group, largest first (empty when none), and how
        many channels passed the bound before the cap."""
        magnitude = np.maximum(np.abs(group.channel_min), np.abs(group.channel_max)).astype(np.float64)
        median = float(np.median(magnitude))
        bound = max(self.ratio * median, self.threshold)
        if not np.isfinite(magnitude).all() or bound <= 0.0:
            return np.zeros(0, dtype=np.int64), 0  # a mask or sentinel, or a tensor that is all zeros
        cap = math.ceil(self.max_fraction * len(magnitude))
        candidates = np.nonzero(magnitude >= bound)[0]
        chosen = candidates[np.argsort(-magnitude[candidates], kind="stable")][:cap].astype(np.int64)
        return chosen, len(candidates)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        records = self.context.records.setdefault("split-outliers", {})
        groups = [g for g in matmul_input_groups(model.graph) if _splittable(g)]
        records["candidates"] = len(groups)
        records["split"] = {}
        if not groups:
            return ir.passes.PassResult(model, False)
        observe_groups(model, groups, self.context, batches=self.batches, chunk=self.chunk, what="split-outliers")
        namer = Namer(model.graph)
        for group in groups:
            if group.channel_min is None:
                continue
            idx, over_bound = self.outliers(group)
            if len(idx) == 0:
                for reader in group.readers:  # a large model's weights were mapped to size the group: unmap them
                    release_tensor(reader.node.inputs[1].const_value)
                continue
            magnitude = np.maximum(np.abs(group.channel_min), np.abs(group.channel_max))
            records["split"][group.value.name] = {
                "channels": [int(i) for i in idx],
                "magnitudes": [round(float(magnitude[i]), 4) for i in idx],
                "median_magnitude": round(float(np.median(magnitude)), 4),
                "largest_other": round(float(np.delete(magnitude, idx).max(initial=0.0)), 4),
                "over_bound": over_bound,  # more than len(channels): the max_fraction cap was hit
                "matmuls": [r.node.name for r in group.readers],
            }
            _split(model.graph, group, np.sort(idx), namer)
        logger.info("split-outliers: split %d of %d MatMul inputs", len(records["split"]), len(groups))
        return ir.passes.PassResult(model, bool(records["split"]))


def _splittable(group: Group) -> bool:
    """Every reader a MatMul, or a Gemm computing exactly X W (+ C) (alpha 1): the float branch
    then adds X_out W_out to its output. Readers already on the float branch are left alone."""
    for reader in group.readers:
        if KEEP_FLOAT in reader.node.metadata_props:
            return False
        alpha = reader.node.attributes.get("alpha")
        if reader.node.op_type == "Gemm" and alpha is not None and alpha.value != 1.0:
            return False
    return True


def _keep_float(node: ir.Node) -> ir.Node:
    node.metadata_props[KEEP_FLOAT] = _WHY_FLOAT
    return node


def _output(node: ir.Node, name: str, like: ir.Value | None = None, shape=None) -> ir.Value:
    out = node.outputs[0]
    out.name, out.dtype = name, ir.DataType.FLOAT
    out.shape = shape if shape is not None else (like.shape if like is not None else None)
    return out


def _split(graph: ir.Graph, group: Group, idx: np.ndarray, namer: Namer) -> None:
    x = group.value
    channels = group.channels
    mask = np.ones(channels, dtype=np.float32)
    mask[idx] = 0.0
    base = x.name
    out_shape = None
    if x.shape is not None and len(x.shape) >= 1:
        out_shape = ir.Shape([*list(x.shape)[:-1], len(idx)])
    masked = ir.node("Mul", [x, add_initializer(graph, f"{base}_inlier_mask", mask, namer)],
                     name=namer(f"{base}_inliers"))
    _output(masked, namer(f"{base}_inliers"), like=x)
    gather = _keep_float(ir.node(
        "Gather", [x, add_initializer(graph, f"{base}_outlier_channels", idx, namer)],
        attributes={"axis": -1}, name=namer(f"{base}_outliers"),
    ))
    _output(gather, namer(f"{base}_outliers"), shape=out_shape)
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, [masked, gather])
    else:
        graph.insert_before(next(iter(graph)), [masked, gather])
    for reader in group.readers:
        node = reader.node
        weight = reader.weight  # [in, out]
        w_out = np.ascontiguousarray(weight[idx, :])
        w_in = weight.copy()
        w_in[idx, :] = 0.0
        stored = w_in.T if reader.transposed else w_in
        old = node.inputs[1]
        node.replace_input_with(1, add_initializer(graph, f"{old.name}_inliers", np.ascontiguousarray(stored), namer))
        release_tensor(old.const_value)
        node.replace_input_with(0, masked.outputs[0])
        y = node.outputs[0]
        matmul = _keep_float(ir.node(
            "MatMul", [gather.outputs[0], add_initializer(graph, f"{old.name}_outliers", w_out, namer)],
            name=namer(f"{node.name}_outliers"),
        ))
        _output(matmul, namer(f"{y.name}_outliers"), like=y)
        join = _keep_float(ir.node("Add", [y, matmul.outputs[0]], name=namer(f"{node.name}_join_outliers")))
        joined = _output(join, namer(f"{y.name}_joined"), like=y)
        graph.insert_after(node, [matmul, join])
        # The Add's output takes over Y: its readers, its place among the graph outputs, its name.
        for use in list(y.uses()):
            if use.node is not join:
                use.node.replace_input_with(use.idx, joined)
        for i, output in enumerate(graph.outputs):
            if output is y:
                graph.outputs[i] = joined
        name = y.name
        y.name = namer(f"{name}_inliers")
        joined.name = name
