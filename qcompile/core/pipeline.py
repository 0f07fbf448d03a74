"""Pipelines as data: a textual form to print and paste, and a runner with timing and dumps.

Text form, as in LLVM's ``opt -passes=``: ``fix-names,shape-inference,calibrate(method=percentile,percentile=99.99)``.
"""

from __future__ import annotations

__all__ = ["IMPLIED_PASSES", "PassSpec", "PassTiming", "format_pipeline", "parse_pipeline", "resolve_config", "run_pipeline",
           "with_implied_passes"]

import ast
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from qcompile import passes as _passes  # noqa: F401  (registers the passes)
from qcompile.core.context import CompileContext
from qcompile.errors import OutputError, PipelineError, QcompileError
from qcompile.io.outputs import rename_together, temp_beside
from qcompile.passes.registry import create_pass, registered_passes

if TYPE_CHECKING:
    from qcompile.core.cache import PipelineCache
    from qcompile.core.config import CompileConfig

logger = logging.getLogger(__name__)

_SPEC = re.compile(r"^\s*([a-z][a-z0-9-]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({','.join(f'{k}={_format_value(v)}' for k, v in self.options)})"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_value(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def parse_pipeline(items: str | Sequence[str]) -> list[PassSpec]:
    """Parse ``"a,b(x=1)"`` or ``["a", "b(x=1)"]`` into pass specs, checking names and options."""
    texts = _split_top_level(items) if isinstance(items, str) else [t for item in items for t in _split_top_level(item)]
    known = registered_passes()
    specs = []
    for text in texts:
        match = _SPEC.match(text)
        if not match:
            raise PipelineError(f"Cannot parse pipeline element {text.strip()!r}; write it as name or name(key=value,...).")
        name, args = match.group(1), match.group(2)
        options = []
        for arg in _split_top_level(args or ""):
            if "=" not in arg:
                raise PipelineError(f"Option {arg.strip()!r} of pass {name!r} must be key=value.")
            key, value = arg.split("=", 1)
            options.append((key.strip(), _parse_value(value)))
        if name in known:
            unknown = {k for k, _ in options} - set(known[name].options)
            if unknown:
                raise PipelineError(
                    f"Pass {name!r} has no option(s) {', '.join(sorted(unknown))}; "
                    f"its options are: {', '.join(known[name].options) or 'none'}."
                )
        specs.append(PassSpec(name, tuple(options)))
    return specs


def resolve_config(specs: Sequence[PassSpec], config: CompileConfig) -> CompileConfig:
    """``config`` with the run-wide settings the pipeline's pass options spell (a pass's
    ``config_options``: ``calibrate(method=percentile)`` is ``calibration_method = "percentile"``).
    A pass option wins over the config's value; two passes that set one key differently are an error."""
    known = registered_passes()
    changes: dict[str, tuple[Any, str]] = {}
    for spec in specs:
        info = known.get(spec.name)
        for option, value in spec.options:
            key = info.config_options.get(option) if info is not None else None
            if key is None:
                continue
            if key in changes and changes[key][0] != value:
                raise PipelineError(
                    f"The pipeline sets {key} twice: {changes[key][1]} and {spec.name}({option}={value}). "
                    "It is one setting for the whole run; give it once."
                )
            changes[key] = (value, f"{spec.name}({option}={value})")
    return config.replace(**{k: v for k, (v, _) in changes.items()}) if changes else config


# Passes a pipeline runs without naming them: pass -> the pass it goes right after. Statistics
# become scales in assign-qparams only, and a pipeline written before that pass existed
# (``plan-quantization,calibrate,insert-qdq``) means the same run.
IMPLIED_PASSES = {"assign-qparams": "calibrate"}


def with_implied_passes(specs: Sequence[PassSpec]) -> list[PassSpec]:
    """``specs`` with each ``IMPLIED_PASSES`` entry right after its pass, where that pass runs and
    the implied one is not named (once named, with options or not, it is where the user put it)."""
    specs = list(specs)
    for implied, after in IMPLIED_PASSES.items():
        names = [s.name for s in specs]
        if after in names and implied not in names:
            specs.insert(names.index(after) + 1, PassSpec(implied))
    return specs


def format_pipeline(specs: Sequence[PassSpec]) -> str:
    return ",".join(str(s) for s in specs)


@dataclasses.dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool
    # The pass cache: "hit" (restored, not run; saved_seconds is what it took when it ran),
    # "stored" (ran, result stored), "ran" (ran, not worth storing) or "off" (no cache).
    cache: str = "off"
    saved_seconds: float = 0.0


def run_pipeline(
    model: ir.Model,
    specs: Sequence[PassSpec],
    context: CompileContext,
    *,
    dump_after: Sequence[str] = (),
    dump_dir: str | Path | None = None,
    cache: PipelineCache | None = None,
) -> tuple[ir.Model, list[PassTiming]]:
    """Run passes in order; time each; save the model after the passes named in ``dump_after``.

    Timing, dumps and the pass cache are instruments around the passes, not code inside them
    (TVM's PassContext instruments). ``dump_after`` takes pass names or ``all``. With ``cache``,
    the run starts after the last pass whose result is cached (never past a pass to dump), and
    stores the results of passes worth keeping (qcompile.core.cache). The config is resolved once
    (``resolve_config``), before the first pass is built, and frozen: no pass writes it. Passes the
    pipeline implies (``IMPLIED_PASSES``) run where ``with_implied_passes`` puts them.
    """
    specs = with_implied_passes(specs)
    context.freeze_config(resolve_config(specs, context.config))
    instances = [create_pass(spec.name, context, dict(spec.options)) for spec in specs]
    dump_all = "all" in dump_after
    unknown_dumps = set(dump_after) - {"all"} - {s.name for s in specs}
    if unknown_dumps:
        raise PipelineError(
            f"--dump-after names {', '.join(sorted(unknown_dumps))}, which the pipeline does not run. "
            f"The pipeline is: {format_pipeline(specs)}"
        )
    timings: list[PassTiming] = []
    first = 0
    keys = cache.keys(specs, context) if cache is not None else []
    if cache is not None:
        dumped = [i for i, s in enumerate(specs) if dump_dir is not None and (dump_all or s.name in dump_after)]
        restored = cache.restore(keys[: min(dumped, default=len(specs))], context)
        if restored is not None:
            last, model, done = restored
            timings = [PassTiming(p["name"], 0.0, p["modified"], "hit", p["seconds"]) for p in done]
            first = last + 1
    passes = registered_passes()
    for index, (spec, instance) in enumerate(zip(specs, instances)):
        if index < first:
            continue
        start = time.perf_counter()
        try:
            result = instance(model)
        except (ir.passes.PreconditionError, ir.passes.PostconditionError, ir.passes.PassError) as error:
            cause = error.__cause__
            if isinstance(cause, QcompileError):
                raise cause from None
            raise PipelineError(f"Pass {spec.name!r} failed: {error}") from None
        model = result.model
        seconds = time.perf_counter() - start
        timings.append(PassTiming(spec.name, seconds, bool(result.modified)))
        if result.modified:
            # LLVM's preserved analyses: a graph change drops what the pass does not say it keeps.
            dropped = context.analyses.invalidate(spec.name, getattr(instance, "preserves", ()))
            if dropped:
                logger.debug("pass %s changed the graph: dropped the %s analyses", spec.name, ", ".join(dropped))
        logger.debug(
            "pass %-20s %7.3fs%s", spec.name, seconds, " (modified)" if result.modified else "",
            extra={"pass": spec.name, "seconds": round(seconds, 6), "modified": bool(result.modified)},
        )
        if cache is not None:
            keep = cache.worth_storing(passes[spec.name].needs_data, seconds)
            timings[-1].cache = "stored" if keep and cache.store(keys[index], model, context, timings) else "ran"
        if dump_dir is not None and (dump_all or spec.name in dump_after):
            directory = Path(dump_dir)
            path = directory / f"{index:02d}-{spec.name}.onnx"
            tmp, created = None, not directory.exists()
            try:
                directory.mkdir(parents=True, exist_ok=True)
                # Through a temp file: a full disk leaves no 0-byte or partial dump behind.
                tmp = temp_beside(path)
                ir.save(model, tmp)
                rename_together([(tmp, path)])
            except OSError as error:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                if created:
                    with contextlib.suppress(OSError):
                        directory.rmdir()  # the folder this failed dump made, if nothing else is in it
                raise OutputError(f"Cannot write the dump {str(path)!r}: {error.strerror or error}.") from None
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
            logger.info("wrote %s", path)
    return model, timings
