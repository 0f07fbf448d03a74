"""A GGUF file's quantized blocks carried over as they are: no second rounding.

A model exported from a ``.gguf`` file (``qcompile.io.causal_lm``) holds the float weights that
transformers dequantized from its blocks, and the file's path in its metadata. Rounding those
floats to a new 4-bit grid would round them twice; this pass writes the file's own blocks instead,
on the same grid:

- Q4_0 (w = d * (q - 8)) as ``MatMulNBits`` 4-bit, zero point 8 (its default);
- Q4_1 (w = d * q + m) as ``MatMulNBits`` 4-bit with float zero points -m / d;
- Q8_0 (w = d * q) as ``MatMulNBits`` 8-bit, zero point 128 (its default), and an embedding table
  stored so (Q4_0 and Q6_K tables too) as int8 rows in blocks with one scale each (``qparams.LookupQuantized``);
- the K-quants, super-blocks of 256 with a 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) scale per sub-block:
  Q4_K (w = d * sc * q - dmin * m, blocks of 32) as ``MatMulNBits`` 4-bit with float zero points;
  Q6_K (w = d * sc * (q - 32), blocks of 16) as ``MatMulNBits`` 8-bit, zero points 32; Q5_K (5-bit
  codes) as ``MatMulNBits`` 8-bit, zero points 0, minus the mins' share, computed from each input
  block's sum (ORT's CPU kernel has no float zero points at 8 bits).

llama.cpp stores LLaMA's q/k projections with their rows permuted for its rotary layout; the rows
are put back in transformers' order (the blocks run along the input channels, so each row's blocks
are untouched). Each tensor's dequantized grid is compared with the float weight of the export:
the report lists its GGUF type, its ONNX form and the largest deviation (float rounding only, about
1e-7 relative). Tensors of other types (Q5_0, Q2_K, Q3_K, the IQ types, F16, F32) stay float,
listed with their type, for a following ``quantize-weights`` to store.
"""

from __future__ import annotations

__all__ = ["GgufWeights", "GGUF_FILE_KEY"]

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.core.graph_edit import Namer, add_initializer
from qcompile.errors import ConfigError, ModelError
from qcompile.numerics.qparams import LookupQuantized
from qcompile.passes.qdq_insertion import dequantize_after_lookup
from qcompile.passes.registry import register_pass
from qcompile.passes.weight_only import pack_4bit

logger = logging.getLogger(__name__)

# The model metadata key under which causal_lm records the GGUF file a model was exported from.
GGUF_FILE_KEY = "qcompile.gguf_file"
_BLOCK = 32  # Q4_0, Q4_1 and Q8_0 blocks run over 32 input channels
_SUPER_BLOCK = 256  # a K-quant's super-block
CARRIED_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@dataclasses.dataclass
class _Grid:
    """A tensor's blocks as MatMulNBits reads them: w = (codes - zero_points) * scales - mins."""

    codes: np.ndarray  # uint8 [rows, blocks, block]
    scales: np.ndarray  # float32 [rows, blocks]
    bits: int
    zero_points: np.ndarray | None = None  # float32 or uint8 [rows, blocks]; None: MatMulNBits' default
    mins: np.ndarray | None = None  # float32 [rows, blocks], subtracted after the product (Q5_K)

    @property
    def block(self) -> int:
        return self.codes.shape[-1]

    def dequantize(self) -> np.ndarray:
        zp = np.float32(2 ** (self.bits - 1)) if self.zero_points is None else self.zero_points[..., None].astype(np.float32)
        w = (self.codes.astype(np.float32) - zp) * self.scales[..., None]
        if self.mins is not None:
            w = w - self.mins[..., None]
        return w.reshape(self.codes.shape[0], -1)

    def reorder(self, order: np.ndarray) -> None:
        for field in ("codes", "scales", "zero_points", "mins"):
            if getattr(self, field) is not None:
                setattr(self, field, getattr(self, field)[order])


def _f16(data: np.ndarray, start: int) -> np.ndarray:
    return data[..., start:start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _scale_minus_min(scales: np.ndarray, mins: np.ndarray, codes: np.ndarray, bits: int) -> _Grid:
    """w = scale * q - min as MatMulNBits' (q - zp) * scale with float zp = min / scale; a block whose
    scale is 0 holds -min alone: codes 0, scale -min, zp -1."""
    flat = scales == 0
    zero_points = np.where(flat, -1.0, mins / np.where(flat, 1.0, scales)).astype(np.float32)
    codes[flat] = 0
    return _Grid(codes, np.where(flat, -mins, scales).astype(np.float32), bits, zero_points)


def _k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the eight 6-bit scales and mins of a super-block, from its 12 bytes (llama.cpp's get_scale_min_k4)."""
    d, m, m_d = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _blocks(kind: str, raw: np.ndarray, rows: int, columns: int) -> _Grid:
    """A ``kind`` tensor's raw bytes [rows, ...] as a ``_Grid`` (``CARRIED_TYPES``; llama.cpp's layouts)."""
    if kind.endswith("_K"):
        supers = columns // _SUPER_BLOCK
        data = raw.reshape(rows, supers, -1)
        if kind == "Q6_K":
            ql = data[..., 0:128].reshape(rows, supers, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
            qh = data[..., 128:192].reshape(rows, supers, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
            codes = ((ql & 0x0F).reshape(rows, supers, 8, 32) | ((qh & 3).reshape(rows, supers, 8, 32) << 4)).astype(np.uint8)
            scales = _f16(data, 208)[..., None] * data[..., 192:208].copy().view(np.int8).astype(np.float32)
            return _Grid(codes.reshape(rows, -1, 16), scales.reshape(rows, -1), 8, np.full((rows, supers * 16), 32, np.uint8))
        sc, mn = _k4_scales_mins(data[..., 4:16])
        scales = (_f16(data, 0)[..., None] * sc).reshape(rows, -1)  # exact: an 11-bit times a 6-bit significand
        mins = (_f16(data, 2)[..., None] * mn).reshape(rows, -1)
        if kind == "Q4_K":
            qs = data[..., 16:144].reshape(rows, supers, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
            return _scale_minus_min(scales, mins, (qs & 0x0F).reshape(rows, -1, 32), 4)
        qh = data[..., 16:48].reshape(rows, supers, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
        ql = data[..., 48:176].reshape(rows, supers, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
        codes = ((ql & 0x0F).reshape(rows, supers, 8, 32) | ((qh & 1) << 4)).astype(np.uint8)
        return _Grid(codes.reshape(rows, -1, 32), scales, 8, np.zeros(scales.shape, np.uint8), mins)
    data = raw.reshape(rows, columns // _BLOCK, -1)
    d = _f16(data, 0)
    if kind == "Q8_0":
        q = data[..., 2:34].copy().view(np.int8)
        return _Grid((q.astype(np.int16) + 128).astype(np.uint8), d, 8)
    offset = 4 if kind == "Q4_1" else 2
    qs = data[..., offset:offset + 16]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j in the low nibble, j + 16 in the high
    if kind == "Q4_0":
        return _Grid(codes, d, 4)
    return _scale_minus_min(d, -_f16(data, 2), codes, 4)  # Q4_1: w = d * q + m


def _rows_in_transformers_order(rows: int, heads: int) -> np.ndarray:
    """For each row of transformers' q/k projection, its row in llama.cpp's permuted layout
    (transformers' reverse_permute applied to the row numbers)."""
    index = np.arange(rows).reshape(heads, rows // heads // 2, 2)
    return index.swapaxes(2, 1).reshape(rows)


@register_pass("gguf-weights")
class GgufWeights(ir.passes.InPlacePass):
    """Write a GGUF file's Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K blocks as they are (see the module docstring).

    Requires: a model exported from a ``.gguf`` file by qcompile (its path in the metadata) and the
    ``gguf`` package. Guarantees: every MatMul whose weight the file stores in one of those types
    reads it through ``MatMulNBits`` on the file's own grid, and a Q4_0/Q8_0/Q6_K embedding table is
    looked up from its blocks; ``records["gguf-weights"]`` lists each tensor with its type, form and deviation.
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
                self._matmul(graph, node, names, tensors, arch, heads, kv_heads, records, namer)
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

    def _matmul(self, graph, node, names, tensors, arch, heads, kv_heads, records, namer) -> None:
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
        columns = _SUPER_BLOCK if kind.endswith("_K") else _BLOCK
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        # Q5_K's block sums: a Reshape to [..., blocks, block] (the input's rank) and ReduceSum's axes input (opset 13).
        sums_unbuilt = kind == "Q5_K" and (rank is None or graph.opset_imports.get("", 13) < 13)
        if kind not in CARRIED_TYPES or k % columns or sums_unbuilt:
            left = f"not a {'/'.join(CARRIED_TYPES)} tensor" if kind not in CARRIED_TYPES else (
                f"its {k} input channels are not a whole number of {columns}-blocks" if k % columns
                else "its input's rank is unknown, or the model's opset is below 13")
            records[node.name] = {"gguf": tensor.name, "gguf_type": kind, "left": left}
            return
        grid = _blocks(kind, np.asarray(tensor.data), n, k)
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            grid.reorder(_rows_in_transformers_order(n, heads if tensor.name.endswith("attn_q.weight") else kv_heads))
        deviation = float(np.abs(grid.dequantize() - float_weight.T).max())
        codes = grid.codes
        packed = pack_4bit(codes.reshape(n, -1)).reshape(n, -1, grid.block // 2) if grid.bits == 4 else codes
        base = hf.removesuffix(".weight")
        inputs = [node.inputs[0], add_initializer(graph, f"{base}.{kind.lower()}", packed, namer),
                  add_initializer(graph, f"{base}.scales", grid.scales.reshape(-1), namer)]
        if grid.zero_points is not None:
            inputs.append(add_initializer(graph, f"{base}.zero_points", grid.zero_points.reshape(-1), namer))
        replacement = ir.node("MatMulNBits", inputs, domain="com.microsoft", name=f"{node.name}_{kind}",
                              attributes={"K": k, "N": n, "bits": grid.bits, "block_size": grid.block})
        nodes = [replacement]
        if grid.mins is not None:
            nodes += self._minus_mins(graph, node.inputs[0], rank, grid, base, replacement.outputs[0], node.name, namer)
        graph.insert_before(node, nodes)
        out, result = node.outputs[0], nodes[-1].outputs[0]
        for made in nodes:
            made.outputs[0].dtype = out.dtype
        result.shape, name = out.shape, out.name
        ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name, result.name = None, name
        if transposed is not None and not transposed.outputs[0].uses():
            graph.remove(transposed, safe=True)
        scale = float(np.abs(float_weight).max()) or 1.0
        form = f"MatMulNBits {grid.bits}-bit, block {grid.block}"
        if grid.zero_points is not None:
            form += ", float zero points" if grid.zero_points.dtype == np.float32 else f", zero points {int(grid.zero_points.flat[0])}"
        if grid.mins is not None:
            form += ", minus each block's mins times its input sum"
        records[node.name] = {"gguf": tensor.name, "gguf_type": kind, "onnx_form": form,
                              "max_abs_deviation": deviation, "relative_deviation": deviation / scale}

    @staticmethod
    def _minus_mins(graph, x: ir.Value, rank: int, grid: _Grid, base: str, product: ir.Value, name: str, namer) -> list[ir.Node]:
        """x @ W - sums @ mins^T, where sums[..., b] is the sum of x over block b: the mins' share of
        w = scale * q - min, for a grid whose zero points MatMulNBits cannot hold."""
        rows, blocks = grid.mins.shape
        shape = add_initializer(graph, f"{base}.block_shape", np.asarray([0] * (rank - 1) + [blocks, grid.block], np.int64), namer)
        axes = add_initializer(graph, f"{base}.block_axis", np.asarray([-1], np.int64), namer)
        mins = add_initializer(graph, f"{base}.mins", np.ascontiguousarray(grid.mins.T), namer)  # [blocks, N]
        split = ir.node("Reshape", [x, shape], name=f"{name}_blocks")
        sums = ir.node("ReduceSum", [split.outputs[0], axes], attributes={"keepdims": 0}, name=f"{name}_block_sums")
        share = ir.node("MatMul", [sums.outputs[0], mins], name=f"{name}_mins")
        return [split, sums, share, ir.node("Sub", [product, share.outputs[0]], name=f"{name}_minus_mins")]

    def _lookup(self, graph, node, tensor, namer, records) -> None:
        if tensor is None or node.inputs[0].const_value is None:
            return
        table, kind = node.inputs[0].const_value.numpy(), tensor.tensor_type.name
        # A symmetric grid with integer zero points is int8 codes times a scale per block, what the
        # lookup dequantizes after the Gather; a float zero point or a min is not.
        columns = _SUPER_BLOCK if kind.endswith("_K") else _BLOCK
        if kind not in ("Q4_0", "Q8_0", "Q6_K") or table.ndim != 2 or table.shape[1] % columns:
            records[node.name] = {"gguf": tensor.name, "gguf_type": kind, "left": "not a Q4_0/Q8_0/Q6_K table"}
            return
        grid = _blocks(kind, np.asarray(tensor.data), *table.shape)
        zero_points = np.int16(2 ** (grid.bits - 1)) if grid.zero_points is None else grid.zero_points[..., None].astype(np.int16)
        stored = LookupQuantized((grid.codes.astype(np.int16) - zero_points).astype(np.int8), grid.scales[..., None], grid.block)
        deviation = float(np.abs(stored.dequantize() - table).max())
        dequantize_after_lookup(graph, node, stored, namer, lambda base, array: add_initializer(graph, base, array, namer))
        records[node.name] = {"gguf": tensor.name, "gguf_type": kind, "onnx_form": f"int8 rows in blocks of {grid.block}, looked up",
                              "max_abs_deviation": deviation, "relative_deviation": deviation / (float(np.abs(table).max()) or 1.0)}
