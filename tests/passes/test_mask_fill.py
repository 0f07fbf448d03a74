"""clamp-mask-fill: a mask's float32-min fill becomes finite, the float model computes the same."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import make_model, tiny_transformer, transformer_batches


def _run(proto, batch):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, batch)[0]


def test_float32_min_fill_becomes_finite_and_softmax_is_unchanged():
    proto = tiny_transformer()
    model, context = run_passes(proto, "clamp-mask-fill")
    assert float(model.graph.initializers["neg_big"].const_value.numpy()) == -1e4
    record = context.records["clamp-mask-fill"]
    assert record["fill"] == -1e4 and record["constants"]["neg_big"]["from"] == float(np.finfo(np.float32).min)
    batch = transformer_batches(1)[0]
    np.testing.assert_allclose(_run(ir.serde.serialize_model(model), batch), _run(proto, batch), atol=1e-6)


def test_large_constant_not_feeding_a_softmax_is_left_alone():
    big = numpy_helper.from_array(np.array(-3e38, np.float32), "big")
    proto = make_model(
        [helper.make_node("Add", ["x", "big"], ["y"], name="add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [big],
    )
    model, context = run_passes(proto, "clamp-mask-fill(fill=-100)")
    assert float(model.graph.initializers["big"].const_value.numpy()) == np.float32(-3e38)
    assert "clamp-mask-fill" not in context.records
