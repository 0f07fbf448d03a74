"""Carry out a quantization plan: QuantizeLinear/DequantizeLinear pairs, integer weights and biases."""

from __future__ import annotations

__all__ = ["InsertQDQ", "dequantize_after_lookup"]

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompile.errors import PipelineError
from qcompile.core.graph_edit import Namer, QdqNames as N, add_initializer
from qcompile.passes.quantization_plan import QuantizationPlan, plan_nodes
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import (
    LookupQuantized, bias_qparams, bias_safe_weight_scale, constant_qparams, lookup_qparams, quantize, raise_to_floor,
)
from qcompile.io.workspace import release_tensor

logger = logging.getLogger(__name__)


def dequantize_after_lookup(
    graph: ir.Graph, gather: ir.Node, table: LookupQuantized, name: Callable[[str], str],
    initializer: Callable[[str, np.ndarray], ir.Value],
) -> None:
    """Gather(table, ids) over a table stored as int8 codes with scales per row or per block of a
    row (``qparams.lookup_qparams``): gather the codes and their scales, then dequantize only the
    rows looked up (Cast, Mul; for blocks, a Reshape of [..., blocks, block] back to [..., cols]).

    A DequantizeLinear of the whole table before the Gather would convert every row on every run
    (an embedding of 30522 x 384: 22 ms of MiniLM's ~100 ms at 8 x 128 tokens); this converts the
    rows looked up. ``gather``'s output value keeps its name and readers.
    """
    ids, base = gather.inputs[1], gather.inputs[0].name
    codes_value = initializer(base + N.QUANTIZED, table.codes)
    scales_value = initializer(f"{base}_row_scales", table.scales)
    rows = ir.node("Gather", [codes_value, ids], attributes={"axis": 0}, name=name(f"{gather.name}_rows"))
    row_scales = ir.node("Gather", [scales_value, ids], attributes={"axis": 0}, name=name(f"{gather.name}_row_scales"))
    as_float = ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=name(f"{gather.name}_cast"))
    scaled = ir.node("Mul", [as_float.outputs[0], row_scales.outputs[0]], name=name(f"{gather.name}_dequantize"))
    typed = [(rows, ir.DataType.from_numpy(table.codes.dtype)), (row_scales, ir.DataType.FLOAT), (as_float, ir.DataType.FLOAT)]
    if table.block is not None:
        # [*ids.shape, blocks, block] -> [*ids.shape, cols], the shape built at run time: ids may be dynamic.
        ids_shape = ir.node("Shape", [ids], name=name(f"{gather.name}_ids_shape"))
        row_length = initializer(f"{base}_row_length", np.asarray([table.codes.shape[1] * table.block], dtype=np.int64))
        shape = ir.node("Concat", [ids_shape.outputs[0], row_length], attributes={"axis": 0}, name=name(f"{gather.name}_row_shape"))
        joined = ir.node("Reshape", [scaled.outputs[0], shape.outputs[0]], name=name(f"{gather.name}_join_blocks"))
        typed += [(scaled, ir.DataType.FLOAT), (ids_shape, ir.DataType.INT64), (shape, ir.DataType.INT64)]
    nodes = [node for node, _ in typed] + [scaled if table.block is None else joined]
    for node, dtype in typed:
        node.outputs[0].name, node.outputs[0].dtype = name(f"{node.name}_out"), dtype
    graph.insert_before(gather, nodes)
    out, replacement = gather.outputs[0], nodes[-1].outputs[0]
    replacement.dtype, replacement.shape = ir.DataType.FLOAT, out.shape
    value_name = out.name
    ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
    graph.remove(gather, safe=True)
    out.name, replacement.name = None, value_name


class _Rewriter:
    def __init__(self, model: ir.Model, plan: QuantizationPlan):
        self.graph = model.graph
        self.plan = plan
        self.name = Namer(self.graph)
        # The plan reaches into If branches (quantization_plan.plan_nodes): nodes there are
        # rewritten in their own graph, reading weights stored in the main graph (outer scope).
        every = list(plan_nodes(self.graph))
        self.nodes = {n.name: n for n in every}
        self.values = {v.name: v for v in self.graph.inputs}
        # From every node, not ``self.nodes``: two nodes may share a name (PP-OCRv4's recognizer).
        self.values.update({o.name: o for n in every for o in n.outputs})
        self.weight_cache: dict[tuple, tuple[ir.Value, np.ndarray]] = {}
        self.zero_points: dict[tuple, ir.Value] = {}

    def initializer(self, base: str, array: np.ndarray, graph: ir.Graph | None = None) -> ir.Value:
        # In the graph of the nodes that read it: ORT's QDQ fusions look a DequantizeLinear's
        # weight up in the DQ's own graph, not in the outer scope of an If branch.
        return add_initializer(graph or self.graph, base, array, self.name)

    def dequantize(self, base: str, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                   axis: int | None, shape, graph: ir.Graph | None = None,
                   zero_point_stored: bool = True) -> tuple[ir.Node, ir.Value]:
        q_value = self.initializer(base + N.QUANTIZED, q, graph)
        scale_value = self.initializer(base + N.SCALE, scale, graph)
        inputs = [q_value, scale_value]
        # A bias's zero point is 0, DequantizeLinear's default: omitted, it costs no bytes (4 per
        # channel, 4 % of a 0.6 MB MobileNet). Weights keep theirs where the plan says the
        # provider's fusion needs it (ORT's QGemm does; ``WeightQuant.zero_point_stored``).
        if np.any(zero_point) or (zero_point.dtype != np.int32 and zero_point_stored):
            inputs.append(self.initializer(base + N.ZERO_POINT, zero_point, graph))
        attributes = {"axis": axis} if axis is not None else {}
        node = ir.node(
            "DequantizeLinear", inputs, attributes=attributes,
            name=self.name(N.DEQUANTIZE_NODE),
        )
        out = node.outputs[0]
        out.name = self.name(base + N.DEQUANTIZED)
        out.dtype, out.shape = ir.DataType.FLOAT, shape
        return node, out

    def quantize_weight(self, node: ir.Node, index: int, axis: int | None, qtype, symmetric: bool = True,
                        significand_bits: int | None = None, min_scale: np.ndarray | None = None,
                        zero_point_stored: bool = True) -> np.ndarray:
        """Replace a float weight input by DQ(int weight); return the weight scales. ``min_scale``:
        a floor per channel (so that the biases added to this weight's products fit int32)."""
        value = node.inputs[index]
        # One stored copy per format: two consumers may want the same constant in different types.
        key = (value.name, id(node.graph), axis, qtype.name, symmetric, significand_bits, zero_point_stored)
        if key not in self.weight_cache:
            weight = value.const_value.numpy().astype(np.float32)
            release_tensor(value.const_value)  # a large model's float weight: unmap it, the copy is enough
            scale, zero_point = constant_qparams(weight, axis, qtype, symmetric, significand_bits)
            if min_scale is not None and symmetric and not qtype.is_float:
                scale, raised = raise_to_floor(scale, min_scale, significand_bits)
                if raised:
                    logger.warning("Weight %r: raised the scale of %d of its %d channel(s) so that the bias "
                                   "fits int32 (near-zero weights beside a bias)", value.name, raised, scale.size)
            q = quantize(weight, scale, zero_point, qtype, axis)
            if axis is None:
                scale, zero_point = scale.reshape(()), zero_point.reshape(())
            dq_node, dq_out = self.dequantize(value.name, q, scale, zero_point, axis, value.shape, node.graph,
                                              zero_point_stored)
            # Plans list weights in graph order, so the first consumer is the earliest one.
            node.graph.insert_before(node, dq_node)
            self.weight_cache[key] = (dq_out, scale)
        dq_out, scale = self.weight_cache[key]
        node.replace_input_with(index, dq_out)
        return scale

    def _is_row_lookup(self, node: ir.Node, w) -> bool:
        """A float Gather from a table stored per row (an embedding on the CPU target)."""
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        return (
            node.op_type == "Gather" and w.input_index == 0 and w.axis == 0 and axis == 0 and w.symmetric
            and node.name not in self.plan.nodes and len(node.inputs[0].uses()) == 1
        )

    def quantize_lookup(self, node: ir.Node, qtype) -> None:
        table = lookup_qparams(node.inputs[0].const_value.numpy(), qtype)
        output = node.outputs[0].name
        graph = node.graph
        dequantize_after_lookup(graph, node, table, self.name, lambda base, array: self.initializer(base, array, graph))
        # The lookup's output is now the Mul's value under the same name: a planned activation
        # there (an embedding read by a MatMul) is quantized after the Mul, not the removed Gather.
        self.values[output] = next(o for n in graph for o in n.outputs if o.name == output)

    def shared_zero_point(self, qtype, value: int, graph: ir.Graph) -> ir.Value:
        """One scalar initializer per (graph, type, value), read by every Q/DQ pair with that zero
        point: a small model's 89 activations have 57 distinct ones, and a shared short name is
        shorter in every reference than ``{tensor}_zero_point``."""
        key = (id(graph), qtype.name, value)
        if key not in self.zero_points:
            self.zero_points[key] = self.initializer(
                N.shared_zero_point(qtype.name, value), np.asarray(value, dtype=qtype.numpy_dtype), graph)
        return self.zero_points[key]

    def quantize_activation(self, name: str) -> None:
        quant = self.plan.activations[name]
        value = self._value(name)
        value.dtype = ir.DataType.FLOAT  # calibration confirmed it where shape inference could not
        uses = list(value.uses())  # before the QuantizeLinear below becomes a use too
        producer = value.producer()
        # A quantized producer's kernel writes integers: everything downstream reads the DQ, or
        # the runtime could not fuse it. A float producer's other readers keep the exact float
        # value: rounding a residual connection or a graph output buys no integer kernel.
        rounded_for_all = producer is not None and producer.name in self.plan.nodes
        if not rounded_for_all:
            uses = [use for use in uses if use.node.name in self.plan.nodes]
        graph = producer.graph if producer is not None else self.graph
        scale = self.initializer(name + N.SCALE, np.asarray(quant.scale, dtype=np.float32), graph)
        if quant.qtype.is_float:
            # FP8: no zero point (it is 0), the type from output_dtype (opset 21). ORT's
            # ReluQuantFusion drops a Relu before any QuantizeLinear whose zero point is neither an
            # int8 -128 nor a uint8 0 (a float8 0 included), which would let negatives through; it
            # skips a QuantizeLinear without a zero point.
            q_inputs, dq_inputs_zp, q_attributes = [value, scale], [], {"output_dtype": quant.qtype.ir_dtype}
        else:
            zero_point = self.shared_zero_point(quant.qtype, int(quant.zero_point), graph)
            q_inputs, dq_inputs_zp, q_attributes = [value, scale, zero_point], [zero_point], {}
        q_node = ir.node(
            "QuantizeLinear", q_inputs, attributes=q_attributes, name=self.name(N.QUANTIZE_NODE)
        )
        q_out = q_node.outputs[0]
        q_out.name = self.name(name + N.QUANTIZED)
        q_out.dtype, q_out.shape = quant.qtype.ir_dtype, value.shape
        dq_node = ir.node("DequantizeLinear", [q_out, scale, *dq_inputs_zp], name=self.name(N.DEQUANTIZE_NODE))
        dq_out = dq_node.outputs[0]
        dq_out.dtype, dq_out.shape = ir.DataType.FLOAT, value.shape
        was_output = value.is_graph_output() and rounded_for_all
        if producer is not None:
            producer.graph.insert_after(producer, [q_node, dq_node])
        else:  # a graph input: quantize before anything reads it
            self.graph.insert_before(next(iter(self.graph)), [q_node, dq_node])
        for use in uses:
            use.node.replace_input_with(use.idx, dq_out)
        if was_output:
            # The graph output keeps its name: it becomes the dequantized value.
            outputs = value.graph.outputs
            position = next(i for i, v in enumerate(outputs) if v is value)
            value.name = self.name(f"{name}_float")
            dq_out.name = name
            outputs[position] = dq_out
        else:
            dq_out.name = self.name(name + N.DEQUANTIZED)

    def quantize_bias(self, node: ir.Node, index: int, activation: str, weight_scale: np.ndarray,
                      stored_float: bool = False) -> None:
        quant = self.plan.activations[activation]
        value = node.inputs[index]
        # On the int32 grid x_scale * w_scale of the products it is added to. One scale when the
        # weight has one: QNN rejects a per-axis bias on a per-tensor weight (LayerNormalization),
        # and it is the same grid.
        q, scale = bias_qparams(value.const_value.numpy(), quant.scale, weight_scale)
        if stored_float:
            # The grid's values in float32: the provider rounds them back to exactly these codes.
            on_grid = (q.astype(np.float64) * scale.astype(np.float64)).astype(np.float32).reshape(value.const_value.shape)
            if len(value.uses()) == 1 and value.is_initializer() and not value.is_graph_input() and not value.is_graph_output():
                value.const_value = ir.tensor(on_grid, name=value.name)  # nothing else reads it: it keeps its name
            else:
                node.replace_input_with(index, self.initializer(value.name + N.ON_GRID, on_grid, node.graph))
            return
        axis = 0 if scale.size > 1 else None
        if axis is None:
            scale = scale.reshape(())
        dq_node, dq_out = self.dequantize(
            value.name, q, scale, np.zeros(scale.shape, dtype=np.int32), axis, value.shape, node.graph
        )
        node.graph.insert_before(node, dq_node)
        node.replace_input_with(index, dq_out)

    def _value(self, name: str) -> ir.Value:
        if name in self.values:
            return self.values[name]
        raise PipelineError(f"insert-qdq: planned tensor {name!r} is not in the graph; re-run plan-quantization.")

    def _bias_floors(self) -> dict[tuple[str, int | None], np.ndarray]:
        """(weight name, channel axis) -> the smallest scale per channel at which every bias added
        to its products fits int32 (``bias_safe_weight_scale``), over all the nodes that read the
        weight along that axis (two Gemms with different transB read one weight along two axes)."""
        weights = {(w.node, w.input_index): w for w in self.plan.weights}
        floors: dict[tuple[str, int | None], np.ndarray] = {}
        for b in self.plan.biases:
            w = weights.get((b.node, b.weight_index))
            node = self.nodes[b.node]
            weight, bias = node.inputs[b.weight_index], node.inputs[b.input_index]
            if w is None or weight.const_value is None or bias.const_value is None:
                continue
            channels = weight.const_value.shape[w.axis] if w.axis is not None else None
            floor = bias_safe_weight_scale(bias.const_value.numpy(), self.plan.activations[b.activation].scale, channels)
            key = (weight.name, w.axis)
            previous = floors.get(key)
            floors[key] = floor if previous is None or previous.shape != floor.shape else np.maximum(previous, floor)
        return floors

    def run(self) -> None:
        weight_scales: dict[tuple[str, int], np.ndarray] = {}
        floors = self._bias_floors()
        for w in self.plan.weights:
            node = self.nodes[w.node]
            if self._is_row_lookup(node, w):
                self.quantize_lookup(node, w.qtype)
                continue
            weight_scales[(w.node, w.input_index)] = self.quantize_weight(
                node, w.input_index, w.axis, w.qtype, w.symmetric, w.significand_bits,
                floors.get((node.inputs[w.input_index].name, w.axis)), w.zero_point_stored,
            )
        for b in self.plan.biases:
            self.quantize_bias(self.nodes[b.node], b.input_index, b.activation, weight_scales[(b.node, b.weight_index)],
                               b.stored_float)
        for name in self.plan.activations:
            self.quantize_activation(name)


@register_pass("insert-qdq")
class InsertQDQ(ir.passes.InPlacePass):
    """Insert QuantizeLinear/DequantizeLinear as the plan says, with int8 weights and int32 biases.

    Requires: the ``plan`` analysis with scales fixed by ``calibrate``. Guarantees: every planned
    activation is followed by one Q/DQ pair that its quantized consumers read (all consumers, and the
    graph output, where its producer is quantized too; float readers of a float producer's output,
    such as a residual connection, keep the exact value); every planned weight is an
    integer initializer feeding a DequantizeLinear (per channel where planned), so the file shrinks;
    biases are on the int32 grid input scale x weight scale, as int32 codes with a DequantizeLinear
    or as that grid's float values where the plan says the provider quantizes them itself; graph
    input and output names are kept.
    """

    # The layers keep their names, so AdaRound's float weights still say what each one rounded.
    preserves = ("unrounded_weights",)

    def __init__(self, context):
        super().__init__()
        self.context = context

    def requires(self, model: ir.Model) -> None:
        plan = self.context.require_analysis("plan", "insert-qdq", "plan-quantization")
        missing = [name for name, q in plan.activations.items() if q.scale is None]
        if missing:
            raise PipelineError(
                f"insert-qdq: {len(missing)} planned tensors (e.g. {missing[0]!r}) have no scale. "
                "Put 'calibrate' between 'plan-quantization' and 'insert-qdq' (assign-qparams follows it "
                "on its own)."
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.context.analyses.plan
        _Rewriter(model, plan).run()
        # The plan is now a record of what was done; the calibration table, of tensors this
        # rewrite renamed, is dropped as the pass modified the graph (it does not preserve it).
        plan.applied = True
        modified = bool(plan.activations or plan.weights)
        return ir.passes.PassResult(model, modified)
