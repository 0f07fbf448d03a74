"""Weight-only quantization of MatMul weights: INT4/INT8, block-wise or per channel, RTN or GPTQ.

Language models spend their memory and most of their decode time reading weights, and their
activations have outliers that make activation quantization costly in accuracy; storing only the
weights as 4-bit integers (one scale per block of ``block`` input channels of each output column)
shrinks the file ~7x against fp32 and keeps activations float.

Rounding: RTN rounds each weight to the nearest level. GPTQ (Frantar et al., ICLR 2023) rounds one
input channel at a time and spreads each rounding error over the channels not yet rounded, weighted
by the inverse Hessian H = X^T X of the layer's inputs on calibration data, so the layer's output
error ``||X W - X Q||`` (not the weight error) is minimised. Here the Hessians come from the float
model's activations, accumulated batch by batch (memory: one K x K matrix per distinct MatMul
input, never the activations).

Output forms: ``matmulnbits`` (``com.microsoft.MatMulNBits``, ONNX Runtime's 4/8-bit kernel, packed
two 4-bit codes per byte) or ``dq`` (a standard opset-21 blocked ``DequantizeLinear`` of an
INT4/INT8 initializer feeding the MatMul; portable, and ONNX Runtime fuses it into the same kernel).
A tied lm_head (``MatMul(h, Transpose(embedding))``) is quantized as its own weight.
"""

from __future__ import annotations

__all__ = ["QuantizeWeights", "quantize_gptq", "pack_4bit", "matmul_weights"]

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile.io.chunked_runs import DEFAULT_CHUNK, observe_calibration
from qcompile.errors import ConfigError
from qcompile.numerics.gptq import gptq_order, gptq_sweep
from qcompile.core.graph_edit import Namer, QdqNames as N, add_initializer
from qcompile.passes.qdq_insertion import dequantize_after_lookup
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import (
    BNB4_QUANT_TYPE,
    BlockQuantized,
    Bnb4Quantized,
    quantize_bnb4,
    lookup_qparams,
    quant_type,
    quantize_blocks,
    round_to_blocks,
)

logger = logging.getLogger(__name__)

_METHODS = ("rtn", "gptq")
_FORMS = ("matmulnbits", "dq")
# Code books: integers on a scale grid (MatMulNBits / DequantizeLinear), or bitsandbytes' NF4 / FP4 (MatMulBnb4).
_FORMATS = ("int", "nf4", "fp4")


def quantize_gptq(
    w_t: np.ndarray, hessian: np.ndarray, bits: int, block: int, symmetric: bool,
    *, damp: float = 0.01, act_order: bool = True, lazy_batch: int = 128,
) -> BlockQuantized:
    """GPTQ rounding of ``w_t`` [N, K] given the input Hessian ``hessian`` [K, K] (X^T X).

    Scales and zero points are fixed per block from the original weights first ("static groups"),
    so that rounding in activation order (largest Hessian diagonal first) keeps the block layout
    the kernels need. Errors are propagated with the upper Cholesky factor of H^-1 in lazy batches
    of ``lazy_batch`` columns, as in the paper's Algorithm 1. ``damp`` adds damp * mean(diag H) to
    the diagonal for numerical stability.
    """
    n, k = w_t.shape
    reference = quantize_blocks(w_t, bits, block, symmetric)  # for the static per-block parameters
    block_of = np.arange(k) // block
    scale_cols, zero_cols = reference.scales[:, block_of], reference.zero_points[:, block_of].astype(np.float64)
    order, inverse, dead = gptq_order(hessian, damp, act_order)
    w = w_t.astype(np.float64).copy()
    w[:, dead] = 0.0
    # Column-major: the sweep reads and writes one column at a time.
    w = np.asfortranarray(w[:, order], dtype=np.float32)
    scale_cols = np.asfortranarray(scale_cols[:, order], dtype=np.float32)
    zero_cols = np.asfortranarray(zero_cols[:, order], dtype=np.float32)

    def round_column(i: int, column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, z = scale_cols[:, i], zero_cols[:, i]
        q = round_to_blocks(column, s, z, bits)
        return q, (q - z) * s

    codes = gptq_sweep(w, inverse, round_column, lazy_batch=lazy_batch)
    restored = np.empty_like(codes)
    restored[:, order] = codes
    return BlockQuantized(restored.astype(np.uint8), reference.scales, reference.zero_points, bits, block)


def pack_4bit(codes: np.ndarray) -> np.ndarray:
    """[rows, cols] 4-bit codes -> [rows, ceil(cols / 2)] bytes, element 2i in the low nibble."""
    rows, cols = codes.shape
    if cols % 2:
        codes = np.concatenate([codes, np.zeros((rows, 1), dtype=codes.dtype)], axis=1)
    return (codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4)


@dataclasses.dataclass
class _Weight:
    node: ir.Node  # the MatMul
    weight: np.ndarray  # [K, N], as the MatMul multiplies it
    source: str  # the initializer's name (with "transposed" for a tied lm_head)


def matmul_weights(graph: ir.Graph) -> list[_Weight]:
    """MatMuls whose second input is a constant 2-D float weight, or the transpose of one."""
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        b = node.inputs[1]
        if b is None:
            continue
        if b.const_value is not None and not b.is_graph_input():
            array, source = b.const_value.numpy(), b.name
        else:
            producer = b.producer()
            if producer is None or producer.op_type != "Transpose" or producer.inputs[0].const_value is None:
                continue
            perm = producer.attributes.get("perm")
            if perm is not None and list(perm.value) != [1, 0]:
                continue
            array, source = producer.inputs[0].const_value.numpy().T, f"{producer.inputs[0].name} (transposed)"
        if array.ndim == 2 and array.dtype == np.float32 and array.shape[0] >= 16:
            found.append(_Weight(node, array, source))
    return found


@register_pass("quantize-weights", needs_data=False)
class QuantizeWeights(ir.passes.InPlacePass):
    """Store MatMul weights as INT4/INT8 blocks (RTN or GPTQ); activations stay float.

    Requires: calibration data (re-readable) when ``method=gptq``. Guarantees: every MatMul with a
    constant 2-D weight (or the transpose of one: a tied lm_head) reads it through a 4/8-bit
    ``MatMulNBits`` or blocked ``DequantizeLinear``; block size ``block`` along the input channels
    (0: one block per output channel), symmetric or asymmetric. The head (a MatMul whose output is
    a graph output) uses ``head_bits`` when given, and embedding tables (Gather from a constant
    table of >= 4096 values) are stored as int8 with one scale per row unless ``embedding_bits=0``.
    ``format=nf4`` or ``fp4`` stores 4-bit blocks as QLoRA's NormalFloat4 or bitsandbytes' FP4
    (ONNX Runtime's ``com.microsoft.MatMulBnb4``: a code book times each block's absmax, rounded to
    nearest) instead of integers on a scale grid; an 8-bit head stays ``MatMulNBits``.
    The report lists each weight with its method and relative weight error, and any MatMul left
    float with the reason. ``accuracy_level`` is MatMulNBits' attribute: 0 computes in float32
    (ORT's CPU kernel then dequantizes the weights on every call), 4 in int8 with activations
    quantized per block at run time, several times faster for decoding.
    """

    def __init__(
        self, context, *, bits: int = 4, block: int = 128, symmetric: bool = True, method: str = "rtn",
        form: str = "matmulnbits", damp: float = 0.01, act_order: bool = True, accuracy_level: int = 0,
        head_bits: int | None = None, embedding_bits: int = 8, chunk: int = DEFAULT_CHUNK, format: str = "int",  # noqa: A002
    ):
        super().__init__()
        if format not in _FORMATS:
            raise ConfigError(f"quantize-weights: format must be one of {', '.join(_FORMATS)}, got {format!r}.")
        if format != "int" and (bits != 4 or method != "rtn" or not block):
            raise ConfigError(f"quantize-weights: format={format} is 4-bit, rounded to nearest, in blocks "
                              "(ONNX Runtime's MatMulBnb4): use bits=4, method=rtn and a block size.")
        for name, value in (("bits", bits), ("head_bits", head_bits)):
            if value is not None and value not in (4, 8):
                raise ConfigError(f"quantize-weights: {name} must be 4 or 8, got {value}.")
        if embedding_bits not in (0, 8):
            raise ConfigError(f"quantize-weights: embedding_bits must be 8 (int8, one scale per row) or 0 (float), got {embedding_bits}.")
        if method not in _METHODS:
            raise ConfigError(f"quantize-weights: method must be one of {', '.join(_METHODS)}, got {method!r}.")
        if form not in _FORMS:
            raise ConfigError(f"quantize-weights: form must be one of {', '.join(_FORMS)}, got {form!r}.")
        if block and (block < 16 or block & (block - 1)):
            raise ConfigError(f"quantize-weights: block must be a power of two >= 16 (or 0 for per channel), got {block}.")
        if form == "matmulnbits" and not block:
            raise ConfigError("quantize-weights: MatMulNBits needs a block size; use form=dq for per-channel weights.")
        self.context = context
        self.bits, self.block, self.symmetric, self.method, self.form = bits, block, symmetric, method, form
        self.damp, self.act_order, self.accuracy_level, self.chunk = damp, act_order, accuracy_level, chunk
        self.head_bits, self.embedding_bits, self.format = head_bits, embedding_bits, format

    def requires(self, model: ir.Model) -> None:
        if self.method == "gptq":
            self.context.require_rereadable_data("quantize-weights(method=gptq)", "measures each layer's inputs",
                                                 "use method=rtn")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        weights = matmul_weights(model.graph)
        hessians = self._hessians(model, weights) if self.method == "gptq" else {}
        records = {}
        for weight in weights:
            w_t = np.ascontiguousarray(weight.weight.T)
            block = self.block or w_t.shape[1]
            is_head = weight.node.outputs[0].is_graph_output()
            bits = self.head_bits if is_head and self.head_bits is not None else self.bits
            hessian = hessians.get(weight.node.inputs[0].name)
            code_book = self.format if bits == 4 else "int"  # an 8-bit head stays on the integer grid
            if code_book != "int":
                quantized = quantize_bnb4(w_t, code_book, block)
            elif hessian is not None:
                quantized = quantize_gptq(w_t, hessian, bits, block, self.symmetric, damp=self.damp, act_order=self.act_order)
            else:
                quantized = quantize_blocks(w_t, bits, block, self.symmetric)
            error = float(np.linalg.norm(quantized.dequantize() - w_t) / max(np.linalg.norm(w_t), 1e-12))
            old_weight = weight.node.inputs[1]
            emit = self._emit_bnb4 if code_book != "int" else self._emit_matmulnbits if self.form == "matmulnbits" else self._emit_dq
            emit(model.graph, weight, quantized)
            if old_weight.producer() is not None and not old_weight.uses():
                model.graph.remove(old_weight.producer(), safe=True)  # the tied head's Transpose
            records[weight.node.name] = {
                "weight": weight.source, "shape": list(weight.weight.shape), "bits": bits, "block": block,
                "method": "gptq" if hessian is not None else "rtn", "relative_weight_error": round(error, 5),
                **({"format": code_book} if code_book != "int" else {}), **({"head": True} if is_head else {}),
            }
        tables = _quantize_tables(model.graph) if self.embedding_bits else {}
        left = {
            node.name: "its weight is not a constant 2-D float32 matrix (or the transpose of one)"
            for node in model.graph
            if node.op_type == "MatMul" and node.name not in records and _computed_from_constants(node.inputs[1])
        }
        self.context.records["quantize-weights"] = {"form": self.form, "weights": records, "tables": tables, "left_float": left}
        logger.info("quantize-weights: %d MatMul weights at %d bits (%s), %d left float", len(records), self.bits, self.method, len(left))
        return ir.passes.PassResult(model, bool(records or tables))

    # ----- GPTQ statistics -----
    def _hessians(self, model: ir.Model, weights: list[_Weight]) -> dict[str, np.ndarray]:
        """X^T X per distinct MatMul input (rows = all leading axes), over the calibration data."""
        names = sorted({w.node.inputs[0].name for w in weights})
        sums: dict[str, np.ndarray] = {}
        for runs in observe_calibration(model, names, self.context, chunk=self.chunk, what="GPTQ"):
            for outputs in runs:
                for name, x in zip(names, outputs):
                    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
                    sums[name] = sums.get(name, 0.0) + rows.T @ rows
        return sums

    # ----- output forms -----
    def _emit_matmulnbits(self, graph: ir.Graph, weight: _Weight, q: BlockQuantized) -> None:
        n, k = q.codes.shape
        blocks = q.scales.shape[1]
        padded = np.zeros((n, blocks * q.block), dtype=np.uint8)
        padded[:, :k] = q.codes
        if q.bits == 4:
            packed = pack_4bit(padded).reshape(n, blocks, q.block // 2)
        else:
            packed = padded.reshape(n, blocks, q.block)
        base = weight.source.replace(" (transposed)", "_transposed")
        inputs = [weight.node.inputs[0], add_initializer(graph, f"{base}_q{q.bits}", packed),
                  add_initializer(graph, f"{base}_scales", q.scales.reshape(-1))]
        if not self.symmetric:
            zero_points = pack_4bit(q.zero_points).reshape(-1) if q.bits == 4 else q.zero_points.reshape(-1)
            inputs.append(add_initializer(graph, f"{base}_zero_points", zero_points))
        node = ir.node(
            "MatMulNBits", inputs, domain="com.microsoft", name=weight.node.name,
            attributes={"K": k, "N": n, "bits": q.bits, "block_size": q.block, "accuracy_level": self.accuracy_level},
        )
        _replace(graph, weight.node, node)
        if "com.microsoft" not in graph.opset_imports:
            graph.opset_imports["com.microsoft"] = 1

    def _emit_bnb4(self, graph: ir.Graph, weight: _Weight, q: Bnb4Quantized) -> None:
        base = weight.source.replace(" (transposed)", "_transposed")
        n, k = q.shape
        node = ir.node(
            "MatMulBnb4", [weight.node.inputs[0], add_initializer(graph, f"{base}_{q.kind}", q.packed),
                           add_initializer(graph, f"{base}_absmax", q.absmax)],
            domain="com.microsoft", name=f"{weight.node.name}_{q.kind}",
            attributes={"K": k, "N": n, "block_size": q.block, "quant_type": BNB4_QUANT_TYPE[q.kind]},
        )
        _replace(graph, weight.node, node)
        if "com.microsoft" not in graph.opset_imports:
            graph.opset_imports["com.microsoft"] = 1

    def _emit_dq(self, graph: ir.Graph, weight: _Weight, q: BlockQuantized) -> None:
        # DequantizeLinear (opset 21) blocked along axis 0 of the [K, N] weight.
        signed = self.symmetric
        offset = 2 ** (q.bits - 1) if signed else 0
        storage = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}[(q.bits, signed)]
        values = (q.codes.astype(np.int16) - offset).T.astype(storage)  # [K, N]
        base = weight.source.replace(" (transposed)", "_transposed")
        inputs = [add_initializer(graph, f"{base}_q{q.bits}", values), add_initializer(graph, f"{base}_scales", np.ascontiguousarray(q.scales.T))]
        if not signed:
            inputs.append(add_initializer(graph, f"{base}_zero_points", np.ascontiguousarray(q.zero_points.T).astype(storage)))
        dq = ir.node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": q.block}, name=f"{weight.node.name}_DequantizeLinear")
        dq.outputs[0].name = base + N.DEQUANTIZED
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(list(weight.weight.shape))
        graph.insert_before(weight.node, dq)
        weight.node.replace_input_with(1, dq.outputs[0])
        if graph.opset_imports.get("", 0) < 21:
            graph.opset_imports[""] = 21


def _computed_from_constants(value: ir.Value | None) -> bool:
    """A weight, as opposed to an activation: a constant, or the output of a node that reads only constants.
    MatMuls of two activations (attention) have no weight to quantize and are not reported."""
    if value is None:
        return False
    if value.const_value is not None and not value.is_graph_input():
        return True
    producer = value.producer()
    return producer is not None and all(v is None or (v.const_value is not None and not v.is_graph_input()) for v in producer.inputs)


# Lookup tables smaller than this stay float: the saving would not pay for a DequantizeLinear.
_TABLE_MIN_SIZE = 4096


def _quantize_tables(graph: ir.Graph) -> dict[str, dict]:
    """Gather tables (embeddings) -> int8 with symmetric scales per block of a row (``qparams.lookup_qparams``),
    dequantized after the lookup."""
    records = {}
    namer = Namer(graph)
    for node in list(graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        table = node.inputs[0]
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        if table is None or table.const_value is None or table.is_graph_input() or axis != 0 or len(table.uses()) != 1:
            continue
        array = table.const_value.numpy()
        if array.dtype != np.float32 or array.ndim != 2 or array.size < _TABLE_MIN_SIZE:
            continue
        stored = lookup_qparams(array, quant_type("int8"))
        dequantize_after_lookup(graph, node, stored, namer, lambda base, values: add_initializer(graph, base, values, namer))
        error = np.linalg.norm(stored.dequantize() - array) / max(np.linalg.norm(array), 1e-12)
        records[node.name] = {"table": table.name, "shape": list(array.shape), "bits": 8, "block": stored.block,
                              "relative_weight_error": round(float(error), 5)}
    return records


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put ``new`` where ``old`` was; ``old``'s output value moves to ``new`` (same name, same readers)."""
    graph.insert_before(old, new)
    out, replacement = old.outputs[0], new.outputs[0]
    replacement.dtype, replacement.shape = out.dtype or ir.DataType.FLOAT, out.shape
    name = out.name
    ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    out.name = None
    replacement.name = name
