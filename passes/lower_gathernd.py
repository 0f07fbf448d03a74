"""Rewrite GatherND with constant indices into Reshape (+ Gather), ops NPU providers run."""

from __future__ import annotations

__all__ = ["LowerGatherND"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.passes.registry import register_pass

logger = logging.getLogger(__name__)


@register_pass("lower-gathernd")
class LowerGatherND(ir.passes.InPlacePass):
    """Replace GatherND(data, constant indices) that picks single elements by Reshape and Gather.

    Hugging Face's mask builders export GatherND over the attention mask; QNN has no GatherND, so
    one such node puts the model off the NPU. With ``batch_dims = 0``, indices of shape
    (..., rank(data)) and a static data shape, the same elements are Gather(Reshape(data, [-1]),
    flat indices) -- or only a Reshape when the flat indices are 0, 1, 2, ... in order.
    Guarantees: ``records['lower-gathernd']`` counts the rewrites; other GatherNDs are unchanged.
    """

    def __init__(self, context):
        super().__init__()
        self.context = context

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rewritten = 0
        for node in list(graph):
            if node.op_type != "GatherND" or node.domain not in ("", "ai.onnx"):
                continue
            data, indices = node.inputs[0], node.inputs[1]
            batch_dims = node.attributes["batch_dims"].value if "batch_dims" in node.attributes else 0
            if (
                batch_dims != 0 or indices.const_value is None or data.shape is None
                or not all(isinstance(d, int) for d in data.shape)
            ):
                continue
            dims = list(data.shape)
            idx = indices.const_value.numpy().astype(np.int64)
            if idx.shape[-1] != len(dims):
                continue  # gathers slices, not elements
            idx = np.where(idx < 0, idx + np.array(dims), idx)
            flat = np.ravel_multi_index(tuple(np.moveaxis(idx, -1, 0)), dims).astype(np.int64)
            out_shape = np.array(idx.shape[:-1], np.int64)
            flat_shape = ir.Value(name=f"{node.name}_flat_shape", const_value=ir.tensor(np.array([-1], np.int64)))
            graph.register_initializer(flat_shape)
            reshape = ir.node("Reshape", [data, flat_shape], name=f"{node.name}_flatten")
            new_nodes = [reshape]
            if np.array_equal(flat.reshape(-1), np.arange(flat.size)) and flat.size == int(np.prod(dims)):
                shape = ir.Value(name=f"{node.name}_shape", const_value=ir.tensor(out_shape))
                graph.register_initializer(shape)
                # Every element in order: a Reshape of the data is the whole gather.
                reshape.replace_input_with(1, shape)
            else:
                positions = ir.Value(name=f"{node.name}_flat_indices", const_value=ir.tensor(flat))
                graph.register_initializer(positions)
                new_nodes.append(ir.node("Gather", [reshape.outputs[0], positions], attributes={"axis": 0},
                                         name=f"{node.name}_gather"))
            last = new_nodes[-1].outputs[0]
            last.dtype, last.shape = node.outputs[0].dtype, node.outputs[0].shape
            graph.insert_before(node, new_nodes)
            ir.convenience.replace_all_uses_with(node.outputs[0], last, replace_graph_outputs=True)
            name = node.outputs[0].name
            graph.remove(node, safe=True)
            last.name = name
            rewritten += 1
        if rewritten:
            self.context.records["lower-gathernd"] = {"rewritten_gathernd_nodes": rewritten}
        return ir.passes.PassResult(model, rewritten > 0)
