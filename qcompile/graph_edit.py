"""Graph edits every rewriting pass makes: names that collide with nothing, and new initializers."""

from __future__ import annotations

__all__ = ["Namer", "add_initializer"]

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
