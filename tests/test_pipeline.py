"""Pipelines as text: parse, print, round-trip, and clear errors."""

import pytest

from qcompile.backends import get_target
from qcompile.errors import PipelineError
from qcompile.core.pipeline import format_pipeline, parse_pipeline


def test_round_trip_of_the_default_pipeline():
    text = ",".join(get_target("cpu").default_pipeline)
    assert format_pipeline(parse_pipeline(text)) == text


def test_options_are_parsed_and_printed():
    specs = parse_pipeline("calibrate(method=percentile,percentile=99.99),fold-constants(output_size_limit=10)")
    assert dict(specs[0].options) == {"method": "percentile", "percentile": 99.99}
    assert format_pipeline(specs) == "calibrate(method=percentile,percentile=99.99),fold-constants(output_size_limit=10)"


def test_list_form_equals_text_form():
    assert parse_pipeline(["fix-names", "calibrate(method=mse)"]) == parse_pipeline("fix-names,calibrate(method=mse)")


def test_unknown_option_is_named():
    with pytest.raises(PipelineError, match="no option"):
        parse_pipeline("calibrate(methd=mse)")


def test_malformed_element():
    with pytest.raises(PipelineError, match="Cannot parse"):
        parse_pipeline("calibrate(method=mse")


def test_the_config_is_resolved_once_before_the_first_pass_and_no_pass_writes_it(monkeypatch):
    """Issue 18: run-wide pass options (calibrate(method=...), plan-quantization(activation_type=...))
    are written into the config before any pass is built; a pass that writes the config fails."""
    import onnx_ir as ir
    from conftest import run_passes
    from tiny_models import cnn_batches, tiny_cnn

    from qcompile.core.config import CompileConfig
    from qcompile.passes import registry
    from qcompile.passes.registry import register_pass
    from qcompile.core.pipeline import resolve_config

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the test's passes go with it
    seen = []

    @register_pass("test-reads-config")
    class ReadsConfig(ir.passes.InPlacePass):
        def __init__(self, context):
            super().__init__()
            self.context = context
            seen.append(context.config.calibration_method)  # at construction: already resolved

        def call(self, model):
            return ir.passes.PassResult(model, False)

    @register_pass("test-writes-config")
    class WritesConfig(ReadsConfig):
        def call(self, model):
            self.context.config = self.context.config.replace(percentile=99.0)
            return ir.passes.PassResult(model, False)

    pipeline = "test-reads-config,shape-inference,plan-quantization,calibrate(method=percentile,percentile=99.9),insert-qdq"
    _, context = run_passes(tiny_cnn(), pipeline, data=cnn_batches(2))
    assert seen == ["percentile"]
    assert context.config.calibration_method == "percentile" and context.config.percentile == 99.9
    with pytest.raises(PipelineError, match="no pass writes it"):
        run_passes(tiny_cnn(), "test-writes-config")
    config = CompileConfig()
    with pytest.raises(PipelineError, match="sets calibration_method twice"):
        resolve_config(parse_pipeline("calibrate(method=mse),calibrate(method=minmax)"), config)
    assert resolve_config(parse_pipeline("calibrate(percentile=99.5)"), config).percentile == 99.5
    assert config.percentile != 99.5  # a new config; the given one is not modified
