"""Recipes expand to ordinary pipelines; llm-int4 compiles a tiny language model end to end."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from qcompile.backends import get_target
from tiny_models import VOCAB, tiny_lm

import qcompile
from qcompile.errors import ConfigError
from qcompile.core.recipes import RECIPES, pipeline_for


def _ids(count, seed=1):
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, VOCAB, (2, 16)).astype(np.int64)} for _ in range(count)]


def test_llm_int4_compiles_every_weight_and_reports_it(tmp_path):
    result = qcompile.compile(tiny_lm(), _ids(6), config={"recipe": "llm-int4", "measure_latency": False})
    report = result.report.to_dict()
    assert report["pipeline"] == ",".join(RECIPES["llm-int4"]).replace(", ", ",")
    weights = report["transformations"]["quantize-weights"]
    assert {r["bits"] for name, r in weights["weights"].items() if name != "lm_head"} == {4}
    assert weights["weights"]["lm_head"]["bits"] == 8 and weights["left_float"] == {}
    assert set(weights["tables"]) == {"embed"}
    path = tmp_path / "lm.int4.onnx"
    result.save(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(path)).graph.node) == 3
    assert session.run(None, _ids(1, seed=4)[0])[0].shape == (2, 16, VOCAB)


def test_a_recipe_and_a_pipeline_together_are_refused():
    with pytest.raises(ConfigError, match="not both"):
        pipeline_for(["fix-names"], "llm-int4", get_target("cpu"))


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ConfigError, match="llm-int4"):
        pipeline_for(None, "llm-int3", get_target("cpu"))


def test_w8a8_is_the_targets_pipeline_with_smooth_quant():
    pipeline = pipeline_for(None, "llm-w8a8", get_target("cpu"))
    assert "smooth-quant" in pipeline and "calibrate" in pipeline


def test_accuracy_switches_add_their_passes_where_the_table_says():
    from qcompile.core.config import CompileConfig

    config = CompileConfig(cross_layer_equalization=True, bias_correction=True, adaround=True)
    pipeline = pipeline_for(None, None, get_target("cpu"), config)
    default = list(get_target("cpu").default_pipeline)
    assert [p for p in pipeline if p not in ("cross-layer-equalization", "adaround", "bias-correction")] == default
    order = [pipeline.index(name) for name in ("fold-batchnorm", "cross-layer-equalization", "plan-quantization",
                                               "calibrate", "adaround", "bias-correction", "insert-qdq")]
    assert order == sorted(order)
    # Off (the default): the pipeline is untouched; a pass the pipeline already names is not added twice.
    assert pipeline_for(None, None, get_target("cpu"), CompileConfig()) == default
    explicit = ["plan-quantization", "calibrate", "bias-correction(batches=2)", "insert-qdq"]
    assert pipeline_for(explicit, None, get_target("cpu"), CompileConfig(bias_correction=True)) == explicit


def test_an_accuracy_switch_on_a_pipeline_without_its_place_is_refused():
    from qcompile.core.config import CompileConfig

    with pytest.raises(ConfigError, match="bias_correction = true adds 'bias-correction' before 'insert-qdq'"):
        pipeline_for(None, "llm-int4", get_target("cpu"), CompileConfig(bias_correction=True))


def test_llm_fp8_quantizes_activations_and_weights_to_fp8():
    result = qcompile.compile(tiny_lm(), _ids(6), config={"recipe": "llm-fp8", "measure_latency": False})
    assert "plan-quantization(activation_type=float8e4m3fn,weight_type=float8e4m3fn)" in result.report.pipeline
    proto = result.to_proto()
    float8 = onnx.TensorProto.FLOAT8E4M3FN
    quantizers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers and all(
        next(a.i for a in n.attribute if a.name == "output_dtype") == float8 for n in quantizers
    )
    assert any(t.data_type == float8 for t in proto.graph.initializer)  # FP8 weights
    assert min(o["sqnr_db"] for o in result.report.evaluation["outputs"].values()) > 15


def test_llm_fp8_upgrades_an_older_opset_to_the_one_fp8_needs():
    model = tiny_lm()
    model = onnx.version_converter.convert_version(model, 17)
    result = qcompile.compile(model, _ids(4), config={"recipe": "llm-fp8", "measure_latency": False})
    assert result.model.opset_imports[""] >= 21
