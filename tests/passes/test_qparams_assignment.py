"""Issue 18's one-way core: calibrate makes a table, assign-qparams makes the scales, and a graph
change drops the analyses a pass does not preserve."""

import numpy as np
import onnx_ir as ir
import pytest
from conftest import run_passes
from tiny_models import cnn_batches, tiny_cnn

from qcompile.backends import get_target
from qcompile.core.config import CompileConfig
from qcompile.core.context import CompileContext
from qcompile.io.data import BatchSource, input_specs
from qcompile.errors import PipelineError
from qcompile.passes import create_pass
from qcompile.core.pipeline import parse_pipeline, run_pipeline, with_implied_passes
from qcompile.numerics.qparams import bias_qparams, raise_to_floor

PREP = "fix-names,shape-inference,fold-batchnorm,remove-unused"


def _context(model, **config):
    cfg = CompileConfig(**config)
    return CompileContext(config=cfg, target=get_target(cfg.target),
                          data=BatchSource(cnn_batches(4), input_specs(model), max_eval=0))


def test_calibrate_makes_only_the_table_and_assign_qparams_the_scales():
    model = ir.serde.deserialize_model(tiny_cnn())
    context = _context(model)
    model, _ = run_pipeline(model, parse_pipeline(PREP + ",plan-quantization"), context)
    create_pass("calibrate", context, {})(model)
    planned = context.analyses.plan
    assert context.analyses.calibration is not None and context.analyses.calibration.batches == 4
    assert planned.activations and all(q.scale is None for q in planned.activations.values())
    create_pass("assign-qparams", context, {})(model)
    assigned = context.analyses.plan
    assert set(assigned.activations) == set(planned.activations)
    assert all(q.scale is not None and q.scale > 0 for q in assigned.activations.values())


def test_a_pipeline_that_calibrates_runs_assign_qparams_after_calibrate():
    implied = [s.name for s in with_implied_passes(parse_pipeline("plan-quantization,calibrate,insert-qdq"))]
    assert implied == ["plan-quantization", "calibrate", "assign-qparams", "insert-qdq"]
    named = parse_pipeline("plan-quantization,calibrate,bias-correction,assign-qparams(method=minmax),insert-qdq")
    assert with_implied_passes(named) == named  # named once, it runs where the user put it
    assert with_implied_passes(parse_pipeline("fix-names,quantize-weights")) == parse_pipeline("fix-names,quantize-weights")
    # Its option is the run's calibration method, as calibrate(method=...) is.
    _, context = run_passes(tiny_cnn(), PREP + ",plan-quantization,calibrate,assign-qparams(method=minmax),insert-qdq",
                            data=cnn_batches(4))
    assert context.config.calibration_method == "minmax"
    assert context.analyses.plan.applied


def test_a_graph_change_drops_the_analyses_its_pass_does_not_preserve(graph_changing_pass):
    with pytest.raises(PipelineError, match="needs the 'calibration' analysis, which 'test-rename-a-node' dropped"):
        run_passes(tiny_cnn(), PREP + ",plan-quantization,calibrate,test-rename-a-node,assign-qparams,insert-qdq",
                   data=cnn_batches(4))
    # The passes that change weights between calibration and insertion say what they keep.
    _, context = run_passes(tiny_cnn(), PREP + ",plan-quantization,calibrate,assign-qparams,gptq-rounding,bias-correction",
                            data=cnn_batches(4))
    assert context.analyses.plan is not None and context.analyses.calibration is not None
    # insert-qdq applies the plan: the table of the float graph goes, the plan stays as a record
    # through every later graph change (the report reads it).
    _, context = run_passes(tiny_cnn(), PREP + ",plan-quantization,calibrate,insert-qdq,test-rename-a-node",
                            data=cnn_batches(4))
    assert context.analyses.calibration is None and context.analyses.plan.applied


def test_bias_grid_and_raised_weight_scales_come_from_qparams():
    codes, scale = bias_qparams(np.array([0.5, -1.0, 3e9]), np.float32(0.1), np.array([0.01, 0.02, 0.001], np.float32))
    assert scale.dtype == np.float32 and np.allclose(scale, [0.001, 0.002, 0.0001])
    assert codes.dtype == np.int32 and codes[0] == 500 and codes[1] == -500
    assert codes[2] == np.iinfo(np.int32).max  # saturates: callers raise the weight scale first
    raised, count = raise_to_floor(np.array([0.01, 0.02], np.float32), np.array([0.05, 0.0], np.float32))
    assert count == 1 and raised.tolist() == pytest.approx([0.05, 0.02])
    same, none = raise_to_floor(np.array([0.01], np.float32), np.array([0.001], np.float32))
    assert none == 0 and same.tolist() == pytest.approx([0.01])
