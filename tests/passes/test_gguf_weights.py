"""GGUF blocks read as MatMulNBits grids: each type's layout against the gguf package's own
dequantization (random blocks: the package quantizes to Q4_0/Q4_1/Q8_0 only)."""

import numpy as np
import pytest

from qcompile.passes.gguf_weights import CARRIED_TYPES, _blocks

gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install -e '.[llm]'")


def _random_tensor(kind: str, rows: int, columns: int, rng) -> np.ndarray:
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if not kind.endswith("_K"):
        return gguf.quants.quantize(rng.normal(0, 0.05, (rows, columns)).astype(np.float32), qtype)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, columns // 256, size), dtype=np.uint8)
    for offset in ((0, 2) if kind in ("Q4_K", "Q5_K") else (208,)):
        raw[..., offset:offset + 2] = rng.uniform(1e-4, 4e-4, (rows, columns // 256, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", CARRIED_TYPES)
def test_each_type_reads_as_the_grid_gguf_dequantizes(kind):
    rng = np.random.default_rng(0)
    raw = _random_tensor(kind, 6, 512, rng)
    if kind in ("Q4_1", "Q4_K"):  # a block whose scale is 0: the min alone
        raw[0, :2] = 0
    expected = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind))
    grid = _blocks(kind, raw, 6, 512)
    assert grid.codes.max() < 2 ** grid.bits and grid.block == (16 if kind == "Q6_K" else 32)
    got = grid.dequantize()
    if kind in ("Q4_1", "Q4_K"):  # (q - min / scale) * scale: float rounding of the zero point
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        assert np.all(got[0, :32] == expected[0, :32])  # the scale-0 block: exactly its min
    else:
        np.testing.assert_array_equal(got, expected)
