"""quantize-weights: packed INT4 round-trips through ONNX Runtime's kernels, GPTQ beats RTN on a
layer's output error, and a tied lm_head is quantized too."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import qcompile.passes.weight_only  # noqa: F401  (registers the pass)
from conftest import run_passes
from onnx import TensorProto, helper
from qcompile.passes.weight_only import pack_4bit, quantize_gptq
from qcompile.numerics.qparams import quantize_blocks as quantize_rtn
from tiny_models import VOCAB, _init, make_model, tiny_lm

from qcompile.errors import ConfigError


def _ids(count=4, seed=1):
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, VOCAB, (2, 16)).astype(np.int64)} for _ in range(count)]


def _run(model, feed):
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _single_matmul(k=64, n=32):
    w = np.random.default_rng(0).normal(0, 0.1, (k, n)).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [_init("w", w)], opset=21,
    )
    return proto, w


def test_pack_4bit_puts_even_elements_in_the_low_nibble():
    codes = np.array([[1, 2, 3, 4, 15]], dtype=np.uint8)
    np.testing.assert_array_equal(pack_4bit(codes), [[0x21, 0x43, 0x0F]])


@pytest.mark.parametrize("form", ["matmulnbits", "dq"])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_onnx_runtime_computes_x_times_the_dequantized_weight(form, bits, symmetric):
    proto, w = _single_matmul()
    model, context = run_passes(
        proto, [f"quantize-weights(bits={bits}, block=32, symmetric={symmetric}, form={form})", "remove-unused"]
    )
    assert not any(n.op_type == "MatMul" and n.inputs[1].name == "w" for n in model.graph)
    dequantized = quantize_rtn(w.T, bits, 32, symmetric).dequantize().T
    # x = I reads the weight the kernel uses row by row: exact (a packing slip would be off by levels).
    np.testing.assert_allclose(_run(model, {"x": np.eye(64, dtype=np.float32)}), dequantized, rtol=0, atol=1e-6)
    # ORT's 4-bit CPU kernel may quantize activations to int8 on the fly: close, not exact.
    x = np.random.default_rng(3).normal(0, 1, (5, 64)).astype(np.float32)
    expected = x @ dequantized
    assert np.abs(_run(model, {"x": x}) - expected).max() <= 0.02 * np.abs(expected).max()
    # ~bits/32 of the float weight's bytes, plus one scale per 32 weights.
    stored = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert stored <= w.nbytes * (bits / 32 + 1 / 32 + 1 / 64)
    assert context.records["quantize-weights"]["weights"]["mm"]["bits"] == bits


def test_gptq_lowers_the_layer_output_error_below_rtn_on_held_out_inputs():
    rng = np.random.default_rng(0)
    k, n = 128, 64
    mixing = rng.normal(0, 1, (k, k)) * np.linspace(2.0, 0.1, k)  # correlated, unequal channels
    calibration, held_out = rng.normal(0, 1, (2048, k)) @ mixing, rng.normal(0, 1, (512, k)) @ mixing
    w_t = rng.normal(0, 0.1, (n, k)).astype(np.float32)
    hessian = calibration.T @ calibration
    rtn = quantize_rtn(w_t, 4, 32, True).dequantize()
    gptq = quantize_gptq(w_t, hessian, 4, 32, True).dequantize()
    reference = held_out @ w_t.T
    rtn_error = np.linalg.norm(reference - held_out @ rtn.T)
    gptq_error = np.linalg.norm(reference - held_out @ gptq.T)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_gptq_keeps_the_block_layout_and_code_range():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (256, 64))
    q = quantize_gptq(rng.normal(0, 0.1, (16, 64)).astype(np.float32), x.T @ x, 4, 32, False)
    assert q.codes.max() <= 15 and q.scales.shape == (16, 2) and q.zero_points.shape == (16, 2)


def test_every_matmul_including_the_tied_lm_head_is_quantized_with_gptq():
    model, context = run_passes(tiny_lm(), ["quantize-weights(bits=4, block=16, method=gptq)", "remove-unused"], data=_ids())
    records = context.records["quantize-weights"]
    assert set(records["weights"]) == {"up", "down", "lm_head"} and records["left_float"] == {}
    assert records["weights"]["lm_head"]["weight"] == "embedding (transposed)"
    assert all(r["method"] == "gptq" for r in records["weights"].values())
    assert [n.op_type for n in model.graph].count("MatMulNBits") == 3
    feed = _ids(1, seed=9)[0]
    reference, quantized = _run(tiny_lm(), feed), _run(model, feed)
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.99


def test_gptq_without_rereadable_data_is_a_clear_error():
    from qcompile.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="method=rtn"):
        run_passes(tiny_lm(), ["quantize-weights(method=gptq)"], data=iter(_ids()))


@pytest.mark.parametrize("options", ["bits=3", "block=48", "method=awq", "block=0, form=matmulnbits"])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        run_passes(tiny_lm(), [f"quantize-weights({options})"])


def test_the_head_can_keep_more_bits_and_the_embedding_is_int8_per_row():
    model, context = run_passes(tiny_lm(), ["quantize-weights(bits=4, block=16, head_bits=8)", "remove-unused"])
    records = context.records["quantize-weights"]
    assert records["weights"]["lm_head"]["bits"] == 8 and records["weights"]["lm_head"]["head"]
    assert records["weights"]["up"]["bits"] == 4
    assert records["tables"]["embed"]["bits"] == 8
    assert "embedding" not in model.graph.initializers  # neither the table nor the tied head keeps a float copy
    table_dtypes = {n.inputs[0].const_value.dtype for n in model.graph if n.op_type == "Gather"}
    assert ir.DataType.INT8 in table_dtypes and ir.DataType.FLOAT in table_dtypes  # int8 rows, float row scales
    assert "DequantizeLinear" not in [n.op_type for n in model.graph]  # rows dequantized after the lookup
    feed = _ids(1, seed=9)[0]
    reference, quantized = _run(tiny_lm(), feed), _run(model, feed)
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.99


def test_a_matmul_of_two_activations_is_not_reported_as_a_weight_left_float():
    proto = make_model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="scores")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 8]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [], opset=21,
    )
    _, context = run_passes(proto, ["quantize-weights"])
    assert context.records["quantize-weights"]["left_float"] == {}
    small = make_model(  # a weight too small to quantize (8 input channels) is reported
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="tiny")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [_init("w", np.ones((8, 4), np.float32))], opset=21,
    )
    _, context = run_passes(small, ["quantize-weights"])
    assert set(context.records["quantize-weights"]["left_float"]) == {"tiny"}


@pytest.mark.parametrize("kind, quant_type", [("nf4", 1), ("fp4", 0)])
@pytest.mark.parametrize("k, n, block", [(64, 8, 64), (33, 3, 16), (96, 5, 32)])
def test_nf4_and_fp4_codes_are_onnx_runtime_s_own(kind, quant_type, k, n, block):
    """quantize_bnb4 packs exactly what ONNX Runtime's quantize_matmul_bnb4 (the MatMulBnb4
    quantizer's kernel) packs: absmax per block of the transposed weight, nearest code, -0.0 as FP4's
    sign code, a 0.0 in the last nibble of an odd count."""
    from onnxruntime.capi._pybind_state import quantize_matmul_bnb4

    from qcompile.numerics.qparams import quantize_bnb4

    w = np.random.default_rng(k + n).normal(0, 0.05, (k, n)).astype(np.float32)
    packed, absmax = np.zeros((k * n + 1) // 2, np.uint8), np.zeros(-(-k * n // block), np.float32)
    quantize_matmul_bnb4(packed, np.ascontiguousarray(w.T), absmax, block, quant_type, k, n)
    ours = quantize_bnb4(np.ascontiguousarray(w.T), kind, block)
    np.testing.assert_array_equal(ours.packed, packed)
    np.testing.assert_array_equal(ours.absmax, absmax)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_nf4_and_fp4_weights_run_as_matmulbnb4(kind):
    """quantize-weights(format=nf4|fp4): every MatMul becomes com.microsoft.MatMulBnb4 with the
    packing its kernel reads: its output is x @ the dequantized weight."""
    from qcompile.numerics.qparams import quantize_bnb4

    proto, w = _single_matmul(k=64, n=32)
    model, context = run_passes(proto, [f"quantize-weights(format={kind}, block=64)"])
    (node,) = list(model.graph)
    assert (node.domain, node.op_type, node.attributes["quant_type"].value) == ("com.microsoft", "MatMulBnb4", {"fp4": 0, "nf4": 1}[kind])
    x = np.random.default_rng(3).normal(0, 1, (4, 64)).astype(np.float32)
    expected = x @ quantize_bnb4(np.ascontiguousarray(w.T), kind, 64).dequantize().T
    np.testing.assert_allclose(_run(model, {"x": x}), expected, rtol=1e-5, atol=1e-5)
    record = context.records["quantize-weights"]["weights"]["mm"]
    assert record["format"] == kind and 0 < record["relative_weight_error"] < 0.15


def test_nf4_on_a_language_model_keeps_an_8_bit_head():
    model, context = run_passes(tiny_lm(), ["quantize-weights(format=nf4, block=16, head_bits=8)", "remove-unused"])
    ops = sorted(n.op_type for n in model.graph if n.op_type.startswith("MatMul"))
    assert "MatMulBnb4" in ops and ops.count("MatMulNBits") == 1 and "MatMul" not in ops
    feed = _ids(1, seed=9)[0]
    assert np.corrcoef(_run(tiny_lm(), feed).ravel(), _run(model, feed).ravel())[0, 1] > 0.99


@pytest.mark.parametrize("options", ["format=nf4, bits=8", "format=fp4, method=gptq", "format=nf4, block=0, form=dq", "format=int3"])
def test_bad_code_book_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        run_passes(tiny_lm(), [f"quantize-weights({options})"])
