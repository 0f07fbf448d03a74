"""Graph edits every rewriting pass makes: names that collide with nothing, new initializers, and
the two reads they start from (a node's attribute, a constant's array); and the one walk over an
onnx.GraphProto's nodes, subgraphs included, for the code that reads protos (ORT's optimized model,
a compiled model's variants)."""

from __future__ import annotations

__all__ = ["Namer", "add_initializer", "attribute_value", "initializer_array", "proto_nodes"]

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

    def __call__(self, base: str) -> str:
        name, suffix = base, 1
        while name in self.used:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self.used.add(name)
        return name


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
