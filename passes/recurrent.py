"""Recurrent layers: ONNX LSTM nodes as ONNX Runtime's integer LSTM kernel."""

from __future__ import annotations

__all__ = ["DynamicQuantizeLSTM"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.core.graph_edit import Namer, QdqNames as N, add_initializer
from qcompile.passes.quantization_plan import _Exclusions
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import QUANT_TYPES, quantize, weight_qparams

logger = logging.getLogger(__name__)


@register_pass("dynamic-quantize-lstm")
class DynamicQuantizeLSTM(ir.passes.InPlacePass):
    """Replace each LSTM with constant weights by ``com.microsoft.DynamicQuantizeLSTM``: int7 W and R (int8 where the run asks for it),
    symmetric, one scale per gate row and direction; the input and hidden state are quantized by
    the kernel at run time, so no calibration is needed.

    Requires: the CPU target (ONNX Runtime's CPU provider implements the op); LSTM nodes of layout 0
    (the contrib op has no layout attribute). Guarantees: the LSTM's float W and R no longer ship
    (a CRNN recognizer's LSTM held most of its 54 MB); nodes the config excludes stay float, and
    so does an LSTM whose weights are not constants. GRU and RNN have no such kernel and stay float.
    """

    def __init__(self, context):
        super().__init__()
        self.exclusions = _Exclusions(context.config)
        # The kernel multiplies dynamically quantized uint8 activations by these weights in ORT's
        # u8s8 GEMM, which saturates on AVX2-only CPUs unless the weights are int7 (see qparams):
        # the run's integer weight type where it has one, int7 otherwise.
        name = context.target.weight_type_name(context.config)
        self.weight_type = QUANT_TYPES[name if name in ("int7", "int8") else "int7"]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        weight_type = self.weight_type
        # LSTMs inside If branches and Loop/Scan bodies too (silero-vad's sits in an If branch):
        # the kernel needs no calibration, so any scope will do. Names are unique across scopes.
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        names = Namer(model.graph)
        for node in nodes:
            graph = node.graph
            if node.op_type != "LSTM" or node.domain not in ("", "ai.onnx") or self.exclusions.reason(node):
                continue
            if "layout" in node.attributes and node.attributes["layout"].value != 0:
                continue
            inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
            w, r = inputs[1], inputs[2]
            if w is None or r is None or w.const_value is None or r.const_value is None:
                continue
            quantized = []
            for value in (w, r):
                array = value.const_value.numpy().astype(np.float32)  # [directions, 4 * hidden, columns]
                directions, rows, columns = array.shape
                flat = array.reshape(directions * rows, columns)
                scale, zero_point = weight_qparams(flat, 0, weight_type)
                codes = quantize(flat, scale, zero_point, weight_type, 0).reshape(directions, rows, columns)
                # The kernel reads W and R transposed: [directions, columns, 4 * hidden].
                codes = np.ascontiguousarray(codes.transpose(0, 2, 1))
                base = value.name or node.name
                quantized += [
                    add_initializer(graph, base + N.QUANTIZED, codes, names),
                    add_initializer(graph, base + N.SCALE, scale.reshape(directions, rows), names),
                    add_initializer(graph, base + N.ZERO_POINT, zero_point.reshape(directions, rows), names),
                ]
            (wq, ws, wz), (rq, rs, rz) = quantized[:3], quantized[3:]
            attributes = {k: a for k, a in node.attributes.items() if k != "layout"}
            replacement = ir.node(
                "DynamicQuantizeLSTM", [inputs[0], wq, rq, *inputs[3:8], ws, wz, rs, rz],
                attributes=attributes, domain="com.microsoft", name=f"{node.name}_quant" if node.name else None,
                num_outputs=len(node.outputs),
            )
            graph.insert_before(node, replacement)
            for old, new in zip(node.outputs, replacement.outputs):
                if old.dtype is not None:  # unknown inside a subgraph shape inference left alone
                    new.dtype, new.shape = old.dtype, old.shape
                name = old.name
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
                old.name, new.name = None, name
            graph.remove(node, safe=True)
            modified = True
            logger.info("LSTM %r -> DynamicQuantizeLSTM (%s weights)", node.name, weight_type.name)
        if modified and "com.microsoft" not in model.opset_imports:
            model.opset_imports["com.microsoft"] = 1
        return ir.passes.PassResult(model, modified)
