"""Give MatMuls whose activations are not 8-bit a kernel that computes what the QDQ model says."""

from __future__ import annotations

__all__ = ["LowerWideMatMuls"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.core.graph_edit import Namer, add_initializer, attribute_value, initializer_array
from qcompile.passes.registry import register_pass

logger = logging.getLogger(__name__)

_EIGHT_BIT = (ir.DataType.INT8, ir.DataType.UINT8)
# MatMulNBits' largest block: per-channel scales are repeated over the blocks of a row, so any
# block size is exact; 128 is the one ORT's 8-bit CPU kernels are tuned for.
_MAX_BLOCK = 128


def _eight_bit_dequantize(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear producing ``value`` when it reads 8-bit integers."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ("", "ai.onnx"):
        return None
    return producer if producer.inputs[0].dtype in _EIGHT_BIT else None


def _weight(node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes [N, K] uint8, scale [N], zero point [N] uint8) of the node's int8 weight, when it is a
    per-tensor or per-output-channel DequantizeLinear of a constant 2-D weight; else None."""
    dq = _eight_bit_dequantize(node.inputs[1])
    if dq is None or "block_size" in dq.attributes and attribute_value(dq, "block_size", 0):
        return None
    codes, scale = initializer_array(dq.inputs[0]), initializer_array(dq.inputs[1])
    if codes is None or scale is None or codes.ndim != 2 or scale.dtype != np.float32:
        return None
    has_zero_point = len(dq.inputs) > 2 and dq.inputs[2] is not None
    zero_point = initializer_array(dq.inputs[2]) if has_zero_point else np.zeros((), codes.dtype)
    if zero_point is None:
        return None
    transposed = node.op_type == "Gemm" and attribute_value(node, "transB", 0)
    output_axis = 0 if transposed else 1
    if scale.size > 1 and (attribute_value(dq, "axis", 1) % 2 != output_axis or scale.size != codes.shape[output_axis]):
        return None  # scales along the input channels: not a MatMulNBits layout
    codes = codes if transposed else codes.T  # [N, K]
    n = codes.shape[0]
    offset = 128 if codes.dtype == np.int8 else 0
    as_unsigned = lambda a: (a.astype(np.int16) + offset).astype(np.uint8)  # noqa: E731
    return (as_unsigned(codes), np.broadcast_to(scale.reshape(-1), (n,)).astype(np.float32),
            np.broadcast_to(as_unsigned(zero_point).reshape(-1), (n,)))


@register_pass("lower-wide-matmuls")
class LowerWideMatMuls(ir.passes.InPlacePass):
    """Rewrite DequantizeLinear(int8 weight) -> MatMul/Gemm whose activation is not 8-bit (16-bit or
    float) into ``com.microsoft.MatMulNBits`` (bits 8, ``accuracy_level`` 0) on the same grid.

    Why: ONNX Runtime's CPU provider (1.32) fuses such a pair into MatMulNBits itself, at its session
    default accuracy level 4, which quantizes the activations to int8 per block at run time: a
    16-bit-activation model then runs with 8-bit activations (measured: a 3-Gemm model 36.9 dB as
    written, 15.1 dB as fused; all-MiniLM-L6-v2 at uint16 29.8 -> 27.7 dB), and 1.31 (which does
    not fuse) gives other numbers than 1.32. Written as MatMulNBits at level 0, ORT computes it in
    float32 from the same int8 weight, on every version, with no float copy of the weight.
    Requires: ``insert-qdq`` has run. Guarantees: in every scope (If branches, loop bodies; a
    weight dequantized in an outer scope is left, ORT does not fuse across scopes), each
    rewritten node keeps its name and output; its
    weight's integers and scales are unchanged (a per-channel scale repeats over the row's blocks;
    symmetric weights use MatMulNBits' default zero point, 128 on its unsigned grid);
    MatMuls with 8-bit activations (ORT's QLinearMatMul/QGemm), Gemms with transA, alpha != 1 or
    a bias that is not a float vector are left as they are; ``records['lower-wide-matmuls']``
    lists the rewritten nodes.
    """

    def __init__(self, context):
        super().__init__()
        self.context = context

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        namer = Namer(graph)
        packed: dict[int, tuple[ir.Value, ...]] = {}  # one MatMulNBits weight per DequantizeLinear
        rewritten = []
        # If branches and loop bodies too, where the weight's DequantizeLinear is in the same
        # subgraph: ORT fuses there as well. New weights are initializers of the main graph, which
        # every subgraph may read.
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            if node.inputs[0] is None or _eight_bit_dequantize(node.inputs[0]) is not None:
                continue  # 8-bit activations: ORT's integer kernels, which compute the QDQ arithmetic
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if node.op_type == "Gemm" and (
                attribute_value(node, "transA", 0) or attribute_value(node, "alpha", 1.0) != 1.0 or attribute_value(node, "beta", 1.0) != 1.0
            ):
                continue
            if bias is not None and (bias.shape is None or bias.shape.rank() != 1 or bias.dtype != ir.DataType.FLOAT):
                continue
            dq = node.inputs[1].producer() if node.inputs[1] is not None else None
            if dq is not None and dq.graph is not node.graph:
                # A weight dequantized in an outer scope (quantize-loop-weights' hoisted DQ): ORT
                # fuses within one graph only, so the body's MatMul already computes as written,
                # from a weight dequantized once per run rather than at every iteration.
                continue
            weight = _weight(node)
            if weight is None:
                continue
            if id(dq) not in packed:
                packed[id(dq)] = self._pack(graph, namer, dq, *weight)
            b, scales, zero_points, k, n, block = packed[id(dq)]
            inputs = [node.inputs[0], b, scales, zero_points]
            if bias is not None:
                inputs += [None, bias]  # g_idx unused
            while inputs[-1] is None:
                inputs.pop()
            new = ir.node("MatMulNBits", inputs, domain="com.microsoft", name=node.name,
                          attributes={"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": 0})
            owner = node.graph
            owner.insert_before(node, new)
            out, replacement = node.outputs[0], new.outputs[0]
            replacement.dtype, replacement.shape = out.dtype, out.shape
            name = out.name
            ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
            owner.remove(node, safe=True)
            out.name, replacement.name = None, name
            rewritten.append(node.name)
        if rewritten:
            graph.opset_imports.setdefault("com.microsoft", 1)
            self.context.records["lower-wide-matmuls"] = {"rewritten": rewritten}
            logger.info("lower-wide-matmuls: %d MatMul/Gemm with 16-bit or float activations -> MatMulNBits "
                        "(8-bit weights, float32 compute)", len(rewritten))
        return ir.passes.PassResult(model, bool(rewritten))

    @staticmethod
    def _pack(graph, namer, dq, codes, scale, zero_point):
        n, k = codes.shape
        block = min(_MAX_BLOCK, max(16, 1 << (k - 1).bit_length()))
        blocks = -(-k // block)
        padded = np.zeros((n, blocks * block), dtype=np.uint8)
        padded[:, :k] = codes
        base = dq.inputs[0].name or "weight"
        # Symmetric int8 weights are 128 on the unsigned grid: MatMulNBits' default zero point.
        zero_points = None if np.all(zero_point == 128) else add_initializer(
            graph, f"{base}_nbits_zero_points", np.repeat(zero_point, blocks).astype(np.uint8), namer)
        return (
            add_initializer(graph, f"{base}_nbits", padded.reshape(n, blocks, block), namer),
            add_initializer(graph, f"{base}_nbits_scales", np.repeat(scale, blocks), namer),
            zero_points, k, n, block,
        )
