"""If/Loop subgraphs: planned, calibrated and quantized inside If branches; kept valid everywhere.

The model of most tests is silero-vad's shape in miniature: an If on an int64 input (the sample
rate) whose branches run MatMuls and an LSTM on the float inputs, read from the outer scope.
"""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import make_model

import qcompile
from qcompile.analysis.debug import analyze
from qcompile.errors import ModelError
from qcompile.passes.calibration import collect_statistics
from qcompile.passes.quantization_plan import plan_nodes

PREP = "fix-names,shape-inference,remove-identity,remove-unused"
RNG = np.random.default_rng(0)
W1 = RNG.normal(0, 0.5, (8, 8)).astype(np.float32)
W2 = RNG.normal(0, 0.5, (8, 8)).astype(np.float32)


def _tensor(name, dtype=TensorProto.FLOAT, shape=("N", 8)):
    return helper.make_tensor_value_info(name, dtype, shape)


def _branch(tag: str, weight: np.ndarray, nested: onnx.NodeProto | None = None) -> onnx.GraphProto:
    """MatMul(x, w) -> Relu -> MatMul(., w) on the outer-scope input x; weights in the branch."""
    nodes = [helper.make_node("MatMul", ["x", f"{tag}_w"], [f"{tag}_a"], name=f"{tag}_mm1"),
             helper.make_node("Relu", [f"{tag}_a"], [f"{tag}_r"], name=f"{tag}_relu"),
             helper.make_node("MatMul", [f"{tag}_r", f"{tag}_w"], [f"{tag}_out"], name=f"{tag}_mm2")]
    out = f"{tag}_out"
    if nested is not None:
        nodes.append(nested)
        out = nested.output[0]
    return helper.make_graph(nodes, tag, [], [_tensor(out)], [numpy_helper.from_array(weight, f"{tag}_w")])


def if_model(nested: bool = False) -> onnx.ModelProto:
    """y = If(rate == 16000, branch(x, W1), branch(x, W2)); with ``nested``, the then-branch ends
    in an If on the sign of its output's mean, whose branches scale it."""
    inner = None
    if nested:
        inner_then = helper.make_graph([helper.make_node("Mul", ["then_out", "two"], ["inner_t"], name="inner_mul")],
                                       "inner_then", [], [_tensor("inner_t")])
        inner_else = helper.make_graph([helper.make_node("Identity", ["then_out"], ["inner_e"])],
                                       "inner_else", [], [_tensor("inner_e")])
        inner = helper.make_node("If", ["positive"], ["nested_out"], name="inner_if",
                                 then_branch=inner_then, else_branch=inner_else)
    nodes = [helper.make_node("Equal", ["rate", "sixteen_k"], ["is_16k"], name="equal"),
             helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0, name="mean"),
             helper.make_node("Greater", ["mean", "zero"], ["positive"], name="greater"),
             helper.make_node("If", ["is_16k"], ["y"], name="if", then_branch=_branch("then", W1, inner),
                              else_branch=_branch("else", W2))]
    inits = [numpy_helper.from_array(np.array(16000, np.int64), "sixteen_k"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    return make_model(nodes, [_tensor("x"), _tensor("rate", TensorProto.INT64, [])], [_tensor("y")], inits)


def batches(count: int = 8, rate: int = 16000) -> list[dict]:
    rng = np.random.default_rng(1)
    # Alternating offsets: the nested If (mean of x > 0) takes each branch in turn.
    return [{"x": (rng.normal(0, 1, (4, 8)) + (0.5 if i % 2 else -0.5)).astype(np.float32),
             "rate": np.array(rate, np.int64)} for i in range(count)]


def _sqnr(a, b) -> float:
    return float(10 * np.log10(np.sum(a ** 2) / np.sum((a - b) ** 2)))


def test_plan_reaches_into_if_branches_and_does_not_call_their_outputs_masks():
    """silero-vad: every Conv sits in an If on the int64 sample rate; the plan called the If's
    outputs masks (computed only from an integer input) and quantized nothing."""
    _, context = run_passes(if_model(), PREP + ",plan-quantization")
    plan = context.analyses.plan
    assert {"then_mm1", "then_mm2", "else_mm1", "else_mm2"} <= plan.anchors
    assert "y" not in plan.float_tensors
    assert not any("mask" in why for why in plan.float_tensors.values())


def test_plan_leaves_loop_bodies_float():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v_in", "w"], ["v_out"], name="body_mm")],
        "body", [_tensor("i", TensorProto.INT64, []), _tensor("cond_in", TensorProto.BOOL, []), _tensor("v_in")],
        [_tensor("cond_out", TensorProto.BOOL, []), _tensor("v_out")])
    proto = make_model([helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)],
                       [_tensor("x")], [_tensor("y")],
                       [numpy_helper.from_array(W1, "w"), numpy_helper.from_array(np.array(2, np.int64), "trips")])
    model, context = run_passes(proto, PREP + ",plan-quantization")
    assert "body_mm" not in context.analyses.plan.nodes
    assert "body_mm" not in {n.name for n in plan_nodes(model.graph)}


def test_calibration_observes_values_inside_nested_if_branches():
    """ONNX Runtime cannot fetch a subgraph's values: the session's copy carries them out of each
    enclosing If. The branch not taken contributes nothing; the model itself is unchanged."""
    model = ir.serde.deserialize_model(if_model(nested=True))
    before = onnx.printer.to_text(ir.serde.serialize_model(model))
    data = batches(4)
    table = collect_statistics(model, ["then_a", "inner_t", "else_a"], data, histograms=False)
    expected = np.concatenate([d["x"] @ W1 for d in data])
    assert np.isclose(table["then_a"].min, expected.min()) and np.isclose(table["then_a"].max, expected.max())
    taken = [d for d in data if d["x"].mean() > 0]
    inner = np.concatenate([2 * (np.maximum(d["x"] @ W1, 0) @ W1) for d in taken])
    assert np.isclose(table["inner_t"].max, inner.max(), rtol=1e-5)
    assert "else_a" not in table.tensors or table["else_a"].is_empty  # the 8 kHz branch never ran
    assert onnx.printer.to_text(ir.serde.serialize_model(model)) == before


def test_compile_quantizes_the_branch_calibration_took_and_stores_the_others_weights_as_int8():
    proto = if_model(nested=True)
    result = qcompile.compile(proto, batches(), config={"measure_latency": False})
    compiled = result.to_proto()
    onnx.checker.check_model(compiled, full_check=True)
    branches = {a.name: a.g for a in next(n for n in compiled.graph.node if n.op_type == "If").attribute}
    assert "DequantizeLinear" in {n.op_type for n in branches["then_branch"].node}
    # The 8 kHz branch never ran in calibration: no activation statistics, so its activations
    # stay float; its weights need no data and are stored as int8 (silero: 45 % -> 21 % of fp32).
    # (else_mm1 reads x, which calibration saw: it is quantized as usual.)
    else_ops = [n.op_type for n in branches["else_branch"].node]
    # Both weights int8: else_mm1's through its DequantizeLinear (its input is 8-bit), else_mm2's
    # (float input) in the MatMulNBits lower-wide-matmuls writes, which computes it as written.
    assert "QuantizeLinear" not in else_ops and else_ops.count("DequantizeLinear") == 1, else_ops
    assert else_ops.count("MatMulNBits") == 1 and "MatMul" in else_ops, else_ops
    stored = {t.name: (t.data_type, tuple(t.dims)) for t in branches["else_branch"].initializer}
    assert (TensorProto.INT8, (8, 8)) in stored.values() and (TensorProto.FLOAT, (8, 8)) not in stored.values(), stored
    assert "weight-only" in result.report.plan["float_nodes"]["else_mm2"]
    float_session = ort.InferenceSession(proto.SerializeToString())
    quant_session = ort.InferenceSession(compiled.SerializeToString())
    for rate in (16000, 8000):
        feed = batches(1, rate)[0]
        assert _sqnr(float_session.run(None, feed)[0], quant_session.run(None, feed)[0]) > 25.0


def test_remove_unused_drops_branch_initializers_nothing_reads():
    """A branch weight that insert-qdq replaced by its integer copy shipped twice (silero-vad's
    quantized model came out at 108% of fp32)."""
    graph = _branch("then", W1)
    graph.initializer.append(numpy_helper.from_array(W2, "then_unused"))
    proto = make_model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=graph, else_branch=_branch("else", W2))],
                       [_tensor("x"), _tensor("c", TensorProto.BOOL, [])], [_tensor("y")], [])
    model, _ = run_passes(proto, "remove-unused")
    then_graph = next(iter(model.graph)).attributes["then_branch"].value
    assert set(then_graph.initializers) == {"then_w"}


def test_fold_constants_reorders_lstm_gates_of_a_large_weight_read_three_times():
    """PyTorch's LSTM export reorders the gates with three Slices of W and a Concat; onnxscript
    skips a > 8192-element input with several readers, so the LSTM had no constant W to quantize."""
    w = RNG.normal(0, 1, (512, 128)).astype(np.float32)
    starts = [numpy_helper.from_array(np.array([v], np.int64), f"s{v}") for v in (0, 128, 256, 512)]
    nodes = [helper.make_node("Slice", ["w", f"s{a}", f"s{b}"], [f"part{a}"]) for a, b in ((0, 128), (128, 256), (256, 512))]
    nodes.append(helper.make_node("Concat", ["part256", "part0", "part128"], ["reordered"], axis=0))
    nodes.append(helper.make_node("MatMul", ["x", "reordered"], ["y"]))
    proto = make_model(nodes, [_tensor("x", shape=("N", 512))], [_tensor("y", shape=("N", 128))],
                       [numpy_helper.from_array(w, "w"), *starts])
    model, _ = run_passes(proto, "fold-constants,remove-unused")
    assert [n.op_type for n in model.graph] == ["MatMul"]
    folded = next(iter(model.graph)).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(folded, np.concatenate([w[256:], w[:128], w[128:256]]))


def test_lstm_inside_an_if_branch_becomes_the_integer_lstm_kernel():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.3, (1, 32, 8)).astype(np.float32)
    r = rng.normal(0, 0.3, (1, 32, 8)).astype(np.float32)
    lstm = helper.make_node("LSTM", ["seq", "lstm_w", "lstm_r"], ["", "h"], hidden_size=8, name="lstm")
    then_branch = helper.make_graph([lstm], "then", [], [_tensor("h", shape=(1, "N", 8))],
                                    [numpy_helper.from_array(w, "lstm_w"), numpy_helper.from_array(r, "lstm_r")])
    else_branch = helper.make_graph([helper.make_node("ReduceMean", ["seq"], ["m"], axes=[0])], "else", [],
                                    [_tensor("m", shape=(1, "N", 8))])
    proto = make_model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)],
                       [_tensor("seq", shape=(5, "N", 8)), _tensor("c", TensorProto.BOOL, [])],
                       [_tensor("y", shape=(1, "N", 8))], [])
    model, _ = run_passes(proto, "dynamic-quantize-lstm,remove-unused")
    compiled = ir.serde.serialize_model(model)
    onnx.checker.check_model(compiled)
    then_graph = next(a.g for a in compiled.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_graph.node] == ["DynamicQuantizeLSTM"]
    assert {t.name for t in then_graph.initializer if t.data_type == TensorProto.FLOAT and t.dims[-1] == 8} == set()
    feed = {"seq": rng.normal(0, 1, (5, 2, 8)).astype(np.float32), "c": np.array(True)}
    want = ort.InferenceSession(proto.SerializeToString()).run(None, feed)[0]
    got = ort.InferenceSession(compiled.SerializeToString()).run(None, feed)[0]
    assert _sqnr(want, got) > 30.0


def test_debug_says_it_does_not_analyse_quantization_inside_if_branches(caplog):
    """silero-vad: its whole 16 kHz network is one If branch, and qcompile debug answered that the
    compiled model "has no QuantizeLinear -> DequantizeLinear pairs: pass a QDQ model"."""
    proto = if_model()
    compiled = qcompile.compile(proto, batches(), config={"measure_latency": False}).to_proto()
    # x is quantized in the main graph (the branches read it from there): analysed, with a warning.
    analyze(proto, compiled, batches(2))
    assert "analyses the main graph only" in caplog.text
    # Without it, nothing is left to analyse: the error says where the quantization is.
    main_graph_qdq = [n for n in compiled.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for node in main_graph_qdq:  # x -> Q -> DQ -> branches: read x directly
        compiled.graph.node.remove(node)
    for node in compiled.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                for inner in attribute.g.node:
                    inner.input[:] = ["x" if name == "x_dq" else name for name in inner.input]
    with pytest.raises(ModelError, match=r"QuantizeLinear/DequantizeLinear nodes are all inside If/Loop/Scan subgraphs"):
        analyze(proto, compiled, batches(2))


def test_16_bit_matmuls_inside_if_branches_become_matmulnbits_too():
    """lower-wide-matmuls reaches into branches: ORT 1.32 fuses a 16-bit branch MatMul at its int8
    accuracy level there as well."""
    proto = if_model()
    compiled = qcompile.compile(proto, batches(), config={"measure_latency": False, "activation_type": "uint16"}).to_proto()
    onnx.checker.check_model(compiled, full_check=True)
    branch = next(a.g for a in next(n for n in compiled.graph.node if n.op_type == "If").attribute if a.name == "then_branch")
    ops = [n.op_type for n in branch.node]
    assert "MatMulNBits" in ops and "MatMul" not in ops, ops
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = batches(1)[0]
    assert _sqnr(reference.run(None, batch)[0], session.run(None, batch)[0]) > 40
