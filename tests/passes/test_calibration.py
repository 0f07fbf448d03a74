"""Calibration: streaming memory, determinism, mergeable shards, and ranges checked against numpy."""

import tracemalloc

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from conftest import run_passes
from onnx import TensorProto, helper
from tiny_models import make_model, tiny_cnn

from qcompile.passes.calibration import collect_statistics


def _model():
    return ir.serde.deserialize_model(tiny_cnn())


def _batches(count, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):  # a generator: calibration must never need the whole list
        yield {"x": rng.normal(0, 1, (4, 3, 16, 16)).astype(np.float32)}


TENSORS = ["r1", "c3", "sum"]


def _peak_bytes(count):
    tracemalloc.start()
    collect_statistics(_model(), TENSORS, _batches(count))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_peak_memory_does_not_grow_with_the_number_of_batches():
    small, large = _peak_bytes(16), _peak_bytes(512)
    assert large <= 1.10 * small, (small, large)


def test_minmax_matches_a_direct_computation():
    table = collect_statistics(_model(), TENSORS, _batches(6))
    proto = tiny_cnn()
    del proto.graph.output[:]
    proto.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in TENSORS)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as calibration runs
    session = ort.InferenceSession(proto.SerializeToString(), options)
    outs = [session.run(TENSORS, b) for b in _batches(6)]
    for i, name in enumerate(TENSORS):
        values = np.concatenate([o[i].ravel() for o in outs])
        assert table[name].range("minmax", 256) == (float(values.min()), float(values.max()))


def test_same_data_gives_identical_statistics():
    a = collect_statistics(_model(), TENSORS, _batches(5))
    b = collect_statistics(_model(), TENSORS, _batches(5))
    for name in TENSORS:
        np.testing.assert_array_equal(a[name].counts, b[name].counts)


def test_shards_merge_into_the_single_pass_result():
    batches = list(_batches(8))
    whole = collect_statistics(_model(), TENSORS, batches)
    first = collect_statistics(_model(), TENSORS, batches[5:])
    second = collect_statistics(_model(), TENSORS, batches[:5])
    merged = first.merge(second)
    assert merged.batches == whole.batches
    for name in TENSORS:
        assert merged[name].range("minmax", 256) == whole[name].range("minmax", 256)
        np.testing.assert_array_equal(merged[name].counts, whole[name].counts)


def test_calibrate_pass_uses_the_configured_method():
    data = list(_batches(4))
    _, minmax = run_passes(tiny_cnn(), "fix-names,shape-inference,plan-quantization,calibrate", data=data)
    _, pct = run_passes(tiny_cnn(), "fix-names,shape-inference,plan-quantization,calibrate(method=percentile,percentile=99.0)", data=data)
    a, b = minmax.analyses.plan.activations["x"], pct.analyses.plan.activations["x"]
    assert b.rmax < a.rmax and b.rmin > a.rmin


def test_batches_cut_into_chunks_give_the_statistics_of_whole_batches():
    batches = list(_batches(3))  # 4 samples each
    whole = collect_statistics(_model(), TENSORS, batches, chunk=0)
    chunked = collect_statistics(_model(), TENSORS, batches, chunk=1)
    for name in TENSORS:
        assert chunked[name].range("minmax", 256) == whole[name].range("minmax", 256)
        # Histograms: the same values in other runs; only float summation order could differ.
        assert chunked[name].count == whole[name].count
        assert np.abs(chunked[name].counts - whole[name].counts).sum() <= 0.001 * whole[name].count


def test_a_model_that_mixes_samples_is_calibrated_on_whole_batches():
    # y = x - mean over the batch axis: each sample's output depends on the others.
    proto = make_model(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), helper.make_node("Sub", ["x", "m"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [],
    )
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(0, 1, (4, 8)).astype(np.float32) + np.arange(4, dtype=np.float32)[:, None]}]
    model = ir.serde.deserialize_model(proto)
    whole = collect_statistics(model, ["y"], batches, chunk=0)
    chunked = collect_statistics(model, ["y"], batches, chunk=2)
    assert chunked["y"].range("minmax", 256) == whole["y"].range("minmax", 256)


def test_a_model_with_a_fixed_batch_size_is_calibrated_on_whole_batches():
    """Found by the ONNX test-model sweep (pytorch-converted/test_LogSoftmax, input [10, 20]): a
    batch of 10 cut into chunks of 8 did not fit the model's fixed first dimension."""
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 4])],
        [],
    )
    batch = {"x": np.random.default_rng(0).normal(0, 1, (10, 4)).astype(np.float32)}
    table = collect_statistics(ir.serde.deserialize_model(proto), ["y"], [batch], chunk=8)
    assert table["y"].count == 40 and table["y"].max == batch["x"].max()
