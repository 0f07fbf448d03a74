"""One candidate compile, scored: the unit of work the accuracy search and the sensitivity analysis
hand to an executor (``qcompile.scaleout.executors``).

A candidate is a config. ``compile_candidate`` compiles the float model with it and measures the
result with a ``Budget`` (a user metric's relative loss, or the outputs' SQNR against the float
model), in this process or in a worker; a worker sends back the model's bytes and its report, and
the caller keeps the best one. Everything a worker needs (the model, the data, the budget) is sent
once per worker as the executor's shared value, not with each candidate.
"""

from __future__ import annotations

__all__ = [
    "Budget", "Candidate", "check_parallel_size", "compile_candidate", "evaluation_batches", "load_metric",
    "repeatable", "run_candidates",
]

import dataclasses
import importlib
import importlib.util
import math
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qcompile.api import CompileResult
from qcompile.api import compile as compile_model
from qcompile.core.config import CompileConfig
from qcompile.io.data import BatchSource, input_specs
from qcompile.errors import AccuracyGateError, ConfigError, QcompileError, detail
from qcompile.scaleout.executors import Executor
from qcompile.io.runtime import make_session
from qcompile.io.workspace import LARGE_MODEL_BYTES, weight_bytes

Metric = Callable[[Callable[[dict], list], list[dict]], float]


def load_metric(spec: str) -> Metric:
    """The callable named by ``"path/to/module.py:function"`` (or ``"package.module:function"``)."""
    module_part, sep, name = str(spec).rpartition(":")
    if not sep or not module_part or not name.isidentifier():
        raise ConfigError(
            f"--metric {spec!r} must be MODULE:FUNCTION, e.g. my_metric.py:top1 or mypackage.metrics:top1."
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise ConfigError(f"--metric {spec!r}: file {module_part!r} does not exist.")
        module_name = f"qcompile_metric_{abs(hash(str(path.resolve())))}"
        try:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - the user's module: any exception is theirs to fix
            sys.modules.pop(module_name, None)
            raise ConfigError(f"--metric {spec!r}: importing {module_part!r} failed: {detail(error)}") from None
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as error:  # noqa: BLE001 - the user's module, as above
            raise ConfigError(f"--metric {spec!r}: cannot import module {module_part!r}: {detail(error)}") from None
    function = getattr(module, name, None)
    if function is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(
            f"--metric {spec!r}: {module_part!r} has no {name!r}"
            + (f"; its functions: {', '.join(public[:10])}." if public else ".")
        )
    if not callable(function):
        raise ConfigError(f"--metric {spec!r}: {name!r} is a {type(function).__name__}, not a function.")
    return function


def score(metric: Metric, session, batches: list[dict], what: str) -> float:
    names = [o.name for o in session.get_outputs()]

    def run(batch: Mapping) -> list:
        return session.run(names, dict(batch))

    try:
        value = metric(run, batches)
    except QcompileError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's metric: its errors are theirs to fix
        raise ConfigError(f"The metric raised an error on the {what}: {detail(error)}") from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"The metric returned {value!r} for the {what}; it must return a number (higher is better).") from None
    if not math.isfinite(value):
        raise ConfigError(f"The metric returned {value} for the {what}; it must return a finite number.")
    return value


class Budget:
    """How a candidate is measured and whether it is within budget."""

    def __init__(self, *, metric: Metric | str | None, max_loss: float | None, min_sqnr: float | None,
                 float_model, batches: list[dict], threads: int):
        self.metric_spec = metric if isinstance(metric, str) else None
        if isinstance(metric, str):
            metric = load_metric(metric)
        self.metric, self.max_loss, self.batches, self.threads = metric, max_loss, batches, threads
        self.float_score = None
        if metric is not None:
            if max_loss is None:
                raise ConfigError("A metric needs a loss budget: give max_loss (--max-loss 1%).")
            session = make_session(float_model, threads=threads, what="float model")
            self.float_score = score(metric, session, batches, "float model")
            self.kind = "metric"
            self.min_sqnr = None
        elif min_sqnr is not None:
            self.kind, self.min_sqnr = "sqnr", float(min_sqnr)
        elif max_loss is not None:
            # Relative RMS output error <= max_loss is SQNR >= -20 log10(max_loss).
            self.kind = "sqnr"
            self.min_sqnr = math.inf if max_loss == 0 else -20.0 * math.log10(max_loss)
        else:
            raise ConfigError("The accuracy search needs a budget: max_loss (with or without a metric) or min_sqnr.")

    def describe(self) -> str:
        if self.kind == "metric":
            return f"metric loss <= {self.max_loss:.4%} (float score {self.float_score:.6g})"
        return f"every output's SQNR >= {self.min_sqnr:.2f} dB"

    def measure(self, result: CompileResult) -> dict[str, Any]:
        """{"value": higher is better, "loss", "within", ...} of one candidate."""
        outputs = result.report.evaluation.get("outputs", {})
        sqnrs = [float(m["sqnr_db"]) for m in outputs.values()]
        worst_sqnr = min(sqnrs) if sqnrs else None
        if self.kind == "metric":
            session = make_session(result.to_proto(), threads=self.threads, what="compiled model")
            value = score(self.metric, session, self.batches, "compiled model")
            loss = (self.float_score - value) / abs(self.float_score) if self.float_score else self.float_score - value
            return {"score": value, "loss": loss, "min_sqnr_db": worst_sqnr, "value": value,
                    "within": loss <= self.max_loss + 1e-12}
        if worst_sqnr is None:
            raise ConfigError("The SQNR budget needs evaluation data: pass calibration data (and optionally eval data).")
        return {"min_sqnr_db": worst_sqnr, "value": worst_sqnr, "within": worst_sqnr >= self.min_sqnr,
                "loss": None if not math.isfinite(worst_sqnr) else 10.0 ** (-worst_sqnr / 20.0)}

    def miss(self, best: dict) -> str:
        if self.kind == "metric":
            return (f"best relative loss {best['loss']:.4%} (score {best['score']:.6g} vs float "
                    f"{self.float_score:.6g}), {best['loss'] - self.max_loss:.4%} over the {self.max_loss:.4%} budget")
        return (f"best worst-output SQNR {best['min_sqnr_db']:.2f} dB, "
                f"{self.min_sqnr - best['min_sqnr_db']:.2f} dB short of the required {self.min_sqnr:.2f} dB")


    def __getstate__(self) -> dict:
        # A metric loaded from "module.py:function" is loaded again in the worker: its module is not
        # importable by name there.
        state = dict(self.__dict__)
        if state.get("metric_spec"):
            state["metric"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.metric is None and self.__dict__.get("metric_spec"):
            self.metric = load_metric(self.metric_spec)


@dataclasses.dataclass
class Candidate:
    """What one candidate compile gave: its measure (``Budget.measure``) or its error, the compile's
    seconds, and the result (None after an error)."""

    measure: dict[str, Any]
    error: str | None
    seconds: float
    result: CompileResult | None


def compile_candidate(config: CompileConfig, shared: dict, threads: int) -> dict[str, Any]:
    """Compile ``shared["model"]`` with ``config`` on ``shared``'s data and measure it with
    ``shared["budget"]``. In a worker it returns plain data: the model's bytes (in this process, the
    ``CompileResult`` itself), the report, the measure, or the error (a candidate that fails to compile is a finding, not a crash). The
    worker compiles in its own process only (no nested executor), with ``threads`` ORT threads."""
    start = time.perf_counter()
    config = config.replace(executor="inprocess", workers=0, ray_address=None, threads=config.threads or threads)
    try:
        result = compile_model(shared["model"], shared["calibration_data"], config=config,
                               eval_data=shared["eval_data"],
                               show_progress=bool(shared.get("show_progress") and shared.get("in_process")))
        measure = measure_candidate(result, shared["budget"])
    except AccuracyGateError:
        raise
    except QcompileError as error:
        if shared.get("raise_errors"):
            raise
        return {"error": detail(error), "seconds": time.perf_counter() - start}
    out = {"measure": measure, "seconds": time.perf_counter() - start, "report": result.report}
    out["model"] = result if shared.get("in_process") else result.to_proto().SerializeToString(deterministic=True)
    return out


def measure_candidate(result: CompileResult, budget: Budget | None) -> dict[str, Any]:
    if result.report.plan and not result.report.plan.get("quantized_nodes"):
        # A float model is no answer to a quantization budget.
        raise ConfigError("no node is left quantized: the candidate keeps every node float. Exclude fewer nodes.")
    return budget.measure(result) if budget is not None else {}


def run_candidates(executor: Executor, configs: list[CompileConfig], shared: dict, *, threads: int = 0,
                   what: str = "candidate") -> list[Candidate]:
    """``compile_candidate`` for each config on ``executor``; results in order, models rebuilt here."""
    in_process = not executor.parallel
    if not in_process:
        _check_picklable(shared)
    outcomes = executor.map(compile_candidate, configs, shared={**shared, "in_process": in_process},
                            threads=executor.threads_per_task(threads), what=what)
    candidates = []
    for outcome in outcomes:
        if "error" in outcome:
            candidates.append(Candidate({}, outcome["error"], outcome["seconds"], None))
            continue
        result = outcome["model"]
        if not isinstance(result, CompileResult):
            result = CompileResult(ir.from_proto(onnx.load_from_string(result)), outcome["report"])
        candidates.append(Candidate(outcome["measure"], None, outcome["seconds"], result))
    return candidates


def check_parallel_size(executor: Executor, float_model: ir.Model) -> None:
    """A ConfigError if ``float_model`` is too large for candidates compiled in workers: they send
    each compiled candidate back whole, and a protobuf holds 2 GB at most."""
    if executor.parallel and weight_bytes(float_model) > LARGE_MODEL_BYTES:
        raise ConfigError(
            f"The model has over {LARGE_MODEL_BYTES / 2**30:.1f} GiB of weights: compile its candidates with "
            "executor = 'inprocess' (--executor inprocess); workers send each compiled model back whole."
        )


def repeatable(data):
    """Calibration or evaluation data that every candidate can read again (a one-shot iterator is
    read into a list)."""
    if data is None or isinstance(data, (str, Path, list, tuple)):
        return data
    if isinstance(data, Mapping):
        return data  # BatchSource says what is wrong with it
    if isinstance(data, Iterable):
        return list(data)  # every candidate calibrates again: keep the batches
    return data


def evaluation_batches(float_model, calibration_data, eval_data, config: CompileConfig) -> list[dict]:
    """The batches candidates are scored on: ``eval_data``'s, else the held-out calibration batches,
    as a compile of the same data picks them."""
    if calibration_data is None:
        return []
    source = BatchSource(calibration_data, input_specs(float_model), eval_source=eval_data, max_eval=config.eval_batches)
    if eval_data is None:
        for _ in source.calibration():  # fills the held-out batches, as compile's own run does
            pass
    return source.evaluation()[1]


def _check_picklable(shared: dict) -> None:
    try:
        pickle.dumps(shared)
    except Exception as error:  # noqa: BLE001 - pickle raises many types
        raise ConfigError(
            f"The model, data or metric cannot be sent to worker processes ({detail(error)}). Give the metric "
            "as 'module.py:function', the model as a file, and the data as a directory or a list, or run "
            "with executor = 'inprocess'."
        ) from None
