"""awq-scale: the float function is kept, and salient input channels end up with a finer grid."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import qcompile.passes.awq  # noqa: F401  (registers the pass)
import qcompile.passes.weight_only  # noqa: F401
from conftest import run_passes
from onnx import TensorProto, helper
from tiny_models import _init, make_model

K, N = 64, 48
SALIENT = (5, 17, 40)


def _model():
    """x -> Mul(norm weight) -> MatMul: three input channels carry 20x larger activations."""
    rng = np.random.default_rng(0)
    norm = np.ones(K, np.float32)
    norm[list(SALIENT)] = 20.0
    return make_model(
        [helper.make_node("Mul", ["x", "norm_weight"], ["h"], name="norm"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
        [_init("norm_weight", norm), _init("w", rng.normal(0, 0.05, (K, N)).astype(np.float32))],
        opset=21,
    )


def _data(count=4, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (64, K)).astype(np.float32)} for _ in range(count)]


def _run(model, feed):
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_scaling_keeps_the_float_outputs():
    model, context = run_passes(_model(), ["awq-scale(bits=4, block=32)"], data=_data())
    record = context.records["awq-scale"]["scaled"]["h"]
    assert record["folded_into"] == "Mul" and record["alpha"] > 0
    assert [n.op_type for n in model.graph] == ["Mul", "MatMul"]  # folded into the norm weight
    feed = _data(1, seed=5)[0]
    np.testing.assert_allclose(_run(model, feed), _run(_model(), feed), rtol=1e-4, atol=1e-4)


def test_scaling_lowers_the_int4_output_error():
    rtn = ["quantize-weights(bits=4, block=32, form=dq)", "remove-unused"]
    plain, _ = run_passes(_model(), rtn, data=_data())
    awq, context = run_passes(_model(), ["awq-scale(bits=4, block=32)", *rtn], data=_data())
    record = context.records["awq-scale"]["scaled"]["h"]
    assert record["relative_error_after"] < 0.8 * record["relative_error_before"]
    feed = _data(1, seed=6)[0]
    reference = _run(_model(), feed)
    plain_error = np.linalg.norm(reference - _run(plain, feed))
    awq_error = np.linalg.norm(reference - _run(awq, feed))
    assert awq_error < 0.8 * plain_error, (awq_error, plain_error)
