"""Cross-layer equalization: equal per-channel weight ranges in consecutive convolutions.

For two convolutions with only a positively homogeneous op f between them (f(x / s) = f(x) / s for
s > 0: Relu, LeakyRelu, PRelu, max and average pooling, or nothing), and any positive vector s
over the channels that join them:

    conv2(f(conv1(x; W1, b1)); W2) = conv2(f(conv1(x; W1 / s, b1 / s)); W2 * s)

with W1 and b1 divided by s_i along output channel i and W2 multiplied by s_i along input channel i.
Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction" (ICCV 2019),
choose s_i = sqrt(r1_i / r2_i), where r1_i = max|W1[i]| and r2_i = max|W2[:, i]|: both ranges become
sqrt(r1_i r2_i), which maximises the precision of the pair when weights are quantized per tensor,
and balances the channels of the activation between the two convolutions (quantized per tensor
whatever the weights are). Depthwise and grouped convolutions take part on either side: channel i
of a grouped conv2 scales the output channels of its group along the input-channel index it has
there. A conv in the middle of a chain belongs to two pairs; the pairs are equalized in turn until
no scale moves by more than ``tolerance`` (the paper's iteration).

Not handled, on purpose: Clip (Relu6) between the convolutions, since Clip(x / s, 0, 6) is not
Clip(x, 0, 6) / s and ONNX's Clip takes one bound for all channels (rescaling the bound per
channel would need another op, and the Clip could no longer be folded into a QuantizeLinear);
BatchNormalization left between them (``fold-batchnorm`` runs first); Gemm/MatMul pairs; and the
paper's high-bias absorption, which moves part of b1 into the next layer's bias through a Relu
and is left out (it only pays when equalization blew up an activation's range).
"""

from __future__ import annotations

__all__ = ["CrossLayerEqualization", "equalization_pairs"]

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qcompile.errors import PipelineError
from qcompile.core.graph_edit import add_initializer
from qcompile.passes.registry import register_pass

logger = logging.getLogger(__name__)

# Ops f with f(x / s) = f(x) / s for every per-channel s > 0 (channels on axis 1).
_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}


@dataclasses.dataclass
class Pair:
    first: ir.Node  # its output channels are divided by s
    second: ir.Node  # its input channels are multiplied by s
    between: list[str]  # op types of the homogeneous ops between them


def _groups(node: ir.Node) -> int:
    attribute = node.attributes.get("group")
    return 1 if attribute is None else int(attribute.value)


def _float_constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    array = value.const_value.numpy()
    return array if array.dtype == np.float32 else None


def _equalizable_conv(node: ir.Node) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = _float_constant(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return weight is not None and weight.ndim >= 3 and (bias is None or _float_constant(bias) is not None)


def _only_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].idx != 0:
        return None
    return uses[0].node


def _homogeneous(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in _HOMOGENEOUS or len(node.outputs) != 1:
        return False
    if node.op_type == "PRelu":
        # The slope must not mix channels: a scalar, or one value per channel (broadcast on axis 1).
        slope = _float_constant(node.inputs[1])
        return slope is not None and (slope.size == 1 or (slope.ndim >= 1 and slope.shape[0] == slope.size))
    return True


def equalization_pairs(graph: ir.Graph) -> list[Pair]:
    """Conv -> (homogeneous ops) -> Conv, each tensor on the way read only by the next op."""
    pairs = []
    for first in graph:
        if not _equalizable_conv(first):
            continue
        between, value = [], first.outputs[0]
        reader = _only_reader(value)
        while reader is not None and _homogeneous(reader):
            between.append(reader.op_type)
            value = reader.outputs[0]
            reader = _only_reader(value)
        if reader is None or not _equalizable_conv(reader):
            continue
        channels = first.inputs[1].const_value.shape[0]
        second_weight = reader.inputs[1].const_value
        if second_weight.shape[1] * _groups(reader) != channels:
            continue
        pairs.append(Pair(first, reader, between))
    return pairs


class _Weights:
    """Working copies of the weights and biases the pairs touch, and what changed."""

    def __init__(self, pairs: list[Pair]):
        self.weight: dict[str, np.ndarray] = {}
        self.bias: dict[str, np.ndarray | None] = {}
        for pair in pairs:
            for node in (pair.first, pair.second):
                if node.name not in self.weight:
                    self.weight[node.name] = node.inputs[1].const_value.numpy().astype(np.float64)
                    bias = node.inputs[2] if len(node.inputs) > 2 else None
                    self.bias[node.name] = None if bias is None else bias.const_value.numpy().astype(np.float64)

    def output_ranges(self, node: ir.Node) -> np.ndarray:
        w = self.weight[node.name]
        return np.abs(w).reshape(w.shape[0], -1).max(axis=1)

    def input_ranges(self, node: ir.Node) -> np.ndarray:
        """max |W[:, i]| for each input channel i of the node (of all its groups, in order)."""
        w = self.weight[node.name]
        groups = _groups(node)
        per_group = np.abs(w).reshape(groups, w.shape[0] // groups, w.shape[1], -1).max(axis=(1, 3))
        return per_group.reshape(-1)  # [groups * in_per_group]: input channel g * in_per_group + j

    def scale(self, pair: Pair, s: np.ndarray) -> None:
        first, second = pair.first.name, pair.second.name
        shape = (-1,) + (1,) * (self.weight[first].ndim - 1)
        self.weight[first] = self.weight[first] / s.reshape(shape)
        if self.bias[first] is not None:
            self.bias[first] = self.bias[first] / s
        w = self.weight[second]
        groups = _groups(pair.second)
        grouped = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        factor = s.reshape(groups, 1, w.shape[1], *((1,) * (w.ndim - 2)))
        self.weight[second] = (grouped * factor).reshape(w.shape)


# A channel whose weight range is under this share of its layer's largest is dead for equalization.
DEAD_RANGE = 1e-6
# No channel is scaled by more than this in all (or less than its inverse): a bias divided by the
# scale must stay on the activations' scale.
MAX_SCALE = 1e3


@register_pass("cross-layer-equalization")
class CrossLayerEqualization(ir.passes.InPlacePass):
    """Equalize per-channel weight ranges of consecutive convolutions (Nagel et al. 2019).

    Requires: BatchNormalization already folded into the convolutions (``fold-batchnorm``), and no
    calibration yet (equalization changes the activations between the convolutions). Guarantees:
    the float model computes the same function (up to float rounding); for every Conv ->
    (Relu/LeakyRelu/PRelu/pooling) -> Conv pair, depthwise and grouped included, whose
    intermediate tensors have no other reader, W1's output channel i and b1_i are divided by s_i and
    W2's input channel i multiplied by it, iterated over chains until the scales settle, so that
    max|W1[i]| = max|W2[:, i]|. New initializers replace the old ones (a weight shared with another
    node keeps its value there). The report lists each pair with its channel-range spread before
    and after. Clip (Relu6) between convolutions ends a chain; high-bias absorption is not done.
    """

    def __init__(self, context, *, iterations: int = 20, tolerance: float = 1e-3):
        super().__init__()
        self.context = context
        self.iterations = iterations
        self.tolerance = tolerance

    def requires(self, model: ir.Model) -> None:
        if self.context.analyses.calibration is not None:
            raise PipelineError(
                "cross-layer-equalization changes the activations between convolutions, so it must run "
                "before 'calibrate'. Move it before 'plan-quantization'."
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        records = self.context.records.setdefault("cross-layer-equalization", {})
        pairs = equalization_pairs(model.graph)
        records["pairs"] = {}
        if not pairs:
            return ir.passes.PassResult(model, False)
        weights = _Weights(pairs)
        spread_before = {id(p): self._spread(weights, p) for p in pairs}
        total = {id(p): np.ones(weights.weight[p.first.name].shape[0]) for p in pairs}
        for _ in range(self.iterations):
            largest = 0.0
            for pair in pairs:
                r1, r2 = weights.output_ranges(pair.first), weights.input_ranges(pair.second)
                # s_i = sqrt(r1_i / r2_i): both ranges become sqrt(r1_i * r2_i). A dead channel
                # (a range under DEAD_RANGE of its layer's largest, on either side) is left alone:
                # PP-OCRv4's recognizer has channels of weights ~1e-39 beside a bias, and dividing
                # that bias by s ~1e-19 made an activation range of 1e18 that no grid survives.
                alive = (r1 > DEAD_RANGE * r1.max(initial=0.0)) & (r2 > DEAD_RANGE * r2.max(initial=0.0))
                s = np.ones_like(r1)
                so_far = total[id(pair)][alive]
                s[alive] = np.clip(np.sqrt(r1[alive] / r2[alive]), 1 / (MAX_SCALE * so_far), MAX_SCALE / so_far)
                weights.scale(pair, s)
                total[id(pair)] *= s
                largest = max(largest, float(np.abs(np.log(s)).max(initial=0.0)))
            if largest < self.tolerance:
                break
        changed = {id(p) for p in pairs if np.abs(np.log(total[id(p)])).max(initial=0.0) >= self.tolerance}
        if not changed:
            return ir.passes.PassResult(model, False)
        touched = {p.first.name: p.first for p in pairs if id(p) in changed}
        touched.update({p.second.name: p.second for p in pairs if id(p) in changed})
        for name, node in touched.items():
            old = node.inputs[1]
            node.replace_input_with(1, add_initializer(
                model.graph, f"{old.name}_equalized", weights.weight[name].astype(np.float32)))
            if weights.bias[name] is not None:
                old_bias = node.inputs[2]
                node.replace_input_with(2, add_initializer(
                    model.graph, f"{old_bias.name}_equalized", weights.bias[name].astype(np.float32)))
        for pair in pairs:
            if id(pair) in changed:
                records["pairs"][f"{pair.first.name} -> {pair.second.name}"] = {
                    "between": pair.between,
                    "range_spread_before": spread_before[id(pair)],
                    "range_spread_after": self._spread(weights, pair),
                    "scale_min": round(float(total[id(pair)].min()), 6),
                    "scale_max": round(float(total[id(pair)].max()), 6),
                }
        logger.info("cross-layer-equalization: %d of %d conv pairs equalized", len(changed), len(pairs))
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _spread(weights: _Weights, pair: Pair) -> float:
        """max / min over the live channels of the first conv's output-channel ranges (1: all equal)."""
        r = weights.output_ranges(pair.first)
        r = r[r > DEAD_RANGE * r.max(initial=0.0)]
        return round(float(r.max() / r.min()), 3) if r.size else 1.0
