"""Pipelines as text: parse, print, round-trip, and clear errors."""

import pytest

from qcompile.backends import get_target
from qcompile.errors import PipelineError
from qcompile.pipeline import format_pipeline, parse_pipeline


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
