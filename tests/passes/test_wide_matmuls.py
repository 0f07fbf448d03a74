"""lower-wide-matmuls: a MatMul/Gemm with 16-bit activations and int8 weights runs as its QDQ model
says on every ONNX Runtime version and session setting, from the same integers."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import _init, make_model

import qcompile
from qcompile.backends.cpu import TARGET

WITHOUT_PASS = [p for p in TARGET.default_pipeline if p != "lower-wide-matmuls"]


def _projections():
    """x [N, 3, 40] -> MatMul(w [40, 24]) -> Relu -> Gemm-shaped head on the flattened rows: K = 40
    is no multiple of any MatMulNBits block, the Gemm reads its weight transposed, with a bias."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "rows"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["y"], name="head", transB=1),
    ]
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 8])],
        [_init("w", rng.normal(0, 0.3, (40, 24)).astype(np.float32)), _init("rows", np.array([-1, 24], np.int64)),
         _init("head_w", rng.normal(0, 0.3, (8, 24)).astype(np.float32)),
         _init("head_b", rng.normal(0, 0.1, 8).astype(np.float32))],
    )


def _batches(count=4, seed=1):
    rng = np.random.default_rng(seed)
    # One spiky channel makes a per-block int8 re-quantization of the activations visible.
    batches = []
    for _ in range(count):
        x = rng.normal(0, 1, (16, 3, 40)).astype(np.float32)
        x[:, :, 0] *= 50.0
        batches.append({"x": x})
    return batches


def _compile(activation_type, pipeline=None, result=False):
    config = {"target": "cpu", "measure_latency": False, "recover": False, "activation_type": activation_type}
    if pipeline is not None:
        config["pipeline"] = pipeline
    compiled = qcompile.compile(_projections(), _batches(), config=config, eval_data=_batches(2, seed=3))
    return compiled if result else compiled.to_proto()


def _run(model, batch, **options):
    session_options = ort.SessionOptions()
    for key, value in options.pop("entries", {}).items():
        session_options.add_session_config_entry(key, value)
    session_options.graph_optimization_level = options.pop("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), session_options, providers=["CPUExecutionProvider"]).run(None, batch)[0]


def test_16_bit_matmuls_compute_the_qdq_arithmetic_whatever_the_session_accuracy_level():
    as_written, lowered = _compile("uint16", WITHOUT_PASS), _compile("uint16")
    assert sorted(n.op_type for n in lowered.graph.node if n.domain == "com.microsoft") == ["MatMulNBits"] * 2
    assert not any(n.op_type in ("MatMul", "Gemm") for n in lowered.graph.node)
    batch = _batches(1, seed=7)[0]
    # The meaning of the QDQ model: every node as written, no graph rewrite.
    reference = _run(as_written, batch, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for level in ("0", "4"):  # 4 is ORT's default for the MatMulNBits it fuses itself
        out = _run(lowered, batch, entries={"session.qdq_matmulnbits_accuracy_level": level})
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_the_integers_and_scales_are_the_ones_insert_qdq_chose():
    as_written, lowered = _compile("uint16", WITHOUT_PASS), _compile("uint16")
    inits = {t.name: numpy_helper.to_array(t) for t in as_written.graph.initializer}
    lowered_inits = {t.name: numpy_helper.to_array(t) for t in lowered.graph.initializer}
    dq = {n.output[0]: n for n in as_written.graph.node if n.op_type == "DequantizeLinear"}
    for name in ("proj", "head"):
        original = next(n for n in as_written.graph.node if n.name == name)
        nbits = next(n for n in lowered.graph.node if n.name == name)
        weight_dq = dq[original.input[1]]
        codes, scale = inits[weight_dq.input[0]], inits[weight_dq.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in nbits.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        assert attrs["bits"] == 8 and attrs["accuracy_level"] == 0
        rows = codes if name == "head" else codes.T  # [N, K]
        packed = lowered_inits[nbits.input[1]].reshape(n, -1)
        np.testing.assert_array_equal(packed[:, :k].astype(np.int16) - 128, rows.astype(np.int16))
        blocks = -(-k // block)
        np.testing.assert_array_equal(lowered_inits[nbits.input[2]].reshape(n, blocks), np.repeat(scale.reshape(-1, 1), blocks, 1))
        # Symmetric int8 weights: no zero-point input (MatMulNBits' default, 128); the head keeps its bias.
        assert (len(nbits.input), nbits.input[3:5]) == ((6, ["", ""]) if name == "head" else (3, []))
    assert [o.name for o in lowered.graph.output] == ["y"]


def test_the_report_says_how_those_matmuls_compute():
    report = _compile("uint16", result=True).report
    assert report.transformations["lower-wide-matmuls"]["rewritten"] == ["proj", "head"]
    assert report.fusion["weight_only_matmuls_by_bits"] == {"8": 2}
    assert "weight-only MatMulNBits (float activations): 2 at 8 bits" in str(report)


def test_8_bit_activations_keep_ort_s_integer_kernels():
    model = _compile("uint8")
    assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node) == 2


@pytest.mark.parametrize("target", ["tensorrt", "cuda", "qnn-htp", "openvino"])
def test_other_targets_do_not_run_it(target):
    from qcompile.backends import get_target
    assert "lower-wide-matmuls" not in get_target(target).default_pipeline
