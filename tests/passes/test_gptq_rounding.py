"""gptq-rounding: GPTQ on the per-channel grid insert-qdq stores lowers a layer's output error
against round-to-nearest (much more than AdaRound does on wide layers), insert-qdq then stores
exactly its integers, and a layer keeps round-to-nearest where GPTQ would not help."""

import numpy as np
import pytest
from conftest import run_passes
from onnx import TensorProto, helper
from test_adaround import _batches, _gemm, stored_integers
from tiny_models import _init, make_model

from qcompile.errors import ConfigError
from qcompile.passes.gptq_rounding import GptqRounding, gptq_layer
from qcompile.passes.layer_statistics import linear_layer, observe_layers


def _matmuls_sharing_an_input():
    """Two MatMuls reading one input (an attention block's query and key projections)."""
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
         helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, ["N", 16])],
        [_init("wq", rng.normal(0, 0.1, (32, 16)).astype(np.float32)),
         _init("wk", rng.normal(0, 0.1, (32, 16)).astype(np.float32))],
    )


# How much it lowers a layer's output error against round-to-nearest: test_adaround's
# test_lowers_the_layer_output_error_against_round_to_nearest, run for both roundings.


def test_insert_qdq_stores_exactly_the_gptq_integers_on_the_float_weights_grid():
    q, ratio = stored_integers("gptq-rounding")
    # GPTQ moves weights by more than a rounding choice: some integers are neither floor nor ceil.
    assert np.mean((q != np.floor(ratio)) & (q != np.ceil(ratio))) > 0.02


def test_uncorrelated_inputs_change_little_and_never_worsen_the_layer():
    # With a diagonal X^T X there is nothing for later columns to absorb: GPTQ is round-to-nearest
    # up to the damping, and the measured error can only stay or fall.
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (1, 8, 16))
    scale = np.full_like(w, np.abs(w).max() / 63)
    fixed = np.abs(w) == np.abs(w).max(axis=2, keepdims=True)
    result = gptq_layer(w, scale, 63, np.eye(16)[None] * 5.0, fixed)
    assert result.error <= result.rtn_error * (1 + 1e-9)
    assert np.array_equal(result.q, np.clip(np.rint(w / scale), -63, 63))


def test_layers_reading_the_same_rows_share_their_statistics():
    proto, data = _matmuls_sharing_an_input(), _batches((32,))
    model, context = run_passes(proto, ["plan-quantization", "calibrate"], data=data)
    layers = [linear_layer(node) for node in model.graph]
    stats = observe_layers(model, layers, context, gram=True, batches=None, chunk=1 << 20, what="test")
    assert stats["q_proj"] is stats["k_proj"]
    x = np.concatenate([b["x"] for b in data]).astype(np.float64)
    assert stats["q_proj"].count == len(x)  # folded in once per batch, not once per layer
    np.testing.assert_allclose(stats["q_proj"].gram[0], x.T @ x, rtol=1e-5)


def test_rejects_a_damping_outside_zero_to_one():
    _, context = run_passes(_gemm(), ["plan-quantization"], data=_batches((32,)))
    with pytest.raises(ConfigError, match="damp must be in"):
        GptqRounding(context, damp=0.0)
