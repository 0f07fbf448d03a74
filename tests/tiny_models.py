"""Tiny models built in code with onnx.helper, so every test shows its whole case."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_cnn(seed: int = 0, batch: int | str = "N", channels: int = 8) -> onnx.ModelProto:
    """Conv-BN-Relu, a residual block (Conv-Relu-Conv + Add, Relu), MaxPool, GAP, Flatten, Gemm."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        _init("w1", rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)),
        _init("b1", rng.normal(0, 0.1, (c,)).astype(np.float32)),
        _init("bn_scale", rng.uniform(0.5, 1.5, (c,)).astype(np.float32)),
        _init("bn_bias", rng.normal(0, 0.1, (c,)).astype(np.float32)),
        _init("bn_mean", rng.normal(0, 0.1, (c,)).astype(np.float32)),
        _init("bn_var", rng.uniform(0.5, 1.5, (c,)).astype(np.float32)),
        _init("w2", rng.normal(0, 0.2, (c, c, 3, 3)).astype(np.float32)),
        _init("b2", rng.normal(0, 0.1, (c,)).astype(np.float32)),
        _init("w3", rng.normal(0, 0.2, (c, c, 3, 3)).astype(np.float32)),
        _init("b3", rng.normal(0, 0.1, (c,)).astype(np.float32)),
        _init("fc_w", rng.normal(0, 0.3, (10, c)).astype(np.float32)),
        _init("fc_b", rng.normal(0, 0.1, (10,)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "r1"], ["sum"], name="residual_add"),
        helper.make_node("Relu", ["sum"], ["r3"], name="relu3"),
        helper.make_node("MaxPool", ["r3"], ["p"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    return make_model(nodes, [x], [y], inits)


def tiny_transformer(seed: int = 0, hidden: int = 32, heads: int = 2) -> onnx.ModelProto:
    """One encoder block: QKV MatMul+bias, scaled scores + additive mask from an int64 mask,
    Softmax, context MatMul, output projection, residual, LayerNorm, GELU FFN."""
    rng = np.random.default_rng(seed)
    h, d = hidden, hidden // heads
    w = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)  # noqa: E731
    inits = [
        _init("wq", w(h, h)), _init("bq", w(h)), _init("wk", w(h, h)), _init("bk", w(h)),
        _init("wv", w(h, h)), _init("bv", w(h)), _init("wo", w(h, h)), _init("bo", w(h)),
        _init("w_up", w(h, 4 * h)), _init("b_up", w(4 * h)), _init("w_down", w(4 * h, h)), _init("b_down", w(h)),
        _init("ln_scale", np.ones(h, np.float32)), _init("ln_bias", np.zeros(h, np.float32)),
        _init("heads_shape", np.array([0, 0, heads, d], np.int64)),
        _init("merge_shape", np.array([0, 0, h], np.int64)),
        _init("inv_sqrt_d", np.array(1.0 / np.sqrt(d), np.float32)),
        _init("one", np.array(1.0, np.float32)),
        _init("neg_big", np.array(np.finfo(np.float32).min, np.float32)),
        _init("mask_axes", np.array([1, 2], np.int64)),
    ]

    def project(name, weight, bias):
        return [
            helper.make_node("MatMul", ["x", weight], [f"{name}_mm"], name=f"{name}_matmul"),
            helper.make_node("Add", [f"{name}_mm", bias], [f"{name}_b"], name=f"{name}_bias"),
            helper.make_node("Reshape", [f"{name}_b", "heads_shape"], [f"{name}_heads"], name=f"{name}_reshape"),
        ]

    nodes = project("q", "wq", "bq") + project("k", "wk", "bk") + project("v", "wv", "bv") + [
        helper.make_node("Transpose", ["q_heads"], ["q_t"], name="q_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_heads"], ["k_t"], name="k_transpose", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_heads"], ["v_t"], name="v_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"], name="scores_matmul"),
        helper.make_node("Mul", ["scores", "inv_sqrt_d"], ["scaled"], name="scale_scores"),
        # The additive mask: (1 - mask) * float32.min, from the int64 attention_mask input.
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="mask_cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "mask_axes"], ["mask_4d"], name="mask_unsqueeze"),
        helper.make_node("Sub", ["one", "mask_4d"], ["inv_mask"], name="mask_invert"),
        helper.make_node("Mul", ["inv_mask", "neg_big"], ["mask_bias"], name="mask_scale"),
        helper.make_node("Add", ["scaled", "mask_bias"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["context"], name="context_matmul"),
        helper.make_node("Transpose", ["context"], ["context_t"], name="context_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge_shape"], ["merged"], name="merge_heads"),
        helper.make_node("MatMul", ["merged", "wo"], ["attn_mm"], name="out_matmul"),
        helper.make_node("Add", ["attn_mm", "bo"], ["attn"], name="out_bias"),
        helper.make_node("Add", ["attn", "x"], ["res1"], name="residual1"),
        helper.make_node("LayerNormalization", ["res1", "ln_scale", "ln_bias"], ["ln1"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["ln1", "w_up"], ["up_mm"], name="up_matmul"),
        helper.make_node("Add", ["up_mm", "b_up"], ["up"], name="up_bias"),
        helper.make_node("Gelu", ["up"], ["act"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["act", "w_down"], ["down_mm"], name="down_matmul"),
        helper.make_node("Add", ["down_mm", "b_down"], ["down"], name="down_bias"),
        helper.make_node("Add", ["down", "ln1"], ["y"], name="residual2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", h])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", h])
    graph = helper.make_graph(nodes, "tiny_transformer", [x, mask], [y], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model


def cnn_batches(count: int, batch: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (batch, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def transformer_batches(count: int, batch: int = 2, seq: int = 8, hidden: int = 32, seed: int = 1):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        mask = np.ones((batch, seq), np.int64)
        mask[0, seq - 3 :] = 0  # padding in the first sequence
        batches.append({"x": rng.normal(0, 1, (batch, seq, hidden)).astype(np.float32), "attention_mask": mask})
    return batches


# tiny_lm: vocabulary x hidden = 4096 values, enough for the embedding to be stored as int8.
VOCAB, LM_HIDDEN, LM_FFN = 128, 32, 64


def tiny_lstm(hidden: int = 16, features: int = 8, directions: int = 2) -> onnx.ModelProto:
    """One LSTM (bidirectional by default) with constant W, R and B over a [12, N, features] input."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (directions, 4 * hidden, features)).astype(np.float32)
    r = rng.normal(0, 0.3, (directions, 4 * hidden, hidden)).astype(np.float32)
    b = rng.normal(0, 0.1, (directions, 8 * hidden)).astype(np.float32)
    lstm = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "y_h"], name="lstm", hidden_size=hidden,
                            direction="bidirectional" if directions == 2 else "forward")
    return make_model(
        [lstm], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, "N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, directions, "N", hidden]),
         helper.make_tensor_value_info("y_h", TensorProto.FLOAT, [directions, "N", hidden])],
        [_init("W", w), _init("R", r), _init("B", b)],
    )


def lstm_batches(count: int, batch: int = 2, features: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (12, batch, features)).astype(np.float32)} for _ in range(count)]


def tiny_lm(seed: int = 0) -> onnx.ModelProto:
    """ids -> embedding -> up (MatMul) -> Relu -> down (MatMul) + residual -> tied lm_head
    (MatMul with the transposed embedding), the shape of a one-layer language model."""
    rng = np.random.default_rng(seed)
    return make_model(
        [
            helper.make_node("Gather", ["embedding", "ids"], ["h"], name="embed"),
            helper.make_node("MatMul", ["h", "w_up"], ["u"], name="up"),
            helper.make_node("Relu", ["u"], ["r"], name="act"),
            helper.make_node("MatMul", ["r", "w_down"], ["d"], name="down"),
            helper.make_node("Add", ["h", "d"], ["s"], name="residual"),
            helper.make_node("Transpose", ["embedding"], ["embedding_t"], name="tie", perm=[1, 0]),
            helper.make_node("MatMul", ["s", "embedding_t"], ["logits"], name="lm_head"),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", VOCAB])],
        [
            _init("embedding", rng.normal(0, 1, (VOCAB, LM_HIDDEN)).astype(np.float32)),
            _init("w_up", rng.normal(0, 0.2, (LM_HIDDEN, LM_FFN)).astype(np.float32)),
            _init("w_down", rng.normal(0, 0.2, (LM_FFN, LM_HIDDEN)).astype(np.float32)),
        ],
        opset=21,
    )
