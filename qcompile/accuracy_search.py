"""Accuracy-aware compilation: search for the cheapest compile that stays within an accuracy budget.

``compile_within_budget`` compiles, measures, and adds accuracy measures one step at a time until the
budget holds, the candidates run out or the time budget is spent. In order, accumulating:

1. the plain compile (the config as given);
2. the accuracy passes, through their config switches: cross-layer equalization, then equalization
   with bias correction, then equalization with AdaRound; the best of these is kept;
3. the activations ranked by sensitivity (the outputs' SQNR with only that tensor left float, for
   the worst by ``qcompile.debug``'s isolated SQNR; see ``_rank``) are promoted to 16-bit activations one at a time, then in
   growing groups (``activation_type_overrides`` with an exact-name regex ``^name$``);
4. if still short, the nodes reading the most sensitive tensors are left in float
   (``exclude_nodes``), the same way.

The best result found is always kept. When the budget holds the search stops and returns it; when
it never holds, ``AccuracyGateError`` is raised with the best result as ``.result`` (and the search
record as ``.search``), so a caller can still write it. Each step (what changed, its measure, loss,
whether it is within budget, seconds) is recorded in ``report.transformations["accuracy-search"]``.

The budget is one of:

- ``metric`` and ``max_loss``: the relative loss of a user metric (higher is better),
  ``(score(float) - score(quantized)) / |score(float)|``, at most ``max_loss`` (0.01 = 1%).
  The metric is called as ``metric(run, batches) -> float``: ``run(batch)`` runs the model being
  scored on one ``{input_name: array}`` batch and returns its outputs as a list of arrays, in the
  model's output order; ``batches`` are the evaluation batches (``eval_data``, else the held-out
  calibration batches). A metric may ignore ``batches`` and feed ``run`` its own labelled data.
  The float model and every candidate are scored by the same function, the same way.
- ``min_sqnr``: every output's SQNR against the float model, on the evaluation batches, at least
  ``min_sqnr`` dB (the accuracy gate's measure).
- ``max_loss`` without ``metric``: the outputs' relative RMS error ``||y - y_q|| / ||y||`` at most
  ``max_loss``, that is SQNR >= -20 log10(max_loss) dB (1% is 40 dB).
"""

from __future__ import annotations

__all__ = ["compile_within_budget", "load_metric", "parse_loss"]

import importlib
import importlib.util
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from qcompile.api import CompileResult, resolve_config
from qcompile.api import compile as compile_model
from qcompile.backends import get_target
from qcompile.config import CompileConfig
from qcompile.data import BatchSource, input_specs
from qcompile.errors import AccuracyGateError, ConfigError, QcompileError, detail
from qcompile.loader import load_model
from qcompile.qparams import quant_type
from qcompile.runtime import make_session
from qcompile.workspace import LARGE_MODEL_BYTES, weight_bytes

logger = logging.getLogger(__name__)

Metric = Callable[[Callable[[dict], list], list[dict]], float]

# The accuracy-pass candidates of step 2, in order: label -> config switches.
PASS_CANDIDATES: dict[str, dict[str, bool]] = {
    "+CLE": {"cross_layer_equalization": True},
    "+CLE+BC": {"cross_layer_equalization": True, "bias_correction": True},
    "+CLE+AdaRound": {"cross_layer_equalization": True, "adaround": True},
}
# Promotions of steps 3 and 4: this many one tensor at a time, then groups that double in size.
SINGLE_PROMOTIONS = 4
DEFAULT_MAX_CANDIDATES = 24
# Tensors whose effect on the outputs is measured (one evaluation run each) when ranking sensitivity.
OUTPUT_AWARE = 16


def parse_loss(text: str | float) -> float:
    """A loss budget from ``"1%"`` or ``"0.01"`` (both 0.01); a ConfigError for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip()
        try:
            value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
        except ValueError:
            raise ConfigError(f"max loss {text!r} is not a number: write it as a percentage (1%) or a fraction (0.01).") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ConfigError(f"max loss {text!r} must be at least 0 and below 100% (e.g. 1% or 0.01).")
    return value


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


def _score(metric: Metric, session, batches: list[dict], what: str) -> float:
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


class _Budget:
    """How a candidate is measured and whether it is within budget."""

    def __init__(self, *, metric: Metric | None, max_loss: float | None, min_sqnr: float | None,
                 float_model, batches: list[dict], threads: int):
        self.metric, self.max_loss, self.batches, self.threads = metric, max_loss, batches, threads
        self.float_score = None
        if metric is not None:
            if max_loss is None:
                raise ConfigError("A metric needs a loss budget: give max_loss (--max-loss 1%).")
            session = make_session(float_model, threads=threads, what="float model")
            self.float_score = _score(metric, session, batches, "float model")
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
            score = _score(self.metric, session, self.batches, "compiled model")
            loss = (self.float_score - score) / abs(self.float_score) if self.float_score else self.float_score - score
            return {"score": score, "loss": loss, "min_sqnr_db": worst_sqnr, "value": score,
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


def _repeatable(data):
    """Calibration or evaluation data the search can read more than once."""
    if data is None or isinstance(data, (str, Path, list, tuple)):
        return data
    if isinstance(data, Mapping):
        return data  # BatchSource says what is wrong with it
    if isinstance(data, Iterable):
        return list(data)  # every candidate calibrates again: keep the batches
    return data


def _evaluation_batches(float_model, calibration_data, eval_data, config: CompileConfig) -> list[dict]:
    if calibration_data is None:
        return []
    source = BatchSource(calibration_data, input_specs(float_model), eval_source=eval_data, max_eval=config.eval_batches)
    if eval_data is None:
        for _ in source.calibration():  # fills the held-out batches, as compile's own run does
            pass
    return source.evaluation()[1]


def _groups(names: list[str]) -> list[list[str]]:
    """One name at a time for the first SINGLE_PROMOTIONS, then groups doubling in size."""
    groups, index, size = [], 0, 1
    while index < len(names):
        if len(groups) >= SINGLE_PROMOTIONS:
            size *= 2
        groups.append(names[index : index + size])
        index += size
    return groups


def compile_within_budget(
    model: Any,
    calibration_data: Any = None,
    *,
    config: CompileConfig | Mapping | str | Path | None = None,
    target: str | None = None,
    max_loss: float | str | None = None,
    metric: Metric | str | None = None,
    min_sqnr: float | None = None,
    time_budget: float | None = None,
    eval_data: Any = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    show_progress: bool = False,
) -> tuple[CompileResult, dict[str, Any]]:
    """Compile ``model`` with the fewest accuracy measures that keep it within the budget.

    Budget: ``metric`` (a callable ``metric(run, batches) -> float``, higher is better, or
    ``"module.py:function"``) with ``max_loss`` (relative, 0.01 or "1%"); or ``min_sqnr`` (dB, every
    output); or ``max_loss`` alone (relative RMS output error). ``min_sqnr`` defaults to the
    config's. ``time_budget``: seconds; no candidate starts that would likely end past it (the
    plain compile always runs). Every candidate calibrates again: a one-shot iterator of batches is
    read into a list first. Returns ``(result, search)``; ``search`` is also in
    ``result.report.transformations["accuracy-search"]``. Raises ``AccuracyGateError`` with the
    best result (``.result``) and the search (``.search``) when the budget is never met.
    """
    start = time.perf_counter()
    config = resolve_config(config, target=target)
    if isinstance(metric, str):
        metric = load_metric(metric)
    if max_loss is not None:
        max_loss = parse_loss(max_loss)
    if min_sqnr is None and metric is None and max_loss is None:
        min_sqnr = config.min_sqnr
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ConfigError(f"time budget {time_budget!r} must be a positive number of seconds.")
    if max_candidates < 1:
        raise ConfigError(f"max_candidates = {max_candidates} must be at least 1.")
    target_spec = get_target(config.target)
    # The search gates itself: each candidate compiles without the config's gate.
    base = config.replace(min_sqnr=None)
    calibration_data, eval_data = _repeatable(calibration_data), _repeatable(eval_data)
    float_model = load_model(model)
    batches = _evaluation_batches(float_model, calibration_data, eval_data, config)
    budget = _Budget(metric=metric, max_loss=max_loss, min_sqnr=min_sqnr, float_model=float_model,
                     batches=batches, threads=config.threads)
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    state = {"stop": None}

    def out_of_time() -> bool:
        if time_budget is None or not steps:
            return False
        elapsed = time.perf_counter() - start
        last = max((s["seconds"] for s in steps), default=0.0)
        if elapsed + last > time_budget:
            state["stop"] = f"time budget of {time_budget:g} s would be exceeded ({elapsed:.1f} s spent)"
            return True
        return False

    def attempt(stage: str, change: str, candidate: CompileConfig) -> dict | None:
        if best.get("within") or state["stop"]:
            return None
        if len(steps) >= max_candidates:
            state["stop"] = f"{max_candidates} candidates tried"
            return None
        if out_of_time():
            return None
        step_start = time.perf_counter()
        step: dict[str, Any] = {"step": len(steps), "stage": stage, "change": change}
        try:
            result = compile_model(model, calibration_data, config=candidate, eval_data=eval_data,
                                   show_progress=show_progress)
            if result.report.plan and not result.report.plan.get("quantized_nodes"):
                # A float model is no answer to a quantization budget.
                step.update(error="no node is left quantized", within=False)
                result = None
            else:
                step.update(budget.measure(result))
        except AccuracyGateError:
            raise
        except QcompileError as error:
            if not steps:
                raise  # the plain compile must work: its error is the user's to see
            step.update(error=detail(error), within=False)
            result = None
        step["seconds"] = round(time.perf_counter() - step_start, 3)
        steps.append({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                      for k, v in step.items() if k != "value"})
        logger.info("accuracy search step %d (%s): %s", step["step"], change,
                    "failed: " + step["error"] if "error" in step else
                    f"loss {step.get('loss')}, min SQNR {step.get('min_sqnr_db')} dB, within budget: {step['within']}")
        if result is not None and (not best or step["value"] > best["value"] or step["within"]):
            best.clear()
            best.update(step, result=result, config=candidate)
        return step

    # 1. The plain compile.
    attempt("plain", "the config as given", base)
    # 2. The accuracy passes: keep the best of them (or the plain compile).
    for label, switches in PASS_CANDIDATES.items():
        if all(getattr(base, k) for k in switches):
            continue  # the config has them already
        attempt("accuracy-passes", label, base.replace(**switches))
    # 3. and 4. Promote the most sensitive activations: 16-bit, then float.
    promoted: dict[str, Any] = {}
    if not best.get("within") and not state["stop"] and batches:
        ranked = _rank(float_model, best["result"], batches, config, promoted)
        wide = _wide_type(base, target_spec)
        current = best["config"]
        if wide is not None:
            names = [t.tensor for t in ranked if t.qtype is not None and quant_type(t.qtype).qmax - quant_type(t.qtype).qmin < 65535]
            for group in _groups(names):
                # The new exact names come first: the first matching override wins.
                overrides = {**{f"^{re.escape(name)}$": wide for name in group}, **current.activation_type_overrides}
                candidate = current.replace(activation_type_overrides=overrides)
                step = attempt("16-bit activations", f"{', '.join(group)} -> {wide}", candidate)
                if step is not None and "error" not in step:
                    current = candidate  # accumulate; a candidate that failed to compile is dropped
        excluded = list(current.exclude_nodes)
        consumers = [[c for c in t.consumers if c and c not in excluded] for t in ranked]
        for group in _groups([i for i, c in enumerate(consumers) if c]):
            nodes = [node for i in group for node in consumers[i] if node not in excluded]
            if not nodes:
                continue
            candidate = current.replace(exclude_nodes=excluded + nodes)
            step = attempt("float", f"nodes reading {', '.join(ranked[i].tensor for i in group)} kept float: "
                           f"{', '.join(nodes)}", candidate)
            if step is not None and "error" not in step:
                current, excluded = candidate, excluded + nodes
    if not state["stop"] and not best.get("within"):
        state["stop"] = "no candidates left"
    met = bool(best.get("within"))
    chosen = best["step"]
    search = {
        "budget": budget.describe(),
        "kind": budget.kind,
        "max_loss": budget.max_loss,
        "min_sqnr": None if budget.kind == "metric" else budget.min_sqnr,
        "float_score": budget.float_score,
        "evaluation_batches": len(batches),
        "met": met,
        "chosen_step": chosen,
        "chosen": steps[chosen]["change"],
        "stopped": "budget met" if met else state["stop"],
        "time_budget_s": time_budget,
        "seconds": round(time.perf_counter() - start, 3),
        "sensitivity": promoted,
        "steps": steps,
    }
    result: CompileResult = best["result"]
    report = result.report
    report.transformations["accuracy-search"] = search
    gate = {"min_sqnr": None if search["min_sqnr"] is None else round(search["min_sqnr"], 3),
            "max_loss": budget.max_loss, "passed": met, "failing": None if met else budget.miss(best), "search": True}
    if budget.kind == "metric":
        gate.update(score=best.get("score"), float_score=budget.float_score, loss=best.get("loss"))
    report.accuracy_gate = gate
    if not met:
        error = AccuracyGateError(
            f"Accuracy budget not met ({budget.describe()}) after {len(steps)} candidates in "
            f"{search['seconds']:.1f} s ({state['stop']}): {budget.miss(best)}; best was step {chosen} "
            f"({steps[chosen]['change']}). Give a larger --max-loss or --time-budget, or better calibration data."
        )
        error.result, error.search = result, search
        raise error
    return result, search


def _wide_type(config: CompileConfig, target) -> str | None:
    """The target's 16-bit activation type of the run's signedness, or None."""
    default = quant_type(config.activation_type or target.default_activation_type)
    if default.is_float:
        return None  # FP8 runs cannot take integer overrides (CompileConfig refuses the mix)
    for name in ("int16", "uint16") if default.signed else ("uint16", "int16"):
        if name in target.activation_types and quant_type(name).signed == default.signed:
            return name
    return None


def _rank(float_model, result: CompileResult, batches: list[dict], config: CompileConfig, record: dict) -> list:
    """The best candidate's quantized activations, most sensitive first.

    First ``qcompile.debug.activation_errors``' isolated SQNR (the float tensor rounded on its grid:
    cheap, one pass over the data for all tensors); then, for the OUTPUT_AWARE worst of those, the
    outputs' SQNR with only that tensor's rounding undone (its DequantizeLinear replaced by the float
    tensor; one run of the evaluation batches each): the tensor whose rounding costs the outputs
    most comes first. A tensor with little error of its own can still ruin the outputs (a large
    channel that the next layer ignores sets a grid too coarse for the channels it reads)."""
    from qcompile.debug import activation_errors

    start = time.perf_counter()
    errors = activation_errors(float_model, result.model, batches, threads=config.threads)

    def isolated(t):
        return t.isolated_sqnr_db if t.isolated_sqnr_db is not None else math.inf

    ranked = sorted((t for t in errors if t.qtype is not None), key=lambda t: (isolated(t), t.index))
    gains = {}
    if weight_bytes(result.model) <= LARGE_MODEL_BYTES:
        gains = _output_sqnr_without(float_model, result, ranked[:OUTPUT_AWARE], batches, config.threads)
        ranked = sorted(ranked, key=lambda t: (-gains.get(t.tensor, -math.inf), isolated(t), t.index))
    record.update(
        measure=(f"outputs' worst SQNR with only the tensor's rounding undone, highest first (the {OUTPUT_AWARE} "
                 "lowest by isolated SQNR); then isolated SQNR (qcompile.debug), lowest first"),
        seconds=round(time.perf_counter() - start, 3),
        ranking=[{"tensor": t.tensor, "output_sqnr_db_if_float": gains.get(t.tensor),
                  "isolated_sqnr_db": t.isolated_sqnr_db, "accumulated_sqnr_db": t.accumulated_sqnr_db,
                  "consumers": t.consumers} for t in ranked[:20]],
    )
    return ranked


def _output_sqnr_without(float_model, result: CompileResult, tensors: list, batches: list[dict],
                         threads: int) -> dict[str, float]:
    """{tensor: the worst output SQNR (dB) of the compiled model with that one activation left float}."""
    import onnx

    from qcompile.evaluate import compare_to_outputs

    float_session = make_session(float_model, threads=threads, what="float model")
    names = [o.name for o in float_session.get_outputs()]
    expected = [float_session.run(names, batch) for batch in batches]
    del float_session
    proto = result.to_proto()
    scores = {}
    for tensor in tensors:
        variant = onnx.ModelProto()
        variant.CopyFrom(proto)
        for node in variant.graph.node:
            if node.op_type == "DequantizeLinear" and tensor.dequantized in node.output:
                node.op_type, node.domain = "Identity", ""
                del node.input[:]
                node.input.append(tensor.tensor)
                del node.attribute[:]
                break
        else:
            continue
        try:
            session = make_session(variant, threads=threads, what=f"compiled model with {tensor.tensor} in float")
        except QcompileError:
            continue
        outputs = compare_to_outputs(names, expected, session, batches)
        values = [float(m["sqnr_db"]) for m in outputs.values()]
        if values:
            scores[tensor.tensor] = min(values)
    return scores
