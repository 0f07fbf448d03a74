"""Quantization parameters: integer and FP8 formats, and scales and zero points from ranges.

Every scale and zero point qcompile writes is computed here, so the formulas live in one place:
activations' (from a calibrated range), stored constants' (per tensor or channel), the int32
bias grid, weight scales raised so that a bias fits it, and INT4/INT8 weight blocks.
FP8 formats (``float8e4m3fn``, ``float8e5m2``) round to ml_dtypes' float8 types, which match ONNX
Runtime's QuantizeLinear/DequantizeLinear bit for bit (tests/test_fp8.py checks it).
"""

from __future__ import annotations

__all__ = [
    "QuantType",
    "QUANT_TYPES",
    "quant_type",
    "activation_qparams",
    "weight_qparams",
    "constant_qparams",
    "bias_safe_weight_scale",
    "raise_to_floor",
    "bias_qparams",
    "BlockQuantized",
    "block_qparams",
    "round_to_blocks",
    "quantize_blocks",
    "BNB4_TABLES",
    "BNB4_QUANT_TYPE",
    "Bnb4Quantized",
    "quantize_bnb4",
    "LOOKUP_BLOCK",
    "LookupQuantized",
    "lookup_qparams",
    "round_up_significand",
    "power_of_two_multiple",
    "activation_zero_point",
    "quantize",
    "dequantize",
]

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompile.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class QuantType:
    """A quantized format: its name, ONNX element type and representable range.

    For FP8 formats (``is_float``) qmin/qmax are the largest finite magnitudes (E4M3FN: 448,
    E5M2: 57344) and the grid between them is not uniform: the spacing grows with the magnitude
    (3 mantissa bits for E4M3FN, 2 for E5M2), so "levels" and "steps" do not apply to them.
    """

    name: str
    ir_dtype: ir.DataType
    numpy_dtype: type
    qmin: int
    qmax: int
    min_opset: int
    is_float: bool = False

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def top_half_step(self) -> float:
        """Half the grid spacing at qmax: values past qmax + this (in grid units) saturate.
        0.5 on an integer grid; FP8's spacing at its largest binade is eps * 2**floor(log2(qmax))
        (E4M3FN: 32, so 464 is the first value that rounds to 448 only by saturating)."""
        if not self.is_float:
            return 0.5
        return float(ml_dtypes.finfo(self.numpy_dtype).eps) * 2.0 ** np.floor(np.log2(self.qmax)) / 2


QUANT_TYPES = {
    t.name: t
    for t in (
        QuantType("uint8", ir.DataType.UINT8, np.uint8, 0, 255, 13),
        QuantType("int8", ir.DataType.INT8, np.int8, -128, 127, 13),
        # int8 storage with codes in [-64, 63] (ONNX Runtime's "reduce_range"): the CPU target's
        # weights. On an x86-64 CPU without VNNI (AVX2 only), ORT's u8s8 kernels sum pairs of
        # uint8 x int8 products in int16 (vpmaddubsw), which saturates past 32767: with full-range
        # int8 weights a 6-conv CNN came out at 27.1 dB instead of 31.7 dB, at the same speed.
        QuantType("int7", ir.DataType.INT8, np.int8, -64, 63, 13),
        QuantType("uint16", ir.DataType.UINT16, np.uint16, 0, 65535, 21),
        QuantType("int16", ir.DataType.INT16, np.int16, -32768, 32767, 21),
        QuantType("int32", ir.DataType.INT32, np.int32, -(2**31), 2**31 - 1, 13),
        # QuantizeLinear/DequantizeLinear take float8 from opset 19 on; qcompile needs 21, whose
        # QuantizeLinear names its output type (output_dtype) without a zero point (see insert-qdq).
        QuantType("float8e4m3fn", ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, -448, 448, 21, is_float=True),
        QuantType("float8e5m2", ir.DataType.FLOAT8E5M2, ml_dtypes.float8_e5m2, -57344, 57344, 21, is_float=True),
    )
}
_FLOAT8_DTYPES = {np.dtype(t.numpy_dtype) for t in QUANT_TYPES.values() if t.is_float}


def full_range(qtype: QuantType) -> QuantType:
    """The type with ``qtype``'s storage and all of its range (int7 -> int8; others: themselves)."""
    return max((t for t in QUANT_TYPES.values() if t.ir_dtype == qtype.ir_dtype and t.is_float == qtype.is_float),
               key=lambda t: t.qmax - t.qmin)


def quant_type(name: str) -> QuantType:
    try:
        return QUANT_TYPES[name]
    except KeyError:
        raise ConfigError(
            f"Unknown quantization type {name!r}. Use one of: {', '.join(QUANT_TYPES)}."
        ) from None


# The smallest scale we emit: a tensor that is constant zero still needs a positive scale.
_MIN_SCALE = np.float32(1e-12)


def activation_qparams(
    rmin: float, rmax: float, qtype: QuantType, symmetric: bool
) -> tuple[np.float32, int]:
    """Per-tensor scale and zero point that map [rmin, rmax] onto qtype.

    The range is first widened to contain 0, so that 0.0 (padding, ReLU) is exact.
    Asymmetric:  scale = (rmax - rmin) / (qmax - qmin),  zp = round(qmin - rmin / scale).
    Symmetric:   scale = max(|rmin|, |rmax|) / ((qmax - qmin) / 2),  zp = 0 for signed types and
                 the middle of the range ((qmin + qmax + 1) / 2, e.g. 128) for unsigned ones.
    FP8:         always symmetric (ONNX's float8 zero point must be 0): scale = max(|rmin|, |rmax|)
                 / qmax (448 for E4M3FN, 57344 for E5M2), so the range's end is the largest finite
                 FP8 value; ``symmetric`` is ignored.
    """
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    span = qtype.qmax - qtype.qmin
    if symmetric or qtype.is_float:
        amax = max(abs(rmin), abs(rmax))
        scale = np.float32(max(amax / (span / 2), _MIN_SCALE))
        zero_point = 0 if qtype.signed else (qtype.qmin + qtype.qmax + 1) // 2
        return scale, zero_point
    scale = np.float32(max((rmax - rmin) / span, _MIN_SCALE))
    return scale, activation_zero_point(rmin, scale, qtype, symmetric)


def activation_zero_point(rmin: float, scale: np.float32, qtype: QuantType, symmetric: bool) -> int:
    """The zero point ``activation_qparams`` gives a range starting at ``rmin`` (widened to 0) on
    grid ``scale``: round(qmin - rmin / scale), clipped to the type; for symmetric and FP8
    formats the fixed one (0, or the middle of an unsigned type)."""
    if symmetric or qtype.is_float:
        return 0 if qtype.signed else (qtype.qmin + qtype.qmax + 1) // 2
    rmin = min(float(rmin), 0.0)
    return int(np.clip(round(qtype.qmin - rmin / float(scale)), qtype.qmin, qtype.qmax))


def round_up_significand(x: np.ndarray, bits: int) -> np.ndarray:
    """The smallest float32 values >= ``x`` (positive) with at most ``bits`` significant bits
    (11: what fp16 keeps, without fp16's exponent range): x = m * 2**e with m in [0.5, 1),
    m' = ceil(m * 2**bits) / 2**bits. Rounding up keeps max|w| / scale <= qmax for a weight scale."""
    mantissa, exponent = np.frexp(np.asarray(x, dtype=np.float64))
    return np.ldexp(np.ceil(mantissa * 2.0**bits) / 2.0**bits, exponent).astype(np.float32)


def power_of_two_multiple(scale: float, base: float) -> np.float32:
    """The smallest ``base * 2**k`` (k an integer, maybe negative) that is >= ``scale``: an output
    scale whose ratio to the input scale ``base`` is a power of two, at most twice ``scale``."""
    base = np.float32(base)
    k = int(np.ceil(np.log2(float(scale) / float(base))))
    # log2 rounds: settle k on the exact float32 products (a power of two times base is exact).
    while np.float32(np.ldexp(base, k)) < np.float32(scale):
        k += 1
    while np.float32(np.ldexp(base, k - 1)) >= np.float32(scale):
        k -= 1
    return np.float32(np.ldexp(base, k))


def weight_qparams(
    weight: np.ndarray, axis: int | None, qtype: QuantType
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scales (one per channel along ``axis``, or one if None) with zero points 0.

    scale = max|w| / qmax over the channel, so the grid is [-qmax, qmax]: the restricted range
    keeps -128 unused, which avoids the asymmetric extra code that some integer kernels mishandle.
    For FP8 the same formula maps max|w| onto the largest finite value (448 for E4M3FN).
    """
    w = np.asarray(weight, dtype=np.float32)
    if axis is None:
        amax = np.abs(w).max(initial=0.0).reshape(1)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        amax = np.abs(w).max(axis=reduce_axes, initial=0.0)
    scale = np.maximum(amax / qtype.qmax, _MIN_SCALE).astype(np.float32)
    zero_point = np.zeros(scale.shape, dtype=qtype.numpy_dtype)
    return scale, zero_point


def constant_qparams(
    weight: np.ndarray, axis: int | None, qtype: QuantType, symmetric: bool, significand_bits: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points of a stored constant: ``weight_qparams`` when symmetric; otherwise
    one asymmetric scale over the whole tensor, with the activation formula (``activation_qparams``
    on [min(w), max(w)]), for constants that meet activations (an Add's bias, a LayerNorm scale
    stored as uint8, a lookup table whose output keeps the table's parameters).
    ``significand_bits``: symmetric scales rounded up to that many significant bits
    (``round_up_significand``), for a provider that rounds its requantization multiplier so."""
    if symmetric or qtype.is_float:  # FP8 zero points are 0: FP8 constants are symmetric
        scale, zero_point = weight_qparams(weight, axis, qtype)
        if significand_bits is not None:
            scale = round_up_significand(scale, significand_bits)
        return scale, zero_point
    if axis is not None:
        raise ConfigError("Asymmetric constants are quantized per tensor; a per-channel axis was given.")
    w = np.asarray(weight, dtype=np.float32)
    scale, zero_point = activation_qparams(float(w.min(initial=0.0)), float(w.max(initial=0.0)), qtype, False)
    return np.asarray([scale], dtype=np.float32), np.asarray([zero_point], dtype=qtype.numpy_dtype)


def bias_safe_weight_scale(bias: np.ndarray, input_scale: float, channels: int | None) -> np.ndarray:
    """The smallest weight scale (one per output channel, or one when ``channels`` is None) at which
    ``bias`` fits the int32 grid ``input_scale * weight_scale``.

    Integer kernels add the bias to the int32 accumulator, so a bias is stored on that grid; a
    channel whose weights are near zero (a pruned or dead channel) gets a tiny weight scale, and its
    bias would overflow int32 and be clipped to nothing. Raising that channel's weight scale instead
    (ONNX Runtime's quantizer does the same) keeps the bias exact at the cost of a coarser grid for
    weights that hardly matter. Leaves a margin of 2x below int32's limit.
    """
    limit = np.float64(QUANT_TYPES["int32"].qmax) / 2.0
    need = np.abs(np.asarray(bias, dtype=np.float64)).reshape(-1) / (np.float64(input_scale) * limit)
    if channels is None or need.size != channels:
        need = need.max(initial=0.0).reshape(1)
    return need.astype(np.float32)


def raise_to_floor(scale: np.ndarray, floor: np.ndarray, significand_bits: int | None = None) -> tuple[np.ndarray, int]:
    """``scale`` raised to at least ``floor`` per channel (``bias_safe_weight_scale``), rounded up
    to ``significand_bits`` again when given; and how many channels were raised (0: ``scale`` as is)."""
    raised = int(np.count_nonzero(floor > scale))
    if not raised:
        return scale, 0
    scale = np.maximum(scale, floor).astype(np.float32)
    if significand_bits is not None:
        scale = round_up_significand(scale, significand_bits)
    return scale, raised


def bias_qparams(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A bias on the int32 grid of the products it is added to: (int32 codes, float32 scales of
    ``weight_scale``'s shape), zero point 0.

    Integer kernels add the bias to the int32 accumulator of x_q * w_q, whose scale is
    x_scale * w_scale, so the bias must be stored on exactly that grid (computed in float64, then
    stored as float32, as ONNX Runtime's quantizer does). A bias beyond int32 saturates: the caller
    raises the weight's scale first (``bias_safe_weight_scale``) so that it fits.
    """
    scale = (np.float64(input_scale) * np.asarray(weight_scale).astype(np.float64)).astype(np.float32)
    int32 = QUANT_TYPES["int32"]
    codes = np.clip(np.rint(np.asarray(bias, dtype=np.float64) / scale.astype(np.float64)), int32.qmin, int32.qmax)
    return codes.astype(np.int32), scale


@dataclasses.dataclass
class BlockQuantized:
    """Unsigned codes with per-block scales and zero points: w[n, k] ~ (codes[n, k] - zp[n, b]) * scale[n, b],
    b = k // block, for a weight stored transposed as [N output channels, K input channels]."""

    codes: np.ndarray  # uint8 [N, K], values in [0, 2**bits)
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray  # uint8 [N, blocks]
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        """The float weight [N, K] these codes stand for."""
        expand = np.repeat(np.arange(self.scales.shape[1]), self.block)[: self.codes.shape[1]]
        return ((self.codes.astype(np.float32) - self.zero_points[:, expand]) * self.scales[:, expand]).astype(np.float32)


def block_qparams(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of ``w`` [rows, block] (the block's weights of one output channel).

    Symmetric: zp = 2**(bits-1) and scale = e / -2**(bits-1), e the block's value of largest
    magnitude with its sign, so that e lands exactly on the extra negative level (-8 for 4 bits)
    and all 2**bits levels are used; the scale is negative when e is positive. This is ONNX
    Runtime's convention for MatMulNBits, and measured on SmolLM2 (INT4, blocks of 128, 8 windows)
    it gives perplexity 20.5 where max|w| / 7 over 15 levels gave 25.6.
    Asymmetric: scale = (max - min) / (2**bits - 1) over [min(w, 0), max(w, 0)], zp = round(-min / scale).
    """
    levels = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        high, low = w.max(axis=1), w.min(axis=1)
        extreme = np.where(np.abs(high) > np.abs(low), high, low)
        scale = extreme / -half
        zero_point = np.full(w.shape[0], half, dtype=np.float32)
    else:
        low, high = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
        scale = (high - low) / levels
        zero_point = np.clip(np.round(-low / np.where(scale > 0, scale, 1.0)), 0, levels)
    scale = np.where(scale != 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale is exact
    return scale, zero_point.astype(np.float32)


def round_to_blocks(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int) -> np.ndarray:
    """``w``'s unsigned codes on a block grid (float, in [0, 2**bits - 1]); GPTQ rounds a column at a time with it."""
    return np.clip(np.round(w / scale + zero_point), 0, 2**bits - 1)


def quantize_blocks(w_t: np.ndarray, bits: int, block: int, symmetric: bool) -> BlockQuantized:
    """Round to nearest, block by block. ``w_t`` is [N, K] (output channels x input channels)."""
    n, k = w_t.shape
    codes = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, (k + block - 1) // block), dtype=np.float32)
    zeros = np.zeros_like(scales)
    for b in range(scales.shape[1]):
        part = w_t[:, b * block : (b + 1) * block].astype(np.float32)
        scales[:, b], zeros[:, b] = block_qparams(part, bits, symmetric)
        codes[:, b * block : (b + 1) * block] = round_to_blocks(part, scales[:, b : b + 1], zeros[:, b : b + 1], bits)
    return BlockQuantized(codes, scales, zeros.astype(np.uint8), bits, block)


# The 16 values a 4-bit code stands for, times its block's absmax (bitsandbytes' formats, which ONNX
# Runtime's com.microsoft.MatMulBnb4 reads; read back from its kernel code by code): QLoRA's
# NormalFloat4 (quantiles of a normal distribution, exact 0 and +-1) and bitsandbytes' FP4.
BNB4_TABLES = {
    "nf4": np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                     0.7229568362236023, 1.0], dtype=np.float32),
    "fp4": np.array([0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25,
                     -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25], dtype=np.float32),
}
# MatMulBnb4's quant_type attribute.
BNB4_QUANT_TYPE = {"fp4": 0, "nf4": 1}


@dataclasses.dataclass(frozen=True)
class Bnb4Quantized:
    """A weight [N, K] (output x input channels) as MatMulBnb4 stores it: 4-bit codes into
    ``BNB4_TABLES[kind]`` over the row-major flattening, two a byte (the even element in the high
    nibble), and one absmax per ``block`` consecutive elements."""

    packed: np.ndarray  # uint8 [ceil(N * K / 2)]
    absmax: np.ndarray  # float32 [ceil(N * K / block)]
    kind: str
    block: int
    shape: tuple[int, int]

    def dequantize(self) -> np.ndarray:
        """The float weight [N, K] these codes stand for."""
        n, k = self.shape
        codes = np.stack([self.packed >> 4, self.packed & 0xF], axis=1).reshape(-1)[: n * k]
        scale = np.repeat(self.absmax, self.block)[: n * k]
        return (BNB4_TABLES[self.kind][codes] * scale).reshape(n, k).astype(np.float32)


def _nearest(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest value of ``table`` to each of ``x`` (a value on a midpoint rounds up)."""
    order = np.argsort(table, kind="stable")
    values = table[order]
    return order[np.searchsorted((values[1:] + values[:-1]) / 2, x, side="right")]


def quantize_bnb4(w_t: np.ndarray, kind: str, block: int) -> Bnb4Quantized:
    """Round ``w_t`` [N, K] to the nearest of the 16 values of ``kind`` times its block's absmax
    (``Bnb4Quantized``); matches ONNX Runtime's own quantize_matmul_bnb4 code for code."""
    n, k = w_t.shape
    flat = np.asarray(w_t, dtype=np.float32).reshape(-1)
    blocks = -(-flat.size // block)
    padded = np.zeros(blocks * block, np.float32)
    padded[: flat.size] = flat
    absmax = np.abs(padded.reshape(blocks, block)).max(axis=1)
    scaled = padded.reshape(blocks, block) / np.where(absmax > 0, absmax, 1.0)[:, None]
    scaled = scaled.reshape(-1)[: flat.size + flat.size % 2]  # an odd count packs a 0.0 in the last low nibble
    if kind == "fp4":  # sign and magnitude: code bit 3 is the sign (so -0.0 is code 8, as ORT stores it)
        codes = _nearest(BNB4_TABLES["fp4"][:8], np.abs(scaled)) | np.where(scaled < 0, 8, 0)
    else:
        codes = _nearest(BNB4_TABLES[kind], scaled)
    codes = codes.astype(np.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return Bnb4Quantized(packed.astype(np.uint8), absmax.astype(np.float32), kind, block, (n, k))


# Columns per scale of a stored lookup table (an embedding). Measured on all-MiniLM-L6-v2's
# 30522 x 384 word embedding, only that table quantized, on benchmarks/real_models.py's held-out
# sentences: the encoder's output SQNR is 39.0 dB with one scale per row (3 of 128 sentences'
# nearest neighbours change), 40.4 with blocks of 128, 43.4 of 64, 45.1 of 32 (none change), for
# 1.5 MB of scales next to 11.7 MB of codes.
LOOKUP_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class LookupQuantized:
    """A lookup table (an embedding, read by Gather along axis 0) as int8 codes with symmetric
    scales, dequantized after the lookup: a 2-D table [rows, cols] with ``cols`` a multiple of the
    block gets one scale per block of ``block`` consecutive columns of a row (codes
    [rows, cols // block, block], scales [rows, cols // block, 1]); any other table one scale per
    row (codes of the table's shape, scales [rows, 1, ...])."""

    codes: np.ndarray
    scales: np.ndarray
    block: int | None  # None: one scale per row

    def dequantize(self) -> np.ndarray:
        """The float table these codes stand for, in the table's shape."""
        values = self.codes.astype(np.float32) * self.scales
        return values.reshape(values.shape[0], -1) if self.block is not None else values


def lookup_qparams(table: np.ndarray, qtype: QuantType, block: int = LOOKUP_BLOCK) -> LookupQuantized:
    """``table`` stored for lookups along axis 0 (see ``LookupQuantized``): blocks of ``block``
    columns where a row holds at least two of them, else one scale per row."""
    table = np.asarray(table, dtype=np.float32)
    blocked = table.ndim == 2 and table.shape[1] % block == 0 and table.shape[1] >= 2 * block
    grouped = table.reshape(table.shape[0], -1, block) if blocked else table
    axes = (grouped.ndim - 1,) if blocked else tuple(range(1, table.ndim))
    amax = np.abs(grouped).max(axis=axes, keepdims=True, initial=0.0)
    scales = np.maximum(amax / qtype.qmax, _MIN_SCALE).astype(np.float32)
    codes = np.clip(np.rint(grouped / scales), -qtype.qmax, qtype.qmax).astype(qtype.numpy_dtype)
    return LookupQuantized(codes, scales, block if blocked else None)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if axis is None or param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qtype: QuantType, axis: int | None = None
) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_to_even(x / scale) + zero_point).

    FP8: x / scale rounded to the nearest FP8 value (ties to even) by ml_dtypes, after clipping to
    [-qmax, qmax]: ONNX's saturate=1 (the default), under which +-inf also becomes +-qmax.
    """
    s = _broadcast(scale, x.ndim, axis).astype(np.float32)
    if qtype.is_float:
        z = _broadcast(zero_point, x.ndim, axis).astype(np.float32)
        scaled = np.asarray(x, dtype=np.float32) / s
        if z.any():  # ORT keeps -0.0 as -0.0: adding a zero zero point would turn it into +0.0
            scaled = scaled + z
        return np.clip(scaled, qtype.qmin, qtype.qmax).astype(qtype.numpy_dtype)
    z = _broadcast(zero_point, x.ndim, axis).astype(np.int64)
    q = np.rint(np.asarray(x, dtype=np.float32) / s).astype(np.int64) + z
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.numpy_dtype)


def dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None
) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale (in float32 for FP8 codes)."""
    s = _broadcast(scale, q.ndim, axis).astype(np.float32)
    if q.dtype in _FLOAT8_DTYPES:
        z = _broadcast(zero_point, q.ndim, axis).astype(np.float32)
        return ((q.astype(np.float32) - z) * s).astype(np.float32)
    z = _broadcast(zero_point, q.ndim, axis).astype(np.int64)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)
