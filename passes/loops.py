"""Loop bodies: what a loop carries unchanged becomes an outer-scope read, and the weights its body
multiplies by are stored as 8-bit integers.

A value inside a Loop or Scan body has one value per iteration, which calibration cannot observe,
so the plan leaves those bodies float (``quantization_plan.plan_nodes``). Their weights need no
calibration, though: an attention decoder exported by paddle2onnx (PP-Structure's SLANet table
recognizer) runs its GRU cell and its linear layers inside a Loop, and those weights were a third of
the model, kept float.
"""

from __future__ import annotations

__all__ = ["HoistLoopInvariants", "QuantizeLoopWeights"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.core.graph_edit import Namer, QdqNames as N, add_initializer
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import QUANT_TYPES, quantize, weight_qparams

logger = logging.getLogger(__name__)

_LOOPS = ("Loop", "Scan")
# Weights smaller than this stay float: the saving would not pay for a DequantizeLinear.
_MIN_WEIGHT_SIZE = 4096


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    return [a.value for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]


def _defined_names(graph: ir.Graph) -> set[str]:
    """Every name ``graph`` and its nested subgraphs define (inputs, initializers, node outputs)."""
    names = {v.name for v in (*graph.inputs, *graph.initializers.values())}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names |= {o.name for o in node.outputs}
        for sub in _subgraphs(node):
            names |= {v.name for v in (*sub.inputs, *sub.initializers.values())}
    return names


def _passed_through(body: ir.Graph, index: int) -> bool:
    """Whether the body returns its loop-carried input ``index`` unchanged (directly or via Identity)."""
    carried_in, carried_out = body.inputs[2 + index], body.outputs[1 + index]
    if carried_out is carried_in:
        return True
    producer = carried_out.producer()
    return (producer is not None and producer.op_type == "Identity" and producer.domain in ("", "ai.onnx")
            and producer.inputs[0] is carried_in)


@register_pass("hoist-loop-invariants")
class HoistLoopInvariants(ir.passes.InPlacePass):
    """Turn each loop-carried value that a Loop's body passes through unchanged into an outer-scope
    read of its initial value, and drop it from the loop's state.

    paddle2onnx carries every weight an attention decoder uses through its Loop as state (body
    output = body input), so to any later pass they look like values that change per iteration.
    Requires: nothing. Guarantees: the computation is unchanged; a state stays when its initial value
    is absent or its name is defined inside the body, or when its final value is a graph output
    (a subgraph may not return an outer-scope value directly); body-graph outputs left without a
    producer (the Identity that passed the state through) are removed by ``remove-unused``.
    """

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        hoisted = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type == "Loop" and node.domain in ("", "ai.onnx"):
                hoisted += self._hoist(node)
        if hoisted:
            logger.info("hoist-loop-invariants: %d loop-carried values made outer-scope reads", hoisted)
        return ir.passes.PassResult(model, hoisted > 0)

    @staticmethod
    def _hoist(loop: ir.Node) -> int:
        body = loop.attributes["body"].value
        carried = len(loop.inputs) - 2
        inner_names = _defined_names(body)
        keep = []
        for k in range(carried):
            initial, final = loop.inputs[2 + k], loop.outputs[k]
            invariant = (_passed_through(body, k) and initial is not None and initial.name not in inner_names
                         and not final.is_graph_output())
            keep.append(not invariant)
        if all(keep):
            return 0
        for k in reversed(range(carried)):
            if keep[k]:
                continue
            initial, carried_in, final = loop.inputs[2 + k], body.inputs[2 + k], loop.outputs[k]
            body.outputs.pop(1 + k)
            ir.convenience.replace_all_uses_with(carried_in, initial)
            ir.convenience.replace_all_uses_with(final, initial)
            body.inputs.pop(2 + k)
        inputs = [*loop.inputs[:2], *(v for v, kept in zip(loop.inputs[2:], keep) if kept)]
        outputs = [v for v, kept in zip(loop.outputs[:carried], keep) if kept] + list(loop.outputs[carried:])
        replacement = ir.node("Loop", inputs, attributes=dict(loop.attributes), name=loop.name,
                              num_outputs=len(outputs), domain=loop.domain)
        loop.graph.insert_before(loop, replacement)
        for old, new in zip(outputs, replacement.outputs):
            new.type, new.shape, name = old.type, old.shape, old.name
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            old.name, new.name = None, name
        # The body now belongs to the replacement; detach it from the old node before removing that.
        loop.attributes.pop("body")
        loop.graph.remove(loop, safe=True)
        return keep.count(False)


def _nodes_in_loop_bodies(graph: ir.Graph) -> set[ir.Node]:
    """Every node inside a Loop or Scan body, at any depth (If branches inside them included)."""
    found: set[ir.Node] = set()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type in _LOOPS and node.domain in ("", "ai.onnx"):
            for sub in _subgraphs(node):
                found |= set(ir.traversal.RecursiveGraphIterator(sub))
    return found


def _weight_axis(value: ir.Value, use: ir.Usage, transposed: bool = False) -> int | None:
    """The output-channel axis of the 2-D ``value`` as the weight operand of ``use`` (through one
    Transpose, as paddle2onnx writes a GRU cell's weights), or None when it is not one."""
    node = use.node
    if node.domain not in ("", "ai.onnx") or (not transposed and (value.shape is None or len(value.shape) != 2)):
        return None
    if node.op_type == "Transpose" and not transposed:
        perm = node.attributes.get("perm")
        uses = list(node.outputs[0].uses())
        if (perm is not None and list(perm.value) != [1, 0]) or not uses or node.outputs[0].is_graph_output():
            return None
        axes = {_weight_axis(node.outputs[0], inner, transposed=True) for inner in uses}
        return None if None in axes or len(axes) != 1 else 1 - axes.pop()
    if use.idx != 1:
        return None
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.value else 1
    return None


@register_pass("quantize-loop-weights")
class QuantizeLoopWeights(ir.passes.InPlacePass):
    """Store the weights that only Loop / Scan bodies multiply by as int8, one symmetric scale per
    output channel, dequantized once per run in the enclosing graph (weight-only: the body's
    MatMuls and Gemms stay float, as the activations there cannot be calibrated).

    Requires: weights as initializers of the main graph read by body nodes (``hoist-loop-invariants``
    makes loop-carried ones so), opset >= 13 (per-channel DequantizeLinear). Guarantees: every use of
    such a weight is as a 2-D MatMul / Gemm B operand (directly or through a Transpose) inside a
    loop body, it has at least 4096 elements, and the body reads a value of the same name, dtype and shape, which a
    DequantizeLinear placed first in the main graph produces; other weights are untouched.
    """

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        in_loops = _nodes_in_loop_bodies(graph)
        if opset < 13 or not in_loops or not len(graph):
            return ir.passes.PassResult(model, False)
        int8 = QUANT_TYPES["int8"]
        first = next(iter(graph))
        namer = Namer(graph)
        count, saved = 0, 0
        for name, value in list(graph.initializers.items()):
            if (value.const_value is None or value.dtype != ir.DataType.FLOAT or value.is_graph_input()
                    or value.is_graph_output() or value.const_value.size < _MIN_WEIGHT_SIZE):
                continue
            uses = list(value.uses())
            axes = {_weight_axis(value, use) for use in uses}
            if not uses or None in axes or len(axes) != 1 or not all(use.node in in_loops for use in uses):
                continue
            (axis,) = axes
            array = value.const_value.numpy().astype(np.float32)
            scale, zero_point = weight_qparams(array, axis, int8)
            codes = quantize(array, scale, zero_point, int8, axis)
            stored = [add_initializer(graph, name + N.QUANTIZED, codes, namer),
                      add_initializer(graph, name + N.SCALE, scale.astype(np.float32), namer),
                      add_initializer(graph, name + N.ZERO_POINT, zero_point, namer)]
            dequantize = ir.node("DequantizeLinear", stored, attributes={"axis": axis},
                                 name=namer(N.DEQUANTIZE_NODE))
            (out,) = dequantize.outputs
            out.dtype, out.shape = value.dtype, value.shape
            graph.insert_before(first, dequantize)
            ir.convenience.replace_all_uses_with(value, out)
            graph.initializers.pop(name)
            value.name, out.name = None, name
            count, saved = count + 1, saved + 3 * array.size
        if count:
            logger.info("quantize-loop-weights: %d weights read inside Loop/Scan bodies stored int8 (%.2f MB saved)",
                        count, saved / 1e6)
        return ir.passes.PassResult(model, count > 0)

