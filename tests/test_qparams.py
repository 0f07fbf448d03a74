"""Scales and zero points, checked against an independent computation of the formulas."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qcompile.numerics.qparams import QUANT_TYPES, activation_qparams, dequantize, quantize, weight_qparams

UINT8, INT8 = QUANT_TYPES["uint8"], QUANT_TYPES["int8"]


def test_asymmetric_uint8_maps_range_onto_0_255():
    scale, zp = activation_qparams(-1.0, 3.0, UINT8, symmetric=False)
    assert np.isclose(scale, 4.0 / 255) and zp == round(1.0 / (4.0 / 255))
    # The range ends land on the ends of the integer grid, and 0.0 is exact.
    q = quantize(np.array([-1.0, 0.0, 3.0], np.float32), scale, np.array(zp), UINT8)
    assert q[0] == 0 and q[2] == 255 and dequantize(q, scale, np.array(zp))[1] == 0.0


def test_range_is_widened_to_include_zero():
    scale, zp = activation_qparams(2.0, 4.0, UINT8, symmetric=False)
    assert zp == 0 and np.isclose(scale, 4.0 / 255)


def test_symmetric_int8_and_uint8():
    scale, zp = activation_qparams(-1.0, 2.0, INT8, symmetric=True)
    assert zp == 0 and np.isclose(scale, 2.0 / 127.5)
    _, zp_u = activation_qparams(-1.0, 2.0, UINT8, symmetric=True)
    assert zp_u == 128


def test_per_channel_weight_scales():
    w = np.array([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]], np.float32)
    scale, zp = weight_qparams(w, axis=0, qtype=INT8)
    np.testing.assert_allclose(scale[:2], [2.0 / 127, 0.5 / 127])
    assert scale[2] > 0 and not zp.any()
    q = quantize(w, scale, zp, INT8, axis=0)
    assert q.max() == 127 and q.min() == -127  # the restricted symmetric grid


def test_quantize_matches_onnxruntime():
    """Our QuantizeLinear and DequantizeLinear agree with ORT's on ties and saturation."""
    x = np.array([-3.0, -0.5, 0.0, 0.5, 1.5, 2.5, 300.0], np.float32)
    scale, zp = np.float32(1.0), np.uint8(3)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [7]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(zp), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    q_ort, y_ort = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    q = quantize(x, scale, np.array(zp), UINT8)
    np.testing.assert_array_equal(q, q_ort)
    np.testing.assert_array_equal(dequantize(q, scale, np.array(zp)), y_ort)
