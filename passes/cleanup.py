"""Finishing passes: what the deployed file does not need."""

from __future__ import annotations

__all__ = ["StripMetadata"]

import onnx_ir as ir

from qcompile.passes.registry import register_pass


@register_pass("strip-metadata")
class StripMetadata(ir.passes.InPlacePass):
    """Drop per-node and per-value metadata and doc strings (exporter stack traces, scopes).

    Guarantees: the computation is unchanged; the model-level metadata and every name are kept.
    PyTorch's exporter stores a stack trace and module path on every node: on all-MiniLM-L6-v2 that
    is 0.43 MB, 1.8% of the INT8 file. Leave this pass out of the pipeline to keep them.
    """

    def __init__(self, context):
        super().__init__()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.metadata_props or node.doc_string:
                node.metadata_props.clear()
                node.doc_string = None
                modified = True
            for value in node.outputs:
                if value.metadata_props or value.doc_string:
                    value.metadata_props.clear()
                    value.doc_string = None
                    modified = True
        return ir.passes.PassResult(model, modified)
