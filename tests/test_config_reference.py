"""The config reference is generated from CompileConfig, and every compile flag maps onto one key."""

import dataclasses
import json

import pytest

from qcompile.cli import compile_flag_keys, main
from qcompile.core.config import CompileConfig
from qcompile.core.config_reference import config_reference_markdown, config_schema, field_descriptions

FIELDS = {f.name for f in dataclasses.fields(CompileConfig)}


def _valid(value, schema) -> bool:
    """Enough of JSON Schema for the shapes config_schema writes."""
    if "anyOf" in schema:
        return any(_valid(value, option) for option in schema["anyOf"])
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    checks = {
        "null": value is None, "boolean": isinstance(value, bool), "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "array": isinstance(value, list) and all(_valid(v, schema.get("items", {})) for v in value or []),
        "object": isinstance(value, dict)
        and all(_valid(v, schema.get("additionalProperties", {})) for v in value.values()),
    }
    return checks.get(kind, True)


def test_every_compile_flag_is_a_config_key_or_a_run_option():
    keys = compile_flag_keys()  # raises for a flag in neither table
    mapped = {flag: key for flag, key in keys.items() if key is not None}
    assert set(mapped.values()) <= FIELDS
    # One to one: no two flags set the same key.
    assert len(set(mapped.values())) == len(mapped), mapped
    assert keys["--calibration-method"] == "calibration_method" and keys["--calib"] is None


def test_every_key_is_described_and_the_schema_accepts_the_defaults():
    descriptions = field_descriptions()
    assert {k for k, v in descriptions.items() if v} == FIELDS
    schema = config_schema()
    assert schema["additionalProperties"] is False and set(schema["properties"]) == FIELDS
    for name, prop in schema["properties"].items():
        assert _valid(prop["default"], prop), name
    assert schema["properties"]["calibration_method"]["enum"] == sorted(["mse", "minmax", "percentile", "entropy", "auto"])
    # A wrong type is rejected by the schema as by the loader.
    assert not _valid("3", schema["properties"]["threads"]) and not _valid(None, schema["properties"]["threads"])


def test_reference_table_names_flags_and_config_only_keys():
    table = config_reference_markdown(compile_flag_keys())
    assert "| `calibration_method` | str | `\"mse\"` | `--calibration-method` |" in table
    assert "| `sentinel_threshold` | float |" in table and "(config only)" in table
    assert len([line for line in table.splitlines() if line.startswith("| `")]) == len(FIELDS)


def test_config_command_checks_a_toml(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('calibration_method = "percentile"\nmax_loss = "1%"\n')
    assert main(["config", "--check", str(good)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["calibration_method"] == "percentile" and shown["threads"] == 0 and shown["max_loss"] == "1%"
    bad = tmp_path / "bad.toml"
    bad.write_text('calibraton_method = "percentile"\n')
    assert main(["config", "--check", str(bad)]) == 2
    assert "Did you mean 'calibration_method'" in capsys.readouterr().err
    assert main(["config", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "qcompile.toml"


@pytest.mark.parametrize("value", ["1%", 0.01])
def test_max_loss_takes_a_percentage_or_a_fraction(value):
    assert CompileConfig.from_dict({"max_loss": value}).max_loss == value
