"""Graph edits every rewriting pass makes: names that collide with nothing, new initializers, and
the two reads they start from (a node's attribute, a constant's array); and the one walk over an
onnx.GraphProto's nodes, subgraphs included, for the code that reads protos (ORT's optimized model,
a compiled model's variants)."""

from __future__ import annotations

__all__ = ["Namer", "QdqNames", "add_initializer", "attribute_value", "initializer_array", "proto_nodes"]

import numpy as np
import onnx_ir as ir


class Namer:
    """Fresh value and node names that collide with nothing already in the graph."""

    def __init__(self, graph: ir.Graph):
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        # Names are unique across all scopes: subgraphs' too.
        nodes = list(ir.traversal.RecursiveGraphIterator(graph))
        self.used |= {o.name for n in nodes for o in n.outputs} | {n.name for n in nodes}
        self.used |= {v.name for n in nodes for a in n.attributes.values() if a.type == ir.AttributeType.GRAPH
                      for v in (*a.value.inputs, *a.value.initializers.values())}

        self._next_suffix: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        # Counting on from the last suffix given for ``base``: thousands of nodes named "Q" would
        # otherwise rescan "Q_1", "Q_2", ... on every call.
        name, suffix = base, self._next_suffix.get(base, 1)
        if suffix > 1:
            name = f"{base}_{suffix}"
        while name in self.used:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self._next_suffix[base] = suffix
        self.used.add(name)
        return name


class QdqNames:
    """What the rewriting passes call what they add for a tensor named ``base``: ``base + QUANTIZED``
    (its integer codes, or a QuantizeLinear's output), ``base + DEQUANTIZED``, ``base + SCALE``,
    ``base + ZERO_POINT``; QuantizeLinear and DequantizeLinear nodes are counted (``Q``, ``Q_1``, ...),
    their values carry the tensor's name. An activation's zero point is one scalar shared by every
    activation of that type and value (``shared_zero_point``: ``zp_u8_128``), and a float bias
    rounded to its int32 grid keeps the bias's name where nothing else reads it (else ``base + ON_GRID``).

    Short on purpose: a small model repeats them over every Q/DQ pair, ~13 times per activation.
    ONNX Runtime's quantizer's spellings (``_quantized``, ``_DequantizeLinear``, ...) were 17 KB,
    8 % of PP-LCNet's int8 direction classifier (220 KB). ``LEGACY_*`` are those spellings, which
    the analysis still reads (models from ORT's quantizer and from earlier qcompile versions).
    """

    QUANTIZED = "_q"
    DEQUANTIZED = "_dq"
    SCALE = "_scale"
    ZERO_POINT = "_zp"
    ON_GRID = "_on_grid"
    QUANTIZE_NODE = "Q"
    DEQUANTIZE_NODE = "DQ"
    LEGACY_QUANTIZED = ("_quantized",)
    LEGACY_DEQUANTIZED = ("_dequantized", "_DequantizeLinear_Output")

    @staticmethod
    def shared_zero_point(type_name: str, value: int) -> str:
        short = type_name.replace("uint", "u").replace("int", "i")
        return f"zp_{short}_{value}"


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray, namer: Namer | None = None) -> ir.Value:
    """A new initializer holding ``array``, named ``base`` (or ``base_1``, ... if that is taken)."""
    name = (namer or Namer(graph))(base)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
    graph.register_initializer(value)
    return value


def attribute_value(node: ir.Node, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default`` where the node does not set it."""
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def initializer_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant initializer (not one a graph input can override), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def proto_nodes(graph) -> list:
    """The nodes of an onnx.GraphProto and of its subgraphs (If branches, Loop/Scan bodies, nested),
    depth first: each node, then the nodes of the subgraphs it holds. ONNX names are unique across the
    nesting (a subgraph cannot shadow an outer name), so one map over all of them is sound."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.HasField("g"):
                nodes += proto_nodes(attribute.g)
            for subgraph in attribute.graphs:
                nodes += proto_nodes(subgraph)
    return nodes
