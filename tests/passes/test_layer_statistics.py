"""layer_statistics: a Conv's input rows (im2col patches) times its weight matrix give exactly what
ONNX Runtime's Conv computes, for padding, strides, dilations, groups and auto_pad."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tiny_models import _init, make_model

from qcompile.passes.layer_statistics import RowStatistics, linear_layer

CASES = [
    ({"pads": [1, 1, 1, 1]}, 4, 6, 1, (3, 3), (2, 4, 7, 8)),
    ({"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}, 4, 8, 2, (3, 3), (2, 4, 9, 8)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 6, 6, 6, (3, 3), (2, 6, 7, 8)),  # depthwise
    ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, 6, 6, 6, (2, 2), (2, 6, 7, 8)),
    ({"pads": [2, 1]}, 3, 5, 1, (3,), (2, 3, 11)),  # 1-D
]


@pytest.mark.parametrize(("attributes", "cin", "cout", "groups", "kernel", "shape"), CASES)
def test_conv_rows_times_weight_matrix_is_the_conv(attributes, cin, cout, groups, kernel, shape):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(cout, cin // groups, *kernel)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=groups, **attributes)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], cout] + ["?"] * len(kernel))], [_init("w", w)],
    )
    x = rng.normal(size=shape).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    layer = linear_layer(next(iter(ir.serde.deserialize_model(proto).graph)))
    rows = layer.rows(x)  # [groups, N * positions, D]
    out = np.einsum("gnd,god->gon", rows, layer.matrix(w))
    positions = int(np.prod(expected.shape[2:]))
    out = out.reshape(groups, cout // groups, shape[0], positions).transpose(2, 0, 1, 3).reshape(expected.shape)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_array_equal(layer.stored(layer.matrix(w)), w)
    # The mean row, as bias correction takes it, without building the rows.
    total, count = layer.row_sum(x)
    assert count == rows.shape[1]
    np.testing.assert_allclose(total, rows.astype(np.float64).sum(axis=1), rtol=1e-6, atol=1e-6)


def test_statistics_are_the_mean_and_gram_of_all_rows():
    rng = np.random.default_rng(1)
    chunks = [rng.normal(size=(2, 5, 3)) for _ in range(3)]
    stats = RowStatistics()
    for chunk in chunks:
        stats.update(chunk, gram=True)
    everything = np.concatenate(chunks, axis=1)
    np.testing.assert_allclose(stats.mean, everything.mean(axis=1))
    # Each chunk's product is float32 BLAS (summed in float64): 1e-5 relative, not float64's 1e-7.
    np.testing.assert_allclose(stats.gram, np.einsum("gnd,gne->gde", everything, everything), rtol=1e-5)
