"""Many-model builds: compile every (model, target) a build file lists, each as its own executor task.

A build file is TOML::

    out_dir = "dist"                  # optional; default: <build file stem>-build/ beside the file

    [defaults]                        # optional: CompileConfig keys for every entry
    calibration_method = "mse"        #   (or: defaults = "qcompile.toml", a config file)
    min_sqnr = 20

    [[model]]
    name = "digits"                   # optional; default: the model file's stem
    model = "models/digits.onnx"      # required
    calib = "data/digits/"            # calibration data: a directory of .npz batches
    eval = "data/digits-eval/"        # optional held-out evaluation data
    targets = ["cpu", "qnn-htp"]      # or target = "cpu"; default: the config's target, else cpu
    config = { activation_type = "uint16" }   # optional CompileConfig keys, or a qcompile.toml path

Relative paths (model, calib, eval, out_dir, a config file, and the config keys metric,
ep_context_path and cache_dir) are relative to the build file. An entry's config is, key by key:
CompileConfig's defaults, then ``[defaults]``, then the entry's ``config``, then the target. Each
(model, target) pair is one entry, compiled by ``build_entry`` in a worker of the executor, in its
own process only (no nested executor: ``executor``, ``workers`` and ``ray_address`` in a build's
configs are ignored; the build's executor is the one ``build`` is given). It writes
``OUT_DIR/<name>.<target>.onnx`` and ``OUT_DIR/<name>.<target>.report.json`` and sends back plain
data: status, exit code, paths, seconds, worst output SQNR, sizes, error message. Workers read the
model and the data from their paths, so a Ray cluster needs the build's files (and ``OUT_DIR``) on a
file system every node sees.

The whole file is checked before anything compiles (unknown keys, missing files, bad targets,
configs and pipelines, two entries writing one output): a ``ConfigError`` names the entry and the fix.
One entry's failure does not stop the others. Its exit code is recorded: 0 ok, 3 accuracy gate
failed (the report is written, the model is not, as ``qcompile compile`` does; an accuracy search
writes the best model it found), 2 bad input (a ``QcompileError``: the message says what to fix),
1 an internal error (a bug; the traceback is in the build report). The build's exit code is the
worst entry's, in order of severity 0 < 3 < 2 < 1: an entry that missed its accuracy target was
compiled and measured (its report says by how much), one with bad input gave nothing, and a bug is
worth reporting above everything else. ``OUT_DIR/build-report.json`` lists every entry and a
summary. An entry's outputs from an earlier build are removed before this build compiles it, so no
model from an earlier build is left beside this build's report to be shipped by mistake. A worker
that keeps dying (out of memory) is the executor's ``ExecutorError``: it stops the build (exit 2)
without a build report; the entries finished by then keep their files.
"""

from __future__ import annotations

__all__ = ["BuildEntry", "BuildPlan", "BuildReport", "build", "build_entry", "load_build_file", "worst_exit_code"]

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qcompile.analysis.accuracy_search import compile_within_budget
from qcompile.api import compile as compile_model
from qcompile.backends import get_target
from qcompile.core.config import CompileConfig, read_toml
from qcompile.errors import AccuracyGateError, ConfigError, OutputError, QcompileError, detail
from qcompile.scaleout.executors import Executor, InProcessExecutor, make_executor
from qcompile.io.outputs import report_path_for, write_text_atomically
from qcompile.passes.registry import registered_passes
from qcompile.core.pipeline import parse_pipeline
from qcompile.core.recipes import pipeline_for

logger = logging.getLogger(__name__)

TOP_KEYS = ("out_dir", "defaults", "model")
ENTRY_KEYS = ("name", "model", "calib", "eval", "target", "targets", "config")
# Where the build runs is the build's choice; each entry compiles in its worker's own process.
_EXECUTOR_KEYS = ("executor", "workers", "ray_address")
# Config keys that hold paths, resolved against the build file like the entry's own paths.
_PATH_KEYS = ("ep_context_path", "cache_dir")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

# Exit codes from least to most severe: ok, accuracy gate failed, bad input, internal error.
SEVERITY = (0, 3, 2, 1)
STATUS = {0: "ok", 3: "accuracy-gate-failed", 2: "error", 1: "internal-error"}


def worst_exit_code(codes) -> int:
    """The most severe of ``codes`` (0 < 3 < 2 < 1); 0 for none. An unknown code counts as a bug's."""
    return max(codes, key=lambda code: SEVERITY.index(code) if code in SEVERITY else len(SEVERITY), default=0)


@dataclasses.dataclass(frozen=True)
class BuildEntry:
    """One (model, target) of a build file, checked, with absolute paths: what a worker is sent."""

    where: str  # "models.toml, [[model]] #2 (digits)": names the entry in messages
    name: str
    target: str
    model: str
    calib: str | None
    eval: str | None
    config: dict[str, Any]  # CompileConfig.to_dict(), target included
    output: str
    report: str


@dataclasses.dataclass
class BuildPlan:
    """A build file, checked: its entries in file order (each model's targets in the order given)."""

    build_file: Path
    out_dir: Path
    entries: list[BuildEntry]


@dataclasses.dataclass
class BuildReport:
    """What a build did: one dict per entry (``build_entry``'s) and the summary."""

    build_file: str
    out_dir: str
    path: str  # build-report.json
    entries: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return self.summary["exit_code"]

    def to_dict(self) -> dict[str, Any]:
        return {"build_file": self.build_file, "out_dir": self.out_dir, "entries": self.entries,
                "summary": self.summary}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def lines(self) -> list[str]:
        """One line per entry and the summary line, as ``qcompile build`` prints them."""
        lines = []
        width = max((len(f"{e['name']}.{e['target']}") for e in self.entries), default=0)
        for e in self.entries:
            label = f"{e['name']}.{e['target']}".ljust(width)
            head = f"{e['status']:<20} {label}  {e['seconds']:6.1f} s"
            if e["exit_code"] in (0, 3) and e["size"]:
                sqnr = e["min_sqnr_db"]
                sqnr_text = "-" if sqnr is None else f"{sqnr:.2f} dB" if isinstance(sqnr, float) else f"{sqnr} dB"
                head += (f"  SQNR {sqnr_text}  {_kb(e['size']['float_bytes'])} -> "
                         f"{_kb(e['size']['quantized_bytes'])}")
            if e["output"]:
                head += f"  {_shown(e['output'])}"
            if e["error"] and e["exit_code"] == 3:
                head += f"  ({'the best model found' if e['output'] else 'model not written'}: {e['error']})"
            elif e["error"]:
                head += f"  ({e['error']})"
            lines.append(head)
        s = self.summary
        counts = ", ".join(f"{count} {status}" for status, count in s["by_status"].items())
        executor = s["executor"]
        where = executor["executor"] + (f", {executor['workers']} workers" if executor["executor"] != "inprocess" else "")
        lines.append(f"build: {s['entries']} entries ({counts}) in {s['seconds']:.1f} s on {where}; "
                     f"exit code {s['exit_code']}; wrote {_shown(self.path)}")
        return lines


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it is under it (shorter to read), else as is."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _kb(size: int) -> str:
    return f"{size / 1024:.1f} KB" if size < 1024 * 1024 else f"{size / (1024 * 1024):.1f} MB"


# ----- the build file -----

def load_build_file(build_file: str | Path, out_dir: str | Path | None = None, *, cache: bool | None = None) -> BuildPlan:
    """Read and check ``build_file`` (see the module docstring); compiles nothing, writes nothing.

    ``out_dir`` (relative to the working directory) overrides the file's ``out_dir``. ``cache``: the
    pass cache setting of entries whose config leaves ``cache`` unset (the CLI gives True, as for
    ``qcompile compile``; None leaves them as the Python API's default, off)."""
    path = Path(build_file)
    values = read_toml(path, "Build file")
    base = path.parent
    _check_keys(values, TOP_KEYS, f"build file {str(path)!r}")
    if out_dir is not None:
        out = Path(out_dir).expanduser().absolute()
    elif "out_dir" in values:
        if not isinstance(values["out_dir"], str) or not values["out_dir"]:
            raise ConfigError(f"out_dir in {str(path)!r} must be a folder path (a string), got {values['out_dir']!r}.")
        out = _resolve(base, values["out_dir"])
    else:
        out = (base / f"{path.stem}-build").absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"The build's output folder {str(out)!r} is a file; give -o a folder (or set out_dir).")
    defaults = _config_values(values.get("defaults", {}), base, f"[defaults] in {str(path)!r}", "defaults")
    models = values.get("model")
    if models is None:
        raise ConfigError(
            f"Build file {str(path)!r} lists no models: add a [[model]] table for each, e.g.\n"
            '[[model]]\nmodel = "model.onnx"\ncalib = "calib/"'
        )
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ConfigError(f"model in {str(path)!r} must be tables written [[model]] (double brackets), one per model.")
    entries: list[BuildEntry] = []
    seen: dict[tuple[str, str], str] = {}
    for number, table in enumerate(models, 1):
        for entry in _entries_of(table, number, path, base, out, defaults, cache):
            key = (entry.name, entry.target)
            if key in seen:
                raise ConfigError(
                    f"{entry.where} and {seen[key]} both write {entry.name}.{entry.target}.onnx (name "
                    f"{entry.name!r}, target {entry.target!r}): give one of them another name = \"...\"."
                )
            seen[key] = entry.where
            entries.append(entry)
    return BuildPlan(build_file=path.absolute(), out_dir=out, entries=entries)


def _check_keys(values: Mapping, known: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(known)}.")


def _resolve(base: Path, value: str) -> Path:
    """``value`` relative to ``base`` (the build file's folder), absolute; ~ expanded."""
    path = Path(value).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else base / path))


def _config_values(value: Any, base: Path, where: str, key: str) -> dict[str, Any]:
    """The CompileConfig keys a table gives, or a qcompile.toml path names, checked on their own
    (so an unknown key is reported where it is written) and with their paths resolved."""
    if isinstance(value, str):
        config_path = _resolve(base, value)
        values = read_toml(config_path, "Config file")
        CompileConfig.from_dict(values, source=str(config_path))  # as load_config checks it: errors name the file
        base, where = config_path.parent, f"config file {str(config_path)!r}"
    elif isinstance(value, dict):
        values = dict(value)
        CompileConfig.from_dict(values, source=where)
    else:
        raise ConfigError(f"{key} in {where} must be a table of CompileConfig keys or a path to a qcompile.toml, "
                          f"got {value!r}.")
    for name in _PATH_KEYS:
        if values.get(name):
            values[name] = str(_resolve(base, values[name]))
    metric = values.get("metric")
    if metric:
        module, sep, function = metric.rpartition(":")
        if sep and (module.endswith(".py") or "/" in module or "\\" in module):
            values["metric"] = f"{_resolve(base, module)}:{function}"
    return values


def _entries_of(table: dict, number: int, path: Path, base: Path, out: Path, defaults: dict,
                cache: bool | None) -> list[BuildEntry]:
    """The entries of one [[model]] table: one per target."""
    where = f"{path.name}, [[model]] #{number}"
    _check_keys(table, ENTRY_KEYS, where)
    if not isinstance(table.get("model"), str) or not table["model"]:
        raise ConfigError(f"{where} has no model: add model = \"path/to/model.onnx\" (relative to {path.name}).")
    model = _resolve(base, table["model"])
    name = table.get("name", model.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: name = {name!r} must start with a letter or digit, then letters, digits, '.', "
            "'_', '+' or '-': it names the output files. Set name = \"...\" to such a name."
        )
    where = f"{where} ({name})"
    if not model.is_file():
        raise ConfigError(f"{where}: model {table['model']!r} does not exist (looked for {str(model)!r}). "
                          f"Fix the path; relative paths are relative to {path.name}.")
    data = {}
    for key in ("calib", "eval"):
        value = table.get(key)
        if value is None:
            data[key] = None
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key} must be a path (a string), got {value!r}.")
        resolved = _resolve(base, value)
        if not resolved.exists():
            raise ConfigError(f"{where}: {key} {value!r} does not exist (looked for {str(resolved)!r}). Fix the path "
                              f"to the directory of .npz batches; relative paths are relative to {path.name}.")
        data[key] = str(resolved)
    if "target" in table and "targets" in table:
        raise ConfigError(f"{where} gives both target and targets: keep one (targets = [\"cpu\", \"qnn-htp\"]).")
    values = {**defaults, **_config_values(table.get("config", {}), base, f"the config of {where}", "config")}
    targets = table.get("targets", [table["target"]] if "target" in table else [values.get("target", "cpu")])
    if (not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"{where}: targets must be a list of target names, e.g. targets = [\"cpu\"]; got {targets!r}.")
    duplicates = sorted(t for t, count in Counter(targets).items() if count > 1)
    if duplicates:
        raise ConfigError(f"{where} lists target {duplicates[0]!r} twice; list each target once.")
    for key in _EXECUTOR_KEYS:
        values.pop(key, None)
    if cache is not None and values.get("cache") is None:
        values["cache"] = cache
    entries = []
    for target in targets:
        try:
            target_spec = get_target(target)
            config = CompileConfig.from_dict({**values, "target": target}, source=f"the config of {where}")
            _check_pass_names(parse_pipeline(pipeline_for(config.pipeline, config.recipe, target_spec, config)))
        except QcompileError as error:
            raise ConfigError(f"{where}, target {target!r}: {detail(error, 1000)}") from None
        output = out / f"{name}.{target}.onnx"
        if output == model:
            raise ConfigError(f"{where}: the output {str(output)!r} would overwrite the model; give the build "
                              "another output folder (-o) or the entry another name.")
        entries.append(BuildEntry(
            where=where, name=name, target=target, model=str(model),
            calib=data["calib"], eval=data["eval"], config=config.to_dict(), output=str(output),
            report=str(report_path_for(output)),  # OUT_DIR/<name>.<target>.report.json
        ))
    return entries


def _check_pass_names(specs) -> None:
    """parse_pipeline checks options; an unknown pass name is otherwise found only when it runs."""
    known = registered_passes()
    for spec in specs:
        if spec.name not in known:
            close = difflib.get_close_matches(spec.name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown pass {spec.name!r} in the pipeline.{hint} `qcompile passes` lists the "
                              "passes a pipeline can use.")


# ----- one entry, in a worker -----

def build_entry(entry: BuildEntry, shared: Any, threads: int) -> dict[str, Any]:
    """Compile one entry with the executor "inprocess" and ``threads`` ORT threads (unless its config
    sets threads), write its model and report atomically, and return plain data. Every error is
    caught and returned: one entry's failure is recorded for it, never raised into the build."""
    start = time.perf_counter()
    outcome: dict[str, Any] = {
        "name": entry.name, "target": entry.target, "model": entry.model, "status": None, "exit_code": None,
        "output": None, "report": None, "seconds": None, "min_sqnr_db": None, "size": {}, "error": None,
    }
    try:
        config = CompileConfig.from_dict(entry.config)
        config = config.replace(executor="inprocess", workers=0, ray_address=None, threads=config.threads or threads)
        result, missed = _compile(entry, config)
        if missed is None or _searched(config):
            # An accuracy search writes the best model it found even when it missed the budget.
            result.save(entry.output, report_path=entry.report)
            outcome["output"] = entry.output
        else:
            # As `qcompile compile`: the report says how far it missed; no model, so nothing ships it.
            write_text_atomically(Path(entry.report), result.report.to_json())
        outcome.update(report=entry.report, **_measures(result))
        code, message = (0, None) if missed is None else (missed.exit_code, detail(missed, 1000))
    except QcompileError as error:
        code, message = error.exit_code, detail(error, 1000)
    except Exception as error:  # noqa: BLE001 - a bug in one entry is recorded; the others go on
        code, message = 1, f"internal error (a bug in qcompile): {type(error).__name__}: {detail(error, 1000)}"
        outcome["traceback"] = traceback.format_exc()
    outcome.update(status=STATUS.get(code, STATUS[1]), exit_code=code, error=message,
                   seconds=round(time.perf_counter() - start, 3))
    return outcome


def _searched(config) -> bool:
    return bool(config.search or config.max_loss is not None or config.metric or config.time_budget is not None)


def _compile(entry: BuildEntry, config):
    """(result, None), or (result, the AccuracyGateError) when it missed its accuracy target."""
    try:
        if _searched(config):
            if config.max_loss is None and config.min_sqnr is None:
                raise ConfigError("The accuracy search needs a budget: max_loss (with or without a metric) or min_sqnr.")
            result, _ = compile_within_budget(
                entry.model, entry.calib, config=config, eval_data=entry.eval,
                max_loss=None if config.max_loss is None else str(config.max_loss), metric=config.metric,
                min_sqnr=None if config.max_loss is not None else config.min_sqnr,
                time_budget=config.time_budget, executor=InProcessExecutor(),
            )
        else:
            result = compile_model(entry.model, entry.calib, config=config, eval_data=entry.eval)
    except AccuracyGateError as missed:
        if getattr(missed, "result", None) is None:
            raise
        return missed.result, missed
    return result, None


def _measures(result) -> dict[str, Any]:
    sqnrs = [float(m["sqnr_db"]) for m in result.report.evaluation.get("outputs", {}).values()]
    worst = min(sqnrs) if sqnrs else None
    if worst is not None and not math.isfinite(worst):
        worst = str(worst)  # JSON has no inf: "inf" as report.json writes it
    elif worst is not None:
        worst = round(worst, 4)
    size = result.report.size
    return {"min_sqnr_db": worst,
            "size": {"float_bytes": int(size.get("float_bytes", 0)), "quantized_bytes": int(size.get("quantized_bytes", 0))}}


# ----- the build -----

def build(build_file: str | Path, out_dir: str | Path | None = None, *, executor: Executor | str | None = None,
          workers: int = 0, ray_address: str | None = None, cache: bool | None = None) -> BuildReport:
    """Compile every entry of ``build_file`` on ``executor`` and write ``OUT_DIR/build-report.json``.

    ``executor``: an ``Executor`` (used, and left open for the caller), or its name (``inprocess``,
    the default; ``local`` with ``workers`` processes; ``ray`` at ``ray_address``), made after the
    build file has been checked and closed at the end. ``cache``: see ``load_build_file``. Raises
    ``ConfigError`` for a bad build file before anything compiles; an entry's own failure is in its
    row of the report (``BuildReport.exit_code`` is the worst entry's), not raised.
    """
    plan = load_build_file(build_file, out_dir, cache=cache)
    if isinstance(executor, Executor):
        own, runner = False, executor
    else:
        name = executor or "inprocess"
        if name == "inprocess" and workers:
            raise ConfigError(f"--workers {workers} runs nothing in parallel on the in-process executor: "
                              "add --executor local (processes here) or --executor ray.")
        if ray_address is not None and name != "ray":
            raise ConfigError(f"--ray-address {ray_address!r} needs --executor ray.")
        own, runner = True, None
    try:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot create the build's output folder {str(plan.out_dir)!r}: "
                          f"{error.strerror or error}. Choose a writable folder (-o).") from None
    start = time.perf_counter()
    if own:
        runner = make_executor(name, workers=workers, address=ray_address)
    started = time.perf_counter() - start
    try:
        report_path = plan.out_dir / "build-report.json"
        report_path.unlink(missing_ok=True)  # a crashed build leaves no earlier build's report behind
        for entry in plan.entries:
            _remove_earlier_outputs(entry)
        logger.info("building %d entries from %s on %s", len(plan.entries), plan.build_file,
                    ", ".join(f"{k} {v}" for k, v in runner.describe().items()))
        results = runner.map(build_entry, plan.entries, threads=runner.threads_per_task(0), what="build entry")
        described = runner.describe()
    finally:
        if own:
            runner.close()
    seconds = time.perf_counter() - start
    summary = {
        "entries": len(results),
        "by_status": dict(Counter(r["status"] for r in results)),
        "exit_code": worst_exit_code(r["exit_code"] for r in results),
        "executor": described,
        "seconds": round(seconds, 3),  # the whole build, the executor's start included
        "executor_start_seconds": round(started, 3),  # Ray's start; local workers start with their first task
        "entry_seconds": round(sum(r["seconds"] for r in results), 3),
    }
    report = BuildReport(build_file=str(plan.build_file), out_dir=str(plan.out_dir),
                         path=str(report_path), entries=results, summary=summary)
    write_text_atomically(Path(report.path), report.to_json())
    return report


def _remove_earlier_outputs(entry: BuildEntry) -> None:
    output = Path(entry.output)
    for path in (output, output.parent / f"{output.name}.data", Path(entry.report)):
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            raise OutputError(f"{entry.where}: {str(path)!r} is a directory, where the build writes a file; "
                              "move it away or give another output folder (-o).") from None
        except OSError as error:
            raise OutputError(f"{entry.where}: cannot replace {str(path)!r}: {error.strerror or error}.") from None
