"""The planner: what gets quantized, what stays float, and why."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_passes
from onnx import TensorProto, helper, numpy_helper
from tiny_models import cnn_batches, make_model, tiny_cnn, tiny_transformer, transformer_batches

PREP = "fix-names,shape-inference,fold-batchnorm,remove-unused"


def test_cnn_plan_quantizes_convs_residual_add_and_absorbs_relus():
    _, context = run_passes(tiny_cnn(), PREP + ",plan-quantization")
    plan = context.analyses.plan
    # conv1 was rebuilt by the BatchNorm fold, under a new name.
    assert {"conv2", "conv3", "fc"} <= plan.anchors and len(plan.anchors) == 4
    assert "residual_add" in plan.nodes
    assert {"relu2", "relu3"} <= plan.absorbed
    # An absorbed Relu's input is not quantized: the Q after the Relu performs the clamp.
    assert "c2" not in plan.activations and "r2" in plan.activations
    # MaxPool shares its input's parameters instead of requantizing.
    assert plan.activations["p"].shares == "r3"
    # Per-channel Conv weights on axis 0, Gemm (transB=1) on axis 0; biases derived.
    axes = {w.node: w.axis for w in plan.weights}
    assert axes["conv2"] == 0 and axes["fc"] == 0
    assert {b.node for b in plan.biases} >= {"conv2", "conv3", "fc"}


def test_transformer_mask_stays_float_from_the_graph_alone():
    _, context = run_passes(tiny_transformer(), PREP + ",plan-quantization")
    plan = context.analyses.plan
    assert {"mask_f", "mask_bias"} <= set(plan.float_tensors)
    assert "mask_bias" not in plan.activations and "add_mask" not in plan.nodes
    assert {"q_matmul", "k_matmul", "v_matmul", "out_matmul", "up_matmul", "down_matmul"} <= plan.anchors
    # Bias Adds after MatMuls are not quantized: that would add a requantization.
    assert "q_bias" not in plan.nodes


def test_sentinel_detected_from_calibration_statistics():
    """A float input carrying a -1e9 sentinel (not derived from an integer input) stays float."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    proto = make_model(
        [helper.make_node("Add", ["x", "bias"], ["masked"], name="add_bias"),
         helper.make_node("MatMul", ["masked", "w"], ["y"], name="mm"),
         helper.make_node("MatMul", ["x", "w"], ["z"], name="mm_plain")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])], [w],
    )
    rng = np.random.default_rng(0)
    data = [{"x": rng.normal(size=(2, 4)).astype(np.float32),
             "bias": np.where(rng.random((2, 4)) > 0.5, -1e9, 0).astype(np.float32)} for _ in range(4)]
    _, context = run_passes(proto, PREP + ",plan-quantization,calibrate", data=data)
    plan = context.analyses.plan
    assert "masked" in plan.float_tensors and "sentinel" in plan.float_tensors["masked"]
    assert "mm" not in plan.nodes and "mm_plain" in plan.nodes


def test_exclusions_by_name_op_type_and_regex():
    for option, value, node in (("exclude_nodes", ["conv2"], "conv2"),
                                ("exclude_op_types", ["Gemm"], "fc"),
                                ("exclude_regex", ["^conv3$"], "conv3")):
        _, context = run_passes(tiny_cnn(), PREP + ",plan-quantization", **{option: value})
        plan = context.analyses.plan
        assert node not in plan.nodes and "config" in plan.float_nodes[node]


def test_symmetric_activations_do_not_absorb_relu():
    """With int8 symmetric activations a Q cannot clamp at 0, so the Relu input is quantized too."""
    _, context = run_passes(tiny_cnn(), PREP + ",plan-quantization,calibrate", data=cnn_batches(4),
                            activation_type="int8", activation_symmetric=True)
    plan = context.analyses.plan
    assert not plan.absorbed and "c2" in plan.activations


def test_activation_matmul_can_be_left_float():
    _, context = run_passes(tiny_transformer(), PREP + ",plan-quantization", quantize_activation_matmul=False)
    plan = context.analyses.plan
    assert "scores_matmul" not in plan.nodes and "q_matmul" in plan.nodes


def test_calibrated_scales_are_set_for_every_planned_tensor():
    _, context = run_passes(tiny_transformer(), PREP + ",plan-quantization,calibrate", data=transformer_batches(3))
    plan = context.analyses.plan
    assert plan.activations and all(q.scale is not None and q.scale > 0 for q in plan.activations.values())


def test_embedding_lookup_by_integer_ids_is_signal_not_a_mask():
    """Gather from a large float table by int64 ids: what comes out is quantizable signal."""
    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32), "table")
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    proto = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("MatMul", ["emb", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])], [table, w],
    )
    _, context = run_passes(proto, PREP + ",plan-quantization")
    plan = context.analyses.plan
    assert "emb" not in plan.float_tensors and "mm" in plan.nodes


def test_large_embedding_table_is_stored_as_int8_per_row():
    from conftest import run_passes as run

    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32), "table")
    proto = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, 5, 8])], [table],
    )
    data = [{"ids": np.arange(10, dtype=np.int64).reshape(2, 5)}]
    model, context = run(proto, PREP + ",plan-quantization,calibrate,insert-qdq,remove-unused", data=data)
    assert [(w.node, w.axis) for w in context.analyses.plan.weights] == [("embed", 0)]
    q = model.graph.initializers["table_q"].const_value.numpy()
    scales = model.graph.initializers["table_row_scales"].const_value.numpy()
    assert q.dtype == np.int8 and scales.shape == (600, 1)
    assert "table" not in model.graph.initializers
    # The int8 rows are looked up first and only they are dequantized: no DequantizeLinear of the table.
    assert [n.op_type for n in model.graph] == ["Gather", "Gather", "Cast", "Mul"]
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (emb,) = session.run(None, data[0])
    np.testing.assert_allclose(emb, (q.astype(np.float32) * scales)[data[0]["ids"]], rtol=0, atol=0)
    assert np.abs(emb - numpy_helper.to_array(table)[data[0]["ids"]]).max() <= scales.max() / 2 + 1e-7


@pytest.mark.parametrize("ids_shape", [(2, 5), (7,), (3, 2, 4)])
def test_wide_embedding_table_is_stored_in_int8_blocks_of_32_columns(ids_shape):
    """all-MiniLM-L6-v2's word and position embeddings with one scale per row changed 4 of 128
    sentences' nearest neighbours (benchmarks/real_models.py); blocks of 32 columns changed none.
    The looked-up [..., blocks, 32] rows are reshaped back for ids of any rank, with dynamic dims."""
    values = np.random.default_rng(0).normal(size=(600, 64)).astype(np.float32)
    values[:, 5] *= 40.0  # one outlier column: a per-row scale would coarsen every other column
    proto = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["d"] * len(ids_shape))],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["d"] * len(ids_shape) + [64])],
        [numpy_helper.from_array(values, "table")],
    )
    ids = np.random.default_rng(1).integers(0, 600, ids_shape).astype(np.int64)
    model, _ = run_passes(proto, PREP + ",plan-quantization,calibrate,insert-qdq,remove-unused", data=[{"ids": ids}])
    q = model.graph.initializers["table_q"].const_value.numpy()
    scales = model.graph.initializers["table_row_scales"].const_value.numpy()
    assert q.dtype == np.int8 and q.shape == (600, 2, 32) and scales.shape == (600, 2, 1)
    assert [n.op_type for n in model.graph] == ["Gather", "Gather", "Cast", "Mul", "Shape", "Concat", "Reshape"]
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (emb,) = session.run(None, {"ids": ids})
    assert emb.shape == (*ids_shape, 64)
    np.testing.assert_array_equal(emb, (q.astype(np.float32) * scales).reshape(600, 64)[ids])
    error = np.abs(emb - values[ids])
    # Columns outside the outlier's block keep their own fine scale: 40x finer than a per-row scale.
    assert error[..., 32:].max() <= scales[:, 1].max() / 2 + 1e-7 < np.abs(values).max() / 127 / 10


def test_relu_whose_output_is_a_sentinel_is_not_absorbed():
    """Found by the ONNX test-model sweep (light_squeezenet: random weights, activations past 1e6).

    An absorbed Relu's clamp is performed by the QuantizeLinear on its output; when calibration
    shows that output is a sentinel, it stays float and the Relu cannot be absorbed (the planner
    used to raise KeyError looking up the output's parameters)."""
    w = numpy_helper.from_array(np.full((4, 4), 50.0, np.float32), "w")
    w2 = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w2")
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("Relu", ["m"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w, w2],
    )
    rng = np.random.default_rng(0)
    data = [{"x": rng.normal(size=(2, 4)).astype(np.float32)} for _ in range(4)]
    model, context = run_passes(proto, PREP + ",plan-quantization,calibrate,insert-qdq,check-model",
                                data=data, sentinel_threshold=100.0)
    plan = context.analyses.plan
    assert "sentinel" in plan.float_tensors["r"]
    assert "relu" not in plan.absorbed and "mm2" not in plan.nodes and "mm" in plan.nodes
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, data[0])[0]
    expected = np.maximum(data[0]["x"] @ np.full((4, 4), 50.0, np.float32), 0)
    np.testing.assert_allclose(got, expected, rtol=0.02, atol=1.0)


def test_a_concat_only_float_ops_read_stays_float_and_so_do_the_logits_it_reads():
    """nudenet's YOLOv8 head: Concat(box logits, class logits) -> Split -> Sigmoid (float, after
    a Split the CPU target has no kernel for). Quantized, the Concat put the class logits on the
    box logits' grid (box F1 73 %); unread by any quantized node, it stays float, and so do the
    logits it reads."""
    rng = np.random.default_rng(0)
    w_box = numpy_helper.from_array(rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32), "w_box")
    w_cls = numpy_helper.from_array(rng.normal(0, 0.05, (2, 3, 1, 1)).astype(np.float32) - 1, "w_cls")
    proto = make_model(
        [helper.make_node("Conv", ["x", "w_box"], ["box"], name="box_conv"),
         helper.make_node("Conv", ["x", "w_cls"], ["cls"], name="cls_conv"),
         helper.make_node("Concat", ["box", "cls"], ["both"], name="head_concat", axis=1),
         helper.make_node("Split", ["both", "sizes"], ["box_out", "cls_logits"], name="head_split", axis=1),
         helper.make_node("Sigmoid", ["cls_logits"], ["y"], name="head_sigmoid")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("box_out", TensorProto.FLOAT, [1, 4, 4, 4]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w_box, w_cls, numpy_helper.from_array(np.array([4, 2], np.int64), "sizes")],
    )
    data = [{"x": np.abs(rng.normal(0, 1, (1, 3, 4, 4))).astype(np.float32)} for _ in range(4)]
    _, context = run_passes(proto, PREP + ",plan-quantization,calibrate", data=data)
    plan = context.analyses.plan
    assert {"box_conv", "cls_conv"} <= plan.anchors and "head_concat" not in plan.nodes
    # The Convs keep integer inputs and weights, and write float: a QuantizeLinear there would
    # only round what float data movement reads.
    assert {"box", "cls", "both"}.isdisjoint(plan.activations) and "x" in plan.activations
    assert {w.node for w in plan.weights} == {"box_conv", "cls_conv"}


def test_a_compile_plans_once_and_plans_again_only_when_its_statistics_exclude_a_tensor(monkeypatch, graph_changing_pass):
    """Issue 18: calibrate refines plan-quantization's plan with its statistics instead of building
    it again; a sentinel the statistics reveal is the one reason to plan again (what it excludes
    changes what the nodes around it can be)."""
    import qcompile
    from qcompile.passes import quantization_plan

    calls = []
    build_once = quantization_plan._build_once
    monkeypatch.setattr(quantization_plan, "_build_once", lambda *a, **k: calls.append(1) or build_once(*a, **k))
    qcompile.compile(tiny_cnn(), cnn_batches(4), config={"measure_latency": False})
    assert len(calls) == 1
    calls.clear()
    _, context = run_passes(tiny_cnn(), PREP + ",plan-quantization,calibrate", data=cnn_batches(4))
    assert len(calls) == 1 and context.analyses.plan.activations
    # A sentinel found in calibration: one plan more, without the tensor.
    calls.clear()
    test_sentinel_detected_from_calibration_statistics()
    assert len(calls) == 2
    # A pass between them that changes the graph: the plan is made again for the new graph.
    calls.clear()
    _, context = run_passes(tiny_cnn(), PREP + ",plan-quantization,test-rename-a-node,calibrate", data=cnn_batches(4))
    assert len(calls) == 2 and context.analyses.plan.activations
