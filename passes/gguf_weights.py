"""A GGUF file's quantized blocks carried over as they are: no second rounding.

A model exported from a ``.gguf`` file (``qcompile.io.causal_lm``) holds the float weights that
transformers dequantized from its blocks, and the file's path in its metadata. Rounding those
floats to a new 4-bit grid would round them twice; this pass writes the file's own blocks instead,
on the same grid:

- Q4_0 (w = d * (q - 8)) as ``MatMulNBits`` 4-bit, zero point 8 (its default);
- Q4_1 (w = d * q + m) as ``MatMulNBits`` 4-bit with float zero points -m / d;
- Q8_0 (w = d * q) as ``MatMulNBits`` 8-bit, zero point 128 (its default), and an embedding table
  stored so as int8 rows in blocks of 32 with one scale each (``qparams.LookupQuantized``).

llama.cpp stores LLaMA's q/k projections with their rows permuted for its rotary layout; the rows
are put back in transformers' order (the blocks run along the input channels, so each row's blocks
are untouched). Each tensor's dequantized grid is compared with the float weight of the export:
the report lists its GGUF type, its ONNX form and the largest deviation (float rounding only, about
1e-7 relative). Tensors of other types (K-quants, F16, F32) stay float, listed with their type,
for a following ``quantize-weights`` to store.
"""

from __future__ import annotations

__all__ = ["GgufWeights", "GGUF_FILE_KEY"]

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.core.graph_edit import Namer, add_initializer
from qcompile.errors import ConfigError, ModelError
from qcompile.numerics.qparams import LookupQuantized
from qcompile.passes.qdq_insertion import dequantize_after_lookup
from qcompile.passes.registry import register_pass

logger = logging.getLogger(__name__)

# The model metadata key under which causal_lm records the GGUF file a model was exported from.
GGUF_FILE_KEY = "qcompile.gguf_file"
_BLOCK = 32  # every type this pass reads has blocks of 32 along the input channels


def _blocks(kind: str, raw: np.ndarray, rows: int, columns: int):
    """(codes uint8 [rows, blocks, 32], scales float32 [rows, blocks], zero points float32 or None, bits)."""
    blocks = columns // _BLOCK
    data = raw.reshape(rows, blocks, -1)
    d = data[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        q = data[..., 2:34].copy().view(np.int8)
        return (q.astype(np.int16) + 128).astype(np.uint8), d, None, 8
    offset = 4 if kind == "Q4_1" else 2
    qs = data[..., offset:offset + 16]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j in the low nibble, j + 16 in the high
    if kind == "Q4_0":
        return codes, d, None, 4
    m = data[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    # w = d * q + m = (q - zp) * d with zp = -m / d; a block with d == 0 holds m alone: (0 - (-1)) * m.
    flat = d == 0
    zero_points = np.where(flat, -1.0, -m / np.where(flat, 1.0, d)).astype(np.float32)
    codes[flat] = 0
    return codes, np.where(flat, m, d).astype(np.float32), zero_points, 4


def _dequantize(codes, scales, zero_points, bits) -> np.ndarray:
    zp = np.float32(2 ** (bits - 1)) if zero_points is None else zero_points[..., None]
    return ((codes.astype(np.float32) - zp) * scales[..., None]).reshape(codes.shape[0], -1)


def _rows_in_transformers_order(rows: int, heads: int) -> np.ndarray:
    """For each row of transformers' q/k projection, its row in llama.cpp's permuted layout
    (transformers' reverse_permute applied to the row numbers)."""
    index = np.arange(rows).reshape(heads, rows // heads // 2, 2)
    return index.swapaxes(2, 1).reshape(rows)


@register_pass("gguf-weights")
class GgufWeights(ir.passes.InPlacePass):
    """Write a GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are (see the module docstring).

    Requires: a model exported from a ``.gguf`` file by qcompile (its path in the metadata) and the
    ``gguf`` package. Guarantees: every MatMul whose weight the file stores in one of those types
    reads it through ``MatMulNBits`` on the file's own grid, and a Q8_0 embedding table is looked up
    from its blocks; ``records["gguf-weights"]`` lists each tensor with its type, form and deviation.
    """

    def __init__(self, context):
        super().__init__()
        self.context = context

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        source = model.metadata_props.get(GGUF_FILE_KEY)
        if not source:
            raise ConfigError("gguf-weights needs a model exported from a .gguf file by qcompile "
                              "(qcompile compile model.gguf ...); this one names no GGUF file.")
        try:
            import gguf
        except ModuleNotFoundError:
            raise ConfigError("gguf-weights needs the gguf package: pip install gguf") from None
        reader = gguf.GGUFReader(source)
        fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}
        arch = fields.get("general.architecture", "llama")
        known = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
        if arch not in known or f"{arch}.block_count" not in fields:
            raise ModelError(f"{source!r}: the gguf package knows no tensor names for architecture {arch!r} "
                             "(or the file gives no block count); compile it with another recipe.")
        names = gguf.get_tensor_name_map(known[arch], int(fields[f"{arch}.block_count"]))
        tensors = {t.name: t for t in reader.tensors}
        heads = int(fields.get(f"{arch}.attention.head_count", 0))
        kv_heads = int(fields.get(f"{arch}.attention.head_count_kv", heads))
        graph, namer = model.graph, Namer(model.graph)
        records: dict[str, dict] = {}
        for node in list(graph):
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                self._matmul(graph, node, names, tensors, arch, heads, kv_heads, records)
            elif node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].name == "model.embed_tokens.weight":
                self._lookup(graph, node, tensors.get("token_embd.weight"), namer, records)
        if "com.microsoft" not in graph.opset_imports:
            graph.opset_imports["com.microsoft"] = 1
        self.context.records["gguf-weights"] = {"file": Path(source).name, "tensors": records}
        carried = [r for r in records.values() if "onnx_form" in r]
        worst = max((r["max_abs_deviation"] for r in carried), default=0.0)
        logger.info("gguf-weights: %d tensors on the file's own grid (largest deviation %.2e), %d left float",
                    len(carried), worst, len(records) - len(carried))
        return ir.passes.PassResult(model, bool(carried))

    def _matmul(self, graph, node, names, tensors, arch, heads, kv_heads, records) -> None:
        weight = node.inputs[1]
        transposed = weight.producer() if weight.producer() is not None and weight.producer().op_type == "Transpose" else None
        if transposed is not None and transposed.inputs[0].name == "model.embed_tokens.weight":
            hf, float_weight = "lm_head.weight", transposed.inputs[0].const_value.numpy().T
        elif node.name == "/lm_head/MatMul" and weight.is_initializer() and weight.const_value is not None:
            hf, float_weight = "lm_head.weight", weight.const_value.numpy()  # fold-constants folded the Transpose
        elif weight.is_initializer() and weight.const_value is not None and weight.name.endswith(".MatMul.weight"):
            hf, float_weight = weight.name.removesuffix(".MatMul.weight") + ".weight", weight.const_value.numpy()
        else:
            return
        tensor = tensors.get(names.get_name(hf, try_suffixes=(".weight",)) or "")
        if tensor is None and hf == "lm_head.weight":  # a file without output.weight ties the head to the embedding
            tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
        if tensor is None:
            return
        k, n = float_weight.shape
        kind = tensor.tensor_type.name
        if kind not in ("Q4_0", "Q4_1", "Q8_0") or k % _BLOCK:
            records[node.name] = {"gguf": tensor.name, "gguf_type": kind, "left": "not a Q4_0/Q4_1/Q8_0 tensor"}
            return
        codes, scales, zero_points, bits = _blocks(kind, np.asarray(tensor.data), n, k)
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            order = _rows_in_transformers_order(n, heads if tensor.name.endswith("attn_q.weight") else kv_heads)
            codes, scales = codes[order], scales[order]
            zero_points = zero_points[order] if zero_points is not None else None
        deviation = float(np.abs(_dequantize(codes, scales, zero_points, bits) - float_weight.T).max())
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else codes
        base = hf.removesuffix(".weight")
        inputs = [node.inputs[0], add_initializer(graph, f"{base}.{kind.lower()}", packed),
                  add_initializer(graph, f"{base}.scales", scales.reshape(-1))]
        if zero_points is not None:
            inputs.append(add_initializer(graph, f"{base}.zero_points", zero_points.reshape(-1)))
        replacement = ir.node("MatMulNBits", inputs, domain="com.microsoft", name=f"{node.name}_{kind}",
                              attributes={"K": k, "N": n, "bits": bits, "block_size": _BLOCK})
        graph.insert_before(node, replacement)
        out = node.outputs[0]
        replacement.outputs[0].dtype, replacement.outputs[0].shape, name = out.dtype, out.shape, out.name
        ir.convenience.replace_all_uses_with(out, replacement.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name, replacement.outputs[0].name = None, name
        if transposed is not None and not transposed.outputs[0].uses():
            graph.remove(transposed, safe=True)
        scale = float(np.abs(float_weight).max()) or 1.0
        records[node.name] = {"gguf": tensor.name, "gguf_type": kind, "onnx_form": f"MatMulNBits {bits}-bit, block 32"
                              + (", float zero points" if zero_points is not None else ""),
                              "max_abs_deviation": deviation, "relative_deviation": deviation / scale}

    def _lookup(self, graph, node, tensor, namer, records) -> None:
        if tensor is None or node.inputs[0].const_value is None:
            return
        table = node.inputs[0].const_value.numpy()
        if tensor.tensor_type.name != "Q8_0" or table.ndim != 2 or table.shape[1] % _BLOCK:
            records[node.name] = {"gguf": tensor.name, "gguf_type": tensor.tensor_type.name, "left": "not a Q8_0 table"}
            return
        codes, scales, _, _ = _blocks("Q8_0", np.asarray(tensor.data), *table.shape)
        stored = LookupQuantized((codes.astype(np.int16) - 128).astype(np.int8), scales[..., None], _BLOCK)
        deviation = float(np.abs(stored.dequantize() - table).max())
        dequantize_after_lookup(graph, node, stored, namer, lambda base, array: add_initializer(graph, base, array, namer))
        records[node.name] = {"gguf": tensor.name, "gguf_type": "Q8_0", "onnx_form": "int8 rows in blocks of 32, looked up",
                              "max_abs_deviation": deviation, "relative_deviation": deviation / (float(np.abs(table).max()) or 1.0)}
