"""Loop bodies: invariant loop-carried values hoisted to outer-scope reads, their weights stored int8.

The model is PP-Structure's SLANet table recognizer in miniature, as paddle2onnx writes it: an
attention-decoder step in a Loop whose weights travel through the loop as state that the body
returns unchanged (one directly, one through an Identity, one read through a Transpose as a GRU
cell's are).
"""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import make_model

import qcompile

HIDDEN = 64
RNG = np.random.default_rng(0)
W_INPUT = RNG.normal(0, 0.2, (HIDDEN, HIDDEN)).astype(np.float32)
W_STATE = RNG.normal(0, 0.1, (HIDDEN, HIDDEN)).astype(np.float32)  # read transposed in the body
W_OUT = RNG.normal(0, 0.2, (HIDDEN, HIDDEN)).astype(np.float32)


def _info(name, dtype=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def loop_model(carried_weight_is_output: bool = False) -> onnx.ModelProto:
    """feature = Relu(x @ W0); Loop 5 times: h = tanh(feature @ Wi + h @ Wsᵀ), step output h @ Wo.
    Wi, Ws, Wo are loop-carried: the body returns Wi and Ws unchanged, Wo through an Identity."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["feature", "wi_in"], ["from_input"], name="mm_input"),
         helper.make_node("Transpose", ["ws_in"], ["ws_t"], perm=[1, 0], name="transpose_state"),
         helper.make_node("MatMul", ["h_in", "ws_t"], ["from_state"], name="mm_state"),
         helper.make_node("Add", ["from_input", "from_state"], ["pre"], name="add"),
         helper.make_node("Tanh", ["pre"], ["h_out"], name="tanh"),
         helper.make_node("MatMul", ["h_out", "wo_in"], ["step"], name="mm_out"),
         helper.make_node("Identity", ["wo_in"], ["wo_out"], name="pass_wo"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="pass_cond")],
        "body",
        [_info("i", TensorProto.INT64, []), _info("cond_in", TensorProto.BOOL, []), _info("h_in"),
         _info("wi_in"), _info("ws_in"), _info("wo_in")],
        [_info("cond_out", TensorProto.BOOL, []), _info("h_out"), _info("wi_in"), _info("ws_in"), _info("wo_out"),
         _info("step")],
    )
    outputs = ["h_final", "wi_final", "ws_final", "wo_final", "steps"]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["pre_feature"], name="mm_feature"),
             helper.make_node("Relu", ["pre_feature"], ["feature"], name="relu"),
             helper.make_node("Loop", ["trips", "true", "h0", "wi", "ws", "wo"], outputs, name="loop", body=body),
             # The final value of a carried weight read after the loop: it equals the initial value.
             helper.make_node("MatMul", ["h_final", "wi_final"], ["y"], name="mm_after")]
    graph_outputs = [_info("y", shape=["N", HIDDEN]), _info("steps", shape=[5, "N", HIDDEN])]
    if carried_weight_is_output:
        graph_outputs.append(_info("ws_final", shape=[HIDDEN, HIDDEN]))
    inits = [numpy_helper.from_array(RNG.normal(0, 0.3, (HIDDEN, HIDDEN)).astype(np.float32), "w0"),
             numpy_helper.from_array(W_INPUT, "wi"), numpy_helper.from_array(W_STATE, "ws"),
             numpy_helper.from_array(W_OUT, "wo"), numpy_helper.from_array(np.array(5, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "true")]
    return make_model(nodes, [_info("x", shape=["N", HIDDEN]), _info("h0", shape=["N", HIDDEN])], graph_outputs, inits)


def batches(count: int = 8) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (4, HIDDEN)).astype(np.float32),
             "h0": rng.normal(0, 0.5, (4, HIDDEN)).astype(np.float32)} for _ in range(count)]


def _run(model: onnx.ModelProto, batch: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([o.name for o in model.graph.output], batch)


def _sqnr(a, b) -> float:
    return float(10 * np.log10(np.sum(a ** 2) / np.sum((a - b) ** 2)))


def test_hoisting_drops_the_states_the_body_returns_unchanged_and_keeps_the_results():
    model = loop_model()
    hoisted, _ = run_passes(model, "hoist-loop-invariants,remove-unused")
    proto = ir.serde.serialize_model(hoisted)
    (loop,) = [n for n in proto.graph.node if n.op_type == "Loop"]
    assert list(loop.input) == ["trips", "true", "h0"]
    assert list(loop.output) == ["h_final", "steps"]
    body = loop.attribute[0].g
    assert [i.name for i in body.input] == ["i", "cond_in", "h_in"]
    reads = {i for n in body.node for i in n.input}
    assert {"wi", "ws", "wo"} <= reads  # outer-scope reads now
    onnx.checker.check_model(proto, full_check=True)
    batch = batches(1)[0]
    for expected, actual in zip(_run(model, batch), _run(proto, batch)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_carried_state_whose_final_value_is_a_graph_output_stays_carried():
    hoisted, _ = run_passes(loop_model(carried_weight_is_output=True), "hoist-loop-invariants,remove-unused")
    proto = ir.serde.serialize_model(hoisted)
    (loop,) = [n for n in proto.graph.node if n.op_type == "Loop"]
    assert list(loop.input) == ["trips", "true", "h0", "ws"]
    assert "ws_final" in loop.output


def test_default_compile_stores_loop_body_weights_as_int8(tmp_path):
    """Before: the three body weights stayed float (the plan does not enter Loop bodies)."""
    model = loop_model()
    path = tmp_path / "loop.onnx"
    onnx.save(model, path)
    result = qcompile.compile(str(path), calibration_data=batches(), target="cpu", config={"recover": False})
    out = tmp_path / "loop.int8.onnx"
    result.save(out)
    proto = onnx.load(out)
    float_weights = [i.name for i in proto.graph.initializer
                     if i.data_type == TensorProto.FLOAT and np.prod(i.dims) >= HIDDEN * HIDDEN]
    assert float_weights == []
    dequantized = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert {"wi", "ws", "wo"} <= set(dequantized)
    # Wsᵀ is the MatMul's weight: its output channels are Ws's rows.
    assert {a.name: a.i for a in dequantized["ws"].attribute}["axis"] == 0
    assert {a.name: a.i for a in dequantized["wi"].attribute}["axis"] == 1
    for expected, actual in zip(_run(model, batches(1)[0]), _run(proto, batches(1)[0])):
        assert _sqnr(expected, actual) > 25.0
    assert out.stat().st_size < 0.4 * path.stat().st_size
