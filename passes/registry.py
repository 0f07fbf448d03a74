"""The table of passes a pipeline can name: ``register_pass`` adds one, ``create_pass`` builds it."""

from __future__ import annotations

__all__ = ["register_pass", "create_pass", "registered_passes", "PassInfo"]

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import onnx_ir as ir

from qcompile.errors import PipelineError


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    factory: Callable[..., ir.passes.PassBase]
    summary: str
    options: dict[str, Any]  # option name -> default
    needs_data: bool = False  # runs the model on calibration data (skipped by `qcompile inspect`)
    # Options that are run-wide settings, each another spelling of one CompileConfig key (option ->
    # key): the pipeline writes them into the config once, before any pass is built
    # (qcompile.core.pipeline.resolve_config); the pass reads them from the config, as every pass does.
    config_options: Mapping[str, str] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, *, needs_data: bool = False, config_options: Mapping[str, str] | None = None):
    """Class decorator: make a pass available to pipelines under ``name``.

    The class is built as ``cls(context, **options)``; its keyword-only ``__init__`` parameters
    are its options, and the first line of its docstring is its summary. ``config_options`` names
    the options that set a config key for the whole run (``calibrate(method=...)`` is
    ``calibration_method``); the pass must not act on them itself: by the time it is built, the
    config holds them.
    """

    def decorate(cls):
        signature = inspect.signature(cls.__init__)
        options = {
            p.name: p.default
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        summary = (inspect.getdoc(cls) or "").splitlines()[0]
        declared = dict(config_options or {})
        missing = set(declared) - set(options)
        if missing:
            raise TypeError(f"pass {name!r}: config_options {sorted(missing)} are not options of {cls.__name__}")
        _REGISTRY[name] = PassInfo(name, cls, summary, options, needs_data, declared)
        cls.pass_name = name
        return cls

    return decorate


def registered_passes() -> dict[str, PassInfo]:
    return dict(sorted(_REGISTRY.items()))


def create_pass(name: str, context, options: dict[str, Any]) -> ir.passes.PassBase:
    info = _REGISTRY.get(name)
    if info is None:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PipelineError(
            f"Unknown pass {name!r}.{hint} `qcompile passes` lists the passes a pipeline can use."
        )
    unknown = set(options) - set(info.options)
    if unknown:
        allowed = ", ".join(info.options) or "none"
        raise PipelineError(
            f"Pass {name!r} has no option(s) {', '.join(sorted(unknown))}; its options are: {allowed}."
        )
    return info.factory(context, **options)
