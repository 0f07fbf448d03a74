"""FP8 QDQ (float8e4m3fn, float8e5m2): numpy rounding against ORT's, scales, config rules, and tiny
models compiled end to end and run on ONNX Runtime's CPU provider."""

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import cnn_batches, tiny_cnn, tiny_lm, tiny_transformer, transformer_batches

import qcompile
from qcompile.core.config import CompileConfig
from qcompile.errors import ConfigError
from qcompile.numerics.qparams import QUANT_TYPES, activation_qparams, dequantize, quantize, weight_qparams
from qcompile.io.runtime import qdq_safe_config
from qcompile.numerics.statistics import TensorStatistics

E4M3, E5M2 = QUANT_TYPES["float8e4m3fn"], QUANT_TYPES["float8e5m2"]
FP8 = {"activation_type": "float8e4m3fn", "weight_type": "float8e4m3fn"}


def _sqnr(reference: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - approx) ** 2.0)))


def _ort_qdq(x: np.ndarray, scale: np.ndarray, qtype, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """ORT's QuantizeLinear -> DequantizeLinear; the FP8 codes come back through Cast (exact), since
    ORT's Python binding cannot return every float8 type."""
    attributes = {} if axis is None else {"axis": axis}
    zero = np.zeros(scale.shape, qtype.numpy_dtype)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attributes),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attributes),
         helper.make_node("Cast", ["q"], ["codes"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("codes", TensorProto.FLOAT, list(x.shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    codes, y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    return codes, y


@pytest.mark.parametrize("qtype", [E4M3, E5M2], ids=lambda t: t.name)
@pytest.mark.parametrize("axis", [None, 1])
def test_numpy_fp8_matches_onnxruntime_bit_for_bit(qtype, axis):
    """Random data over many binades, ties, saturation past the largest value and +-inf."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 4, 512)) * np.exp2(rng.integers(-12, 8, (6, 4, 512)))).astype(np.float32)
    x.reshape(-1)[:6] = [np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0]
    scale = (np.float32([0.37]) if axis is None else np.float32([0.37, 1.0, 1e-3, 25.0])).astype(np.float32)
    if axis is None:
        scale = scale.reshape(())
    zero = np.zeros(scale.shape, qtype.numpy_dtype)
    q = quantize(x, scale, zero, qtype, axis)
    assert q.dtype == qtype.numpy_dtype
    codes, y = _ort_qdq(x, scale, qtype, axis)
    # float8 -> float32 is exact and one to one, so equal float32 bits are equal float8 codes.
    np.testing.assert_array_equal(q.astype(np.float32).view(np.uint32), codes.view(np.uint32))
    np.testing.assert_array_equal(dequantize(q, scale, zero, axis).view(np.uint32), y.view(np.uint32))
    assert np.abs(q.astype(np.float32)).max() == qtype.qmax  # saturated, not NaN


def test_fp8_scales_map_the_range_end_onto_the_largest_finite_value():
    scale, zero_point = activation_qparams(-3.0, 1.5, E4M3, symmetric=False)  # FP8 is always symmetric
    assert zero_point == 0 and scale == np.float32(3.0 / 448)
    scale, _ = activation_qparams(-3.0, 1.5, E5M2, symmetric=True)
    assert scale == np.float32(3.0 / 57344)
    w = np.array([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]], np.float32)
    w_scale, w_zero = weight_qparams(w, axis=0, qtype=E4M3)
    np.testing.assert_allclose(w_scale[:2], [2.0 / 448, 0.5 / 448])
    assert w_zero.dtype == ml_dtypes.float8_e4m3fn and not w_zero.astype(np.float32).any()
    q = quantize(w, w_scale, w_zero, E4M3, axis=0)
    assert q.astype(np.float32)[0, 1] == -448.0 and q.astype(np.float32)[1, 0] == 448.0
    # Saturation starts half a step past the largest value: 448 + 16 (E4M3FN), 57344 + 4096 (E5M2).
    assert (E4M3.top_half_step, E5M2.top_half_step, QUANT_TYPES["int8"].top_half_step) == (16.0, 4096.0, 0.5)


def test_one_e4m3_rounding_of_gaussian_data_is_about_31_db():
    """E4M3's 3 mantissa bits: relative step 2^-3, about 31 dB for any well-scaled tensor (int8: ~39)."""
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    scale, zp = activation_qparams(x.min(), x.max(), E4M3, True)
    zero = np.asarray(zp, E4M3.numpy_dtype)
    assert 30.0 <= _sqnr(x, dequantize(quantize(x, scale, zero, E4M3), scale, zero)) <= 33.0


def test_fp8_mse_calibration_searches_the_fp8_grid():
    """mse over the FP8 grid never does worse than minmax on the data it was fitted to."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(50_000) * 1e-3, [40.0]]).astype(np.float32)  # one outlier
    stats = TensorStatistics()
    stats.update(x)
    errors = {}
    for method in ("minmax", "mse"):
        rmin, rmax = stats.range(method, 0, qtype=E4M3)
        scale, zp = activation_qparams(rmin, rmax, E4M3, True)
        zero = np.asarray(zp, E4M3.numpy_dtype)
        errors[method] = float(np.sum((x - dequantize(quantize(x, scale, zero, E4M3), scale, zero)) ** 2))
    assert errors["mse"] <= errors["minmax"]
    with pytest.raises(ConfigError, match="entropy"):
        stats.range("entropy", 0, qtype=E4M3)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"activation_type": "float8e4m3fn", "weight_type": "int8"}, "cannot be mixed"),
        ({"activation_type": "float8e4m3fn"}, "cannot be mixed"),
        ({"activation_type": "uint8", "weight_type": "float8e4m3fn"}, "cannot be mixed"),
        ({**FP8, "activation_type_overrides": {"add": "uint16"}}, "same family"),
        ({"activation_type_overrides": {"add": "float8e4m3fn"}}, "same family"),
        ({**FP8, "activation_symmetric": False}, "always symmetric"),
        ({**FP8, "calibration_method": "entropy"}, "entropy"),
    ],
)
def test_bad_fp8_combinations_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        CompileConfig.from_dict(values)


def test_target_without_fp8_rejects_it():
    with pytest.raises(ConfigError, match="float8e4m3fn"):
        qcompile.compile(tiny_cnn(), cnn_batches(2), config={**FP8, "target": "qnn-htp", "measure_latency": False})


CASES = {
    # model, data, SQNR floor (dB). Measured: CNN 27.3 dB (e4m3) / 20.3 (e5m2); transformer 23.6 / 17.7.
    # Each quantized tensor costs ~31 dB (E4M3) or ~25 dB (E5M2), and a model compounds several.
    "cnn": (tiny_cnn, lambda: cnn_batches(8), {"float8e4m3fn": 25.0, "float8e5m2": 18.0}),
    "transformer": (tiny_transformer, lambda: transformer_batches(8), {"float8e4m3fn": 21.0, "float8e5m2": 15.0}),
}


def _fp8_options(model) -> ort.SessionOptions:
    """Every optimization on, as a user's session; before ONNX Runtime 1.32 the QDQ fusions off,
    as qcompile's own sessions have them (``qcompile.io.runtime.qdq_safe_config``): that ORT fuses
    FP8 Q/DQ into integer kernels that reject FP8."""
    options = ort.SessionOptions()
    for key, value in qdq_safe_config(model).items():
        options.add_session_config_entry(key, value)
    return options


@pytest.mark.parametrize("fmt", ["float8e4m3fn", "float8e5m2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_model_compiles_runs_in_ort_and_reaches_its_sqnr(case, fmt):
    build, data, floors = CASES[case]
    proto, batches = build(), data()
    result = qcompile.compile(
        proto, batches, config={"activation_type": fmt, "weight_type": fmt, "measure_latency": False}
    )
    model = ir.serde.serialize_model(result.model) if isinstance(result.model, ir.Model) else result.model
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21  # upgrade-opset picked 21
    fp8 = QUANT_TYPES[fmt].ir_dtype.value
    weights = [i for i in model.graph.initializer if len(i.dims) >= 2]
    assert weights and all(i.data_type == fp8 for i in weights), "every matrix/kernel is stored as FP8"
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_nodes and all(
        len(n.input) == 2 and helper.get_attribute_value(n.attribute[0]) == fp8 for n in quantize_nodes
    ), "activation Qs name their FP8 type in output_dtype and have no zero point"
    # ORT with every optimization on (its Relu-into-Q fusion included) computes what the model says.
    optimized = ort.InferenceSession(model.SerializeToString(), _fp8_options(model), providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out, ref = [], []
    for batch in batches:
        y = optimized.run(None, batch)[0]
        # Equal up to float fusions' rounding (Conv, LayerNorm, Gelu), which can flip an FP8 code
        # at a rounding tie (one sample's logits then move by ~0.1: about 40 dB); a dropped Relu
        # would be far off.
        assert _sqnr(plain.run(None, batch)[0], y) >= 30.0
        out.append(y.ravel())
        ref.append(reference.run(None, batch)[0].ravel())
    assert _sqnr(np.concatenate(ref), np.concatenate(out)) >= floors[fmt]
    fusion = result.report.fusion
    assert fusion["integer_kernels"] == {} and fusion["float8_qdq_nodes"] > 0 and "FP8" in fusion["note"]


def test_fp8_biases_stay_float():
    """FP8 GEMMs add a float bias: there is no int32 accumulator grid to store it on."""
    result = qcompile.compile(tiny_cnn(), cnn_batches(4), config={**FP8, "measure_latency": False})
    model = result.model
    conv = next(n for n in model.graph if n.name == "conv2")
    assert conv.inputs[2].name == "b2" and conv.inputs[2].const_value.dtype == ir.DataType.FLOAT


def test_fp8_embedding_table_is_stored_as_int8_rows():
    """ONNX Gather reads no float8 table, so with FP8 weights an embedding keeps int8 rows (weight-only)."""
    proto = tiny_lm()
    rng = np.random.default_rng(0)
    ids = [{i.name: rng.integers(0, 100, (2, 8)).astype(np.int64) for i in proto.graph.input}]
    result = qcompile.compile(proto, ids * 4, config={**FP8, "measure_latency": False})
    model = ir.serde.serialize_model(result.model) if isinstance(result.model, ir.Model) else result.model
    onnx.checker.check_model(model, full_check=True)
    tables = {i.name: i.data_type for i in model.graph.initializer}
    gathered = {tables.get(n.input[0]) for n in model.graph.node if n.op_type == "Gather"}
    assert TensorProto.INT8 in gathered and TensorProto.FLOAT8E4M3FN not in gathered
    assert TensorProto.FLOAT8E4M3FN in tables.values()  # the other weights are FP8
    ort.InferenceSession(model.SerializeToString(), _fp8_options(model), providers=["CPUExecutionProvider"]).run(None, ids[0])


def test_fp8_models_are_recognized_for_onnx_runtime_1_31s_qdq_fusion():
    """ONNX Runtime 1.31 (onnxruntime-gpu's newest) fuses FP8 Q/DQ into integer kernels that reject
    FP8 (INVALID_GRAPH): sessions on it need the QDQ fusions off, for FP8 models only."""
    from qcompile.io.runtime import FP8_QDQ_FUSION_BROKEN, has_fp8_qdq

    fp8 = qcompile.compile(tiny_cnn(), cnn_batches(4), config={**FP8, "measure_latency": False}).to_proto()
    int8 = qcompile.compile(tiny_cnn(), cnn_batches(4), config={"measure_latency": False}).to_proto()
    assert has_fp8_qdq(fp8) and has_fp8_qdq(fp8.SerializeToString()) and not has_fp8_qdq(int8)
    assert qdq_safe_config(int8) == {}
    assert qdq_safe_config(fp8) == ({"session.disable_quant_qdq": "1"} if FP8_QDQ_FUSION_BROKEN else {})
