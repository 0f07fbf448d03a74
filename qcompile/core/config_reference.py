"""The config's reference, generated from ``CompileConfig`` itself: a JSON Schema and a table.

``qcompile config --schema`` prints the JSON Schema (for editors and CI linters that validate a
``qcompile.toml``), ``qcompile config --reference`` the Markdown table. Descriptions are the
comments above each field in ``qcompile/core/config.py``, so the code is the one place to document a
key; the CLI flag of each key comes from the compile command's parser, so a flag that maps onto no
key (or a key no flag sets) is visible here and in the test that checks the mapping.
"""

from __future__ import annotations

__all__ = ["cli_flags_by_key", "config_schema", "config_reference_markdown", "field_descriptions"]

import dataclasses
import inspect
import json
import typing
from collections.abc import Mapping
from typing import Any

from qcompile.core.config import CompileConfig
from qcompile.numerics.qparams import QUANT_TYPES
from qcompile.numerics.statistics import CALIBRATION_METHODS

# Keys whose values come from a fixed set: the schema lists them.
_ENUMS = {
    "activation_type": sorted(QUANT_TYPES),
    "weight_type": sorted(QUANT_TYPES),
    "calibration_method": sorted(CALIBRATION_METHODS),
}


def field_descriptions() -> dict[str, str]:
    """Field name -> the comment block above it in ``CompileConfig``'s source ('' where none).

    A comment describes the fields that follow it up to the next blank line or comment."""
    lines = inspect.getsource(CompileConfig).splitlines()
    names = {f.name for f in dataclasses.fields(CompileConfig)}
    descriptions, comment, carried = {}, [], ""
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
            carried = ""
            continue
        name = text.split(":", 1)[0].strip() if ":" in text else ""
        if name in names:
            if comment:
                carried = " ".join(comment)
                comment = []
            descriptions[name] = carried
        else:
            comment, carried = [], ""
    return descriptions


def _json_type(annotation: Any) -> dict[str, Any]:
    hint = typing.get_type_hints(CompileConfig)[annotation] if isinstance(annotation, str) else annotation
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        options = [_json_type(a) for a in args if a is not type(None)]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {"anyOf": [schema, {"type": "null"}]} if type(None) in args else schema
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str:
        return {"type": "string"}
    if origin is list:
        return {"type": "array", "items": _json_type(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": _json_type(args[1]) if len(args) > 1 else {}}
    return {}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def config_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) for ``qcompile.toml``: unknown keys are not allowed."""
    hints = typing.get_type_hints(CompileConfig)
    descriptions = field_descriptions()
    properties = {}
    for field in dataclasses.fields(CompileConfig):
        prop = _json_type(hints[field.name])
        if field.name in _ENUMS:
            prop = {"anyOf": [{"enum": _ENUMS[field.name]}, {"type": "null"}]} if "null" in json.dumps(prop) else {"enum": _ENUMS[field.name]}
        prop["default"] = _default(field)
        if descriptions.get(field.name):
            prop["description"] = descriptions[field.name]
        properties[field.name] = prop
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "qcompile.toml",
        "description": "Options of one qcompile compilation (qcompile.CompileConfig). Every compile flag maps onto one key.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def cli_flags_by_key(flag_keys: Mapping[str, str | None]) -> dict[str, list[str]]:
    """Config key -> the ``qcompile compile`` flags that set it, from ``flag_keys`` (flag -> key or
    None: ``qcompile.cli.compile_flag_keys()``, read from the parser itself). The command line
    passes it in: this module is what the CLI's ``config`` command prints, so it does not import
    the CLI back."""
    flags: dict[str, list[str]] = {}
    for flag, key in flag_keys.items():
        if key is not None:
            flags.setdefault(key, []).append(flag)
    return flags


def config_reference_markdown(flag_keys: Mapping[str, str | None]) -> str:
    """The reference table: key, type, default, flag (from ``flag_keys``, see ``cli_flags_by_key``), description."""
    descriptions = field_descriptions()
    flags = cli_flags_by_key(flag_keys)
    rows = ["| key | type | default | flag | description |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(CompileConfig):
        kind = str(field.type).replace(" | ", " or ")
        default = json.dumps(_default(field))
        flag = ", ".join(f"`{f}`" for f in flags.get(field.name, [])) or "(config only)"
        description = descriptions.get(field.name, "").replace("|", "\\|")
        rows.append(f"| `{field.name}` | {kind} | `{default}` | {flag} | {description} |")
    return "\n".join(rows) + "\n"
