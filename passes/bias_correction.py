"""Bias correction: cancel the mean output shift that rounding the weights causes.

Rounding a layer's weight W to W_q shifts its output by (W_q - W) x, whose expectation over the
data, (W_q - W) E[x], is not zero: the rounding errors of one output channel do not cancel when its
inputs have a non-zero mean (after a Relu, always). Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction" (ICCV 2019), subtract it from the bias:

    b' = b - (W_q - W) E[r]        so that  E[W_q x + b'] = E[W x + b]

Here E[r] is empirical: the mean input row of the layer (``layer_statistics``: for a Conv, the mean
receptive field, zero padding included, so the correction is exact at every output position) over
the calibration data, with the float model's inputs. W_q is exactly the weight ``insert-qdq`` will
store: the plan's axis and type through ``qcompile.numerics.qparams`` (``constant_qparams``, ``quantize``,
``dequantize``), the functions ``insert-qdq`` calls.
"""

from __future__ import annotations

__all__ = ["BiasCorrection", "quantized_weight"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.io.chunked_runs import DEFAULT_CHUNK
from qcompile.core.graph_edit import add_initializer
from qcompile.passes.layer_statistics import Layer, linear_layer, observe_layers
from qcompile.passes.quantization_plan import WeightQuant
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import constant_qparams, dequantize, quantize

logger = logging.getLogger(__name__)


def quantized_weight(weight: np.ndarray, quant: WeightQuant) -> np.ndarray:
    """The float value of the weight ``insert-qdq`` stores for ``quant``: DQ(Q(weight))."""
    scale, zero_point = constant_qparams(weight, quant.axis, quant.qtype, quant.symmetric)
    q = quantize(weight, scale, zero_point, quant.qtype, quant.axis)
    return dequantize(q, scale, zero_point, quant.axis)


def _bias_input(layer: Layer) -> tuple[ir.Node, int] | None:
    """Where the layer's bias lives: its own input 2 (Conv, Gemm), or the constant vector of an Add
    that alone reads a MatMul's output (how exporters write a Linear with a bias)."""
    node = layer.node
    if node.op_type in ("Conv", "Gemm"):
        return (node, 2) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add, index = uses[0].node, 1 - uses[0].idx
    return (add, index) if add.domain in ("", "ai.onnx") and len(add.inputs) == 2 else None


def _bias_vector(value: ir.Value | None, channels: int) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    array = value.const_value.numpy()
    if array.dtype != np.float32 or array.size != channels or array.shape[-1] != channels:
        return None
    return array


@register_pass("bias-correction", needs_data=True)
class BiasCorrection(ir.passes.InPlacePass):
    """Subtract each quantized layer's expected rounding shift (W_q - W) E[x] from its bias.

    Requires: the ``plan`` analysis (``plan-quantization``; it says which weights are quantized,
    per channel or not, in which type) and calibration data that can be read again (a directory or
    a list). Runs after ``calibrate`` and before ``insert-qdq``: calibration sees the float model,
    whose activation ranges the corrected quantized model reproduces. Guarantees: for every planned
    Conv/Gemm/MatMul weight whose layer has a constant bias (a MatMul's: the constant of the Add
    that alone reads it), the bias becomes b - (W_q - W) E[r], W_q computed exactly as
    ``insert-qdq`` will quantize W, so that E[W_q x + b'] = E[W x + b] on the calibration data;
    a new initializer replaces the old bias. A weight rounded by an earlier pass (``adaround``) is
    compared with its float value from before that rounding. Layers without a bias are listed in
    the report, not given one (the plan has no int32 bias for them).
    """

    # It changes biases' values, not which tensors are quantized.
    preserves = ("plan", "calibration", "unrounded_weights")

    def __init__(self, context, *, batches: int | None = None, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.context = context
        self.batches = batches
        self.chunk = chunk

    def requires(self, model: ir.Model) -> None:
        self.context.require_analysis("plan", "bias-correction", "plan-quantization")
        self.context.require_rereadable_data("bias-correction", "measures each layer's mean input",
                                             "turn bias_correction off")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.context.analyses.plan
        unrounded = self.context.analyses.unrounded_weights or {}
        nodes = {node.name: node for node in model.graph}
        records = {"corrected": {}, "skipped": {}}
        self.context.records["bias-correction"] = records
        candidates = []
        for quant in plan.weights:
            node = nodes.get(quant.node)
            if node is None or quant.input_index != 1 or quant.node not in plan.anchors:
                continue
            layer = linear_layer(node)
            if layer is None:
                records["skipped"][quant.node] = "not a Conv/Gemm/MatMul with a constant float weight"
                continue
            channels = layer.matrix(layer.weight).shape[0] * layer.matrix(layer.weight).shape[1]
            where = _bias_input(layer)
            bias = _bias_vector(where[0].inputs[where[1]], channels) if where is not None else None
            if bias is None:
                records["skipped"][quant.node] = "no constant bias to correct"
                continue
            candidates.append((layer, quant, where, bias))
        if not candidates:
            return ir.passes.PassResult(model, False)
        statistics = observe_layers(
            model, [c[0] for c in candidates], self.context, gram=False, batches=self.batches,
            chunk=self.chunk, what="bias-correction",
        )
        modified = False
        for layer, quant, (bias_node, bias_index), bias in candidates:
            stats = statistics.get(layer.node.name)
            if stats is None or stats.count == 0:
                records["skipped"][layer.node.name] = "its input was never observed on the calibration data"
                continue
            weight = layer.weight.astype(np.float32)
            reference = unrounded.get((layer.node.name, 1), weight).astype(np.float64)
            error = layer.matrix(quantized_weight(weight, quant).astype(np.float64) - reference)
            # (W_q - W) E[r], per group: [groups, out / groups] -> one value per output channel.
            shift = np.einsum("god,gd->go", error, stats.mean).reshape(-1)
            if not np.any(shift):
                continue
            corrected = (bias.astype(np.float64) - shift.reshape(bias.shape)).astype(np.float32)
            old = bias_node.inputs[bias_index]
            bias_node.replace_input_with(bias_index, add_initializer(model.graph, f"{old.name}_corrected", corrected))
            records["corrected"][layer.node.name] = {
                "mean_abs_shift": round(float(np.abs(shift).mean()), 8),
                "relative_to_bias": round(float(np.abs(shift).mean() / max(float(np.abs(bias).mean()), 1e-12)), 6),
            }
            modified = True
        logger.info("bias-correction: %d biases corrected, %d layers skipped",
                    len(records["corrected"]), len(records["skipped"]))
        return ir.passes.PassResult(model, modified)
