"""Accuracy-aware compilation: search for the cheapest compile that stays within an accuracy budget.

``compile_within_budget`` compiles, measures, and adds accuracy measures one step at a time until the
budget holds, the candidates run out or the time budget is spent. In order, accumulating:

1. the plain compile (the config as given);
2. the accuracy passes, through their config switches: cross-layer equalization, then equalization
   with bias correction, then equalization with AdaRound; the best of these is kept;
3. the activations ranked by sensitivity (the outputs' SQNR with only that tensor left float, for
   the worst by ``qcompile.analysis.debug``'s isolated SQNR; see ``_rank``) are promoted to 16-bit activations one at a time, then in
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

__all__ = ["compile_or_recover", "compile_within_budget", "load_metric", "parse_loss", "worst_output_sqnr"]

import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qcompile.api import CompileResult, resolve_config
from qcompile.api import compile as plain_compile
from qcompile.backends import get_target
from qcompile.analysis.candidates import (
    Budget,
    Candidate,
    Metric,
    check_parallel_size,
    evaluation_batches,
    load_metric,
    measure_candidate,
    repeatable,
    run_candidates,
)
from qcompile.core.config import CompileConfig
from qcompile.analysis.debug import activation_errors
from qcompile.errors import AccuracyGateError, ConfigError, ModelError
from qcompile.scaleout.executors import Executor, make_executor
from qcompile.core.graph_edit import proto_nodes
from qcompile.io.loader import load_model
from qcompile.numerics.qparams import quant_type
from qcompile.analysis.sensitivity import activation_sensitivity, quantized_activations
from qcompile.io.workspace import LARGE_MODEL_BYTES, serialize_inline, weight_bytes

logger = logging.getLogger(__name__)

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


def _groups(names: list, singles: int = SINGLE_PROMOTIONS) -> list[list]:
    """One name at a time for the first ``singles``, then groups doubling in size."""
    groups, index, size = [], 0, 1
    while index < len(names):
        if len(groups) >= singles:
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
    executor: Executor | None = None,
    pass_candidates: Mapping[str, Mapping[str, Any]] | None = None,
    single_promotions: int = SINGLE_PROMOTIONS,
    promote_16bit: bool = True,
    promote_float: bool = True,
    min_promotion_gain_db: float | None = None,
    plain: tuple[CompileResult, float] | None = None,
    fallback: Mapping[str, Mapping[str, Any]] | None = None,
    rank_batches: int | None = None,
    output_aware: int = OUTPUT_AWARE,
    max_float_fraction: float | None = None,
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

    ``executor`` (default: the config's, ``qcompile.scaleout.executors``): with N workers, N candidates are
    compiled and scored at once, in the order the sequential search would try them; results past
    the first within budget (or, where candidates build on each other, past the first that fails
    to compile) are dropped, so the search and its result are the same on every executor, except
    under ``time_budget``, which is checked before each wave: up to N - 1 more candidates may run.
    The best model so far stays here; a candidate whose worker dies is retried.

    ``pass_candidates`` (label -> config switches; default ``PASS_CANDIDATES``) are step 2's;
    ``single_promotions``: how many tensors steps 3 and 4 promote one at a time before the groups
    double; ``promote_16bit`` False skips step 3, ``promote_float`` False step 4; ``min_promotion_gain_db``: step 3 runs only when
    the most sensitive tensor's rounding, undone, raised the outputs' worst SQNR by at least that
    much on the ranking batches. ``plain``: (the plain compile of this model,
    config and data, its seconds), already made by the caller: step 1 takes it instead of compiling
    again. ``fallback`` (label -> config switches): tried after step 2, before the ranking; steps 3
    and 4 then go on from step 2's best, not the fallback's. ``rank_batches``: rank the
    tensors on only the first that many evaluation batches; ``output_aware``: how many of the worst
    by isolated SQNR are measured at the outputs (one run of the ranking batches each).
    ``max_float_fraction``: step 4 keeps at most this share of the planned nodes float.
    """
    config = resolve_config(config, target=target)
    own_executor = executor is None
    if executor is None:
        executor = make_executor(config.executor, workers=config.workers, address=config.ray_address,
                                 threads=config.threads)
    try:
        return _search(model, calibration_data, config, max_loss=max_loss, metric=metric, min_sqnr=min_sqnr,
                       time_budget=time_budget, eval_data=eval_data, max_candidates=max_candidates,
                       show_progress=show_progress, executor=executor,
                       pass_candidates=PASS_CANDIDATES if pass_candidates is None else pass_candidates,
                       single_promotions=single_promotions, promote_16bit=promote_16bit, promote_float=promote_float,
                       min_promotion_gain_db=min_promotion_gain_db, plain=plain,
                       fallback=fallback or {}, rank_batches=rank_batches, output_aware=output_aware,
                       max_float_fraction=max_float_fraction)
    finally:
        if own_executor:
            executor.close()


def _search(model, calibration_data, config: CompileConfig, *, max_loss, metric, min_sqnr, time_budget, eval_data,
            max_candidates, show_progress, executor: Executor, pass_candidates, single_promotions,
            promote_16bit, promote_float, min_promotion_gain_db, plain, fallback, rank_batches, output_aware,
            max_float_fraction) -> tuple[CompileResult, dict[str, Any]]:
    start = time.perf_counter()
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
    calibration_data, eval_data = repeatable(calibration_data), repeatable(eval_data)
    float_model = load_model(model)
    check_parallel_size(executor, float_model)
    batches = evaluation_batches(float_model, calibration_data, eval_data, config)
    budget = Budget(metric=metric, max_loss=max_loss, min_sqnr=min_sqnr, float_model=float_model,
                    batches=batches, threads=config.threads)
    # What every worker gets once: the model as the user gave it when it can travel (a path or a
    # proto), else the loaded model as a proto.
    source = model if isinstance(model, (str, Path, onnx.ModelProto)) else serialize_inline(float_model)
    shared = {"model": source, "calibration_data": calibration_data, "eval_data": eval_data, "budget": budget,
              "show_progress": show_progress}
    wave_size = executor.workers if executor.parallel else 1
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    state = {"stop": None}
    steps_results: dict[str, CompileResult] = {}

    def finished() -> bool:
        return bool(best.get("within") or state["stop"])

    def out_of_time() -> bool:
        if time_budget is None or not steps:
            return False
        elapsed = time.perf_counter() - start
        last = max((s["seconds"] for s in steps), default=0.0)
        if elapsed + last > time_budget:
            state["stop"] = f"time budget of {time_budget:g} s would be exceeded ({elapsed:.1f} s spent)"
            return True
        return False

    def record(stage: str, change: str, candidate: CompileConfig, outcome: Candidate) -> dict:
        step: dict[str, Any] = {"step": len(steps), "stage": stage, "change": change}
        if outcome.error is not None:
            step.update(error=outcome.error, within=False)
        else:
            step.update(outcome.measure)
        step["seconds"] = round(outcome.seconds, 3)
        steps.append({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                      for k, v in step.items() if k != "value"})
        logger.info("accuracy search step %d (%s): %s", step["step"], change,
                    "failed: " + step["error"] if "error" in step else
                    f"loss {step.get('loss')}, min SQNR {step.get('min_sqnr_db')} dB, within budget: {step['within']}")
        if outcome.result is not None and stage == "plain":
            steps_results["plain"] = outcome.result
        if outcome.result is not None and (not best or step["value"] > best["value"] or step["within"]):
            best.clear()
            best.update(step, result=outcome.result, config=candidate)
        return step

    def attempt_wave(wave: list[tuple[str, str, CompileConfig]], *, cumulative: bool) -> list[dict]:
        """Compile and score ``wave`` at once; record the steps in order, up to the first within
        budget (and, for ``cumulative`` candidates, each built on the one before, up to the first
        failure: the later ones assumed it compiled)."""
        if finished():
            return []
        room = max_candidates - len(steps)
        if room <= 0:
            state["stop"] = f"{max_candidates} candidates tried"
            return []
        if out_of_time():
            return []
        wave = wave[:room]
        outcomes = run_candidates(executor, [candidate for _, _, candidate in wave],
                                  {**shared, "raise_errors": not steps}, threads=config.threads,
                                  what="accuracy-search candidate")
        recorded = []
        for (stage, change, candidate), outcome in zip(wave, outcomes):
            recorded.append(record(stage, change, candidate, outcome))
            if best.get("within") or (cumulative and outcome.error is not None):
                break
        return recorded

    def accumulate(stage: str, groups: list, build, current: tuple) -> tuple:
        """Steps 3 and 4: each candidate adds ``build(current, group)`` to the last one that compiled.
        A wave speculates that all of its candidates compile; after one fails, the rest are built again."""
        index = 0
        while index < len(groups) and not finished():
            wave, speculative, position = [], current, index
            while position < len(groups) and len(wave) < wave_size:
                built = build(speculative, groups[position])
                position += 1
                if built is not None:
                    change, speculative = built
                    wave.append((change, speculative, position))
            if not wave:
                break
            recorded = attempt_wave([(stage, change, state_[0]) for change, state_, _ in wave], cumulative=True)
            if not recorded:
                break
            for step, (_, built_state, after) in zip(recorded, wave):
                index = after
                if "error" not in step:
                    current = built_state  # a candidate that failed to compile is dropped
        return current

    # 1. The plain compile (its errors are the user's to see).
    if plain is not None:
        result_, seconds_ = plain
        record("plain", "the config as given", base, Candidate(measure_candidate(result_, budget), None, seconds_, result_))
    else:
        attempt_wave([("plain", "the config as given", base)], cumulative=False)
    # 2. The accuracy passes: keep the best of them (or the plain compile).
    passes = [("accuracy-passes", label, base.replace(**switches)) for label, switches in pass_candidates.items()
              if not all(getattr(base, k) == v for k, v in switches.items())]  # the config has them already
    while passes and not finished():
        recorded = attempt_wave(passes[:wave_size], cumulative=False)
        if not recorded:
            break
        passes = passes[len(recorded):]
    # 3. and 4. Promote the most sensitive activations: 16-bit, then float.
    promoted: dict[str, Any] = {}
    # 2b. The fallback: broad measures tried before any ranking is paid for. Steps 3 and 4 go on
    # from the best before it: they rank and promote what that compile rounds.
    branch = dict(best)
    attempt_wave([("fallback", label, base.replace(**switches)) for label, switches in fallback.items()
                  if not all(getattr(base, k) == v for k, v in switches.items())], cumulative=False)
    ranked = None
    if not finished() and batches:
        try:
            ranked = _rank(float_model, branch["result"], steps_results["plain"], batches[:rank_batches or None],
                           config, promoted, executor, output_aware)
        except ModelError as error:
            # Without a ranking there is nothing to promote; the best candidate so far still ships.
            logger.warning("accuracy search: no sensitivity ranking, so no promotions: %s", error)
            state["stop"] = f"no sensitivity ranking ({error})"
    if ranked is not None:
        wide = _wide_type(base, target_spec) if promote_16bit else None
        current = (branch["config"], list(branch["config"].exclude_nodes))
        if wide is not None:
            names = [t.tensor for t in ranked if t.qtype is not None and quant_type(t.qtype).qmax - quant_type(t.qtype).qmin < 65535]
            gain = promoted.get("gain_db", {})
            if min_promotion_gain_db is not None and names and gain.get(names[0], -math.inf) < min_promotion_gain_db:
                names = []  # not even the most sensitive tensor's rounding costs that much

            def promote(state_: tuple, group: list[str]):
                config_, excluded = state_
                # The new exact names come first: the first matching override wins.
                overrides = {**{f"^{re.escape(name)}$": wide for name in group}, **config_.activation_type_overrides}
                return f"{', '.join(group)} -> {wide}", (config_.replace(activation_type_overrides=overrides), excluded)

            current = accumulate("16-bit activations", _groups(names, single_promotions), promote, current)
        current = (current[0], list(current[0].exclude_nodes))
        consumers = [[c for c in t.consumers if c and c not in current[1]] for t in ranked]

        planned = int((branch["result"].report.plan or {}).get("quantized_nodes") or 0)
        cap = None if max_float_fraction is None else max(1, int(max_float_fraction * planned))

        def keep_float(state_: tuple, group: list[int]):
            config_, excluded = state_
            nodes = [node for i in group for node in consumers[i] if node not in excluded]
            if not nodes or (cap is not None and len(excluded) + len(nodes) > cap):
                return None
            change = (f"nodes reading {', '.join(ranked[i].tensor for i in group)} kept float: {', '.join(nodes)}")
            return change, (config_.replace(exclude_nodes=excluded + nodes), excluded + nodes)

        if promote_float:
            accumulate("float", _groups([i for i, c in enumerate(consumers) if c], single_promotions), keep_float, current)
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
        "executor": executor.describe(),
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


def _rank(float_model, result: CompileResult, plain: CompileResult | None, batches: list[dict],
          config: CompileConfig, record: dict, executor: Executor, output_aware: int = OUTPUT_AWARE) -> list:
    """The best candidate's quantized activations, most sensitive first.

    First ``qcompile.analysis.debug.activation_errors``' isolated SQNR (the float tensor rounded on its grid:
    cheap, one pass over the data for all tensors); then, for the OUTPUT_AWARE worst of those, the
    outputs' SQNR with only that tensor's rounding undone (its DequantizeLinear replaced by the float
    tensor; one run of the evaluation batches each): the tensor whose rounding costs the outputs
    most comes first. A tensor with little error of its own can still ruin the outputs (a large
    channel that the next layer ignores sets a grid too coarse for the channels it reads).
    Tensors inside If branches and loop bodies have no isolated SQNR (ONNX Runtime cannot return a
    subgraph's values): up to ``SUBGRAPH_OUTPUT_AWARE`` of them, in graph order, are measured at
    the outputs too (silero-vad's whole network is one If branch)."""
    start = time.perf_counter()
    if _quantized_in_subgraphs_only(result.model):
        errors = []
    else:
        try:
            errors = activation_errors(float_model, result.model, batches, threads=config.threads)
        except ModelError as error:
            # The best candidate changed the float function (bias correction moves biases, AdaRound
            # weights): with its quantization undone it is no longer the float model, so the ranking is
            # taken on the plain compile, whose activations have the same names.
            if plain is None or plain is result:
                raise
            logger.info("ranking sensitivity on the plain compile: %s", error)
            result = plain
            errors = activation_errors(float_model, result.model, batches, threads=config.threads)

    def isolated(t):
        return t.isolated_sqnr_db if t.isolated_sqnr_db is not None else math.inf

    ranked = sorted((t for t in errors if t.qtype is not None), key=lambda t: (isolated(t), t.index))
    inside = _subgraph_activations(result, {t.tensor for t in errors}, len(errors))
    gains = {}
    if weight_bytes(result.model) <= LARGE_MODEL_BYTES or (inside and not errors):
        worst = {t.tensor: t.dequantized for t in ranked[:output_aware] + inside[:SUBGRAPH_OUTPUT_AWARE]}
        rows, _ = activation_sensitivity(float_model, result.model, batches, tensors=list(worst),
                                         executor=executor, threads=config.threads)
        measured = [r for r in rows if r.output_sqnr_db_if_float is not None and worst.get(r.tensor) == r.dequantized]
        gains = {r.tensor: r.output_sqnr_db_if_float for r in measured}
        record["gain_db"] = {r.tensor: r.gain_db for r in measured if r.gain_db is not None}
    ranked = sorted(ranked + inside, key=lambda t: (-gains.get(t.tensor, -math.inf), isolated(t), t.index))
    record.update(
        measure=(f"outputs' worst SQNR with only the tensor's rounding undone, highest first (the {output_aware} "
                 "lowest by isolated SQNR, and the tensors inside subgraphs); then isolated SQNR (qcompile.analysis.debug), "
                 "lowest first"),
        seconds=round(time.perf_counter() - start, 3),
        ranking=[{"tensor": t.tensor, "output_sqnr_db_if_float": gains.get(t.tensor),
                  "isolated_sqnr_db": t.isolated_sqnr_db, "accumulated_sqnr_db": t.accumulated_sqnr_db,
                  "consumers": t.consumers} for t in ranked[:20]],
    )
    return ranked


# Tensors inside subgraphs measured at the outputs (no isolated SQNR to choose by): at most this many, in graph order.
SUBGRAPH_OUTPUT_AWARE = 16


@dataclasses.dataclass
class _Ranked:
    """A quantized activation inside a subgraph, as the promotions read it (the fields of
    ``qcompile.analysis.debug.TensorError`` that ``_search`` uses; no isolated SQNR)."""

    tensor: str
    dequantized: str
    consumers: list[str]
    qtype: str | None
    index: int
    isolated_sqnr_db: float | None = None
    accumulated_sqnr_db: float | None = None


def _quantized_in_subgraphs_only(model: ir.Model) -> bool:
    """Whether every QuantizeLinear is inside an If branch or a loop body (silero-vad's 16 kHz network)."""
    return (not any(n.op_type == "QuantizeLinear" for n in model.graph)
            and any(n.op_type == "QuantizeLinear" for n in ir.traversal.RecursiveGraphIterator(model.graph)))


def _subgraph_activations(result: CompileResult, known: set[str], first_index: int) -> list[_Ranked]:
    """The quantized activations inside If branches and loop bodies (none of ``known``), in graph order."""
    if not any(n.op_type == "QuantizeLinear" and n.graph is not result.model.graph
               for n in ir.traversal.RecursiveGraphIterator(result.model.graph)):
        return []
    proto = result.to_proto()
    main = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    qtypes = _activation_qtypes(proto)
    found = [(tensor, dq, consumers) for tensor, dq, consumers in quantized_activations(proto)
             if dq not in main and tensor not in known and tensor in qtypes]
    return [_Ranked(tensor, dq, consumers, qtypes[tensor], first_index + i) for i, (tensor, dq, consumers) in enumerate(found)]


def _activation_qtypes(proto: onnx.ModelProto) -> dict[str, str]:
    """Quantized tensor -> its integer format's name, from its QuantizeLinear's zero point."""
    nodes = proto_nodes(proto.graph)
    initializers = {t.name: t for t in proto.graph.initializer}
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                initializers.update({t.name: t for t in attribute.g.initializer})
    names = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT16: "uint16",
             onnx.TensorProto.INT16: "int16"}
    found = {}
    for node in nodes:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in initializers:
            name = names.get(initializers[node.input[2]].data_type)
            if name is not None:
                found[node.input[0]] = name
    return found


def recovery_fallback(config: CompileConfig) -> dict[str, dict[str, Any]]:
    """Recovery's search: the plain compile; then this fallback: GPTQ rounding and bias correction
    with every activation 16-bit (when the target has a 16-bit type of the run's signedness); then,
    while time is left, float for the nodes reading the most sensitive tensors, in groups that
    double, from the best (ranked on a sample of the evaluation batches: the ranking costs more
    than a compile).

    Measured on real models (``python -m benchmarks --case real_models``), worst output SQNR:
    PicoDet layout detector, plain -0.9 dB, +BC -0.6, all 16-bit 18.4, +BC 16-bit 29.5; PP-OCRv4
    recognizer, plain 12.9, +BC 14.7, all 16-bit 17.2, +BC 16-bit 25.6. Rounding the weights
    shifts each channel's mean, which compounds through BatchNorm-folded depthwise stacks (bias
    correction cancels it); 8-bit activations lose what is left. Once activations are 16-bit the
    weights' rounding is what remains, and GPTQ removes most of it (the corpus' data, ``qcompile
    compile MODEL --calib C --eval E --no-recover --activation-type uint16 --bias-correction``, then
    with ``--gptq-rounding``): all-MiniLM-L6-v2 21.6 -> 30.6 dB, PP-OCRv4 recognizer
    25.6 -> 27.6, PP-OCRv6 recognizer 24.3 -> 30.0, PP-OCRv4 detector 30.8 -> 36.3, YOLOX
    character detector 35.9 -> 47.1, SLANet 44.5 -> 47.4, PicoDet 29.5 -> 32.3; at 8-bit activations it is no such
    win (PP-LCNet direction classifier 24.7 -> 18.5 dB), so the plain compile does not run it.
    Equalization is not tried: these backbones put hard-swish between their convolutions, which
    it cannot scale through. The cost: ONNX Runtime's CPU provider has no 16-bit integer kernels,
    so those nodes run in float between their Q/DQ (the int8 weights still keep the file small);
    the report says so."""
    wide = _wide_type(config, get_target(config.target))
    if wide is None:
        return {"+BC": {"bias_correction": True}}
    return {f"+GPTQ, +BC, {wide} activations": {"gptq_rounding": True, "bias_correction": True, "activation_type": wide}}


# Recovery ranks on a sample: on PicoDet (8 batches of 800x608 pages) the full ranking, 16 tensors
# measured at the outputs over every batch, took 120 s of its 100 s budget.
RECOVERY_RANK_BATCHES = 2
RECOVERY_OUTPUT_AWARE = 4
# Recovery keeps at most this share of the plan's nodes float: PP-OCRv6's recognizer reached the
# floor only with 476 of 480 nodes float, a file 99.6 % of fp32 (no longer a quantized model).
RECOVERY_MAX_FLOAT_FRACTION = 0.25

RECOVERY_16BIT_NOTE = ("16-bit activations: ONNX Runtime's CPU provider has no 16-bit integer kernels, so these "
                       "nodes run in float between their QuantizeLinear/DequantizeLinear; the int8 weights keep the "
                       "file small, not the latency")


# Refinement (above the floor, below recover_target_sqnr): this many 16-bit candidates after
# REFINE_PASSES' (the most output-sensitive tensor at 16 bits, then it and the next two), kept only for a
# gain of at least REFINE_MIN_GAIN_DB. Measured (qcompile compile MODEL --calib C --eval E with the
# tensor at 16 bits, the real_models corpus): magika's first Conv output 29.6 -> 34.6 dB;
# silero-vad's STFT magnitude 28.3 -> 29.5 dB, with the first encoder ReLU 30.8 dB and streamed
# speech-decision agreement 97.9 -> 98.7 %.
REFINE_CANDIDATES = 2
REFINE_MIN_GAIN_DB = 1.0
# Tried first, at 8 bits (no latency cost), the promotions then building on the better of it and
# the plain compile. GPTQ rounding with bias correction (qcompile compile MODEL --calib C --eval E
# --no-recover --gptq-rounding --bias-correction, the real_models data): PP-OCRv6 detector 23.3 ->
# 27.6 dB (mask agreement 97.4 -> 98.5 %), YOLOv8n 26.5 -> 27.6 dB (box F1 94.7 -> 100 %), but
# PP-LCNet classifier 24.7 -> 19.7 and the CRNN captcha reader 24.7 -> 21.4: a win to measure for,
# not a default. Bias correction alone was no better anywhere (27.4, 26.7, 18.5, 21.7 dB).
REFINE_PASSES: dict[str, dict[str, bool]] = {"+GPTQ+BC": {"gptq_rounding": True, "bias_correction": True}}


def _refine(model, calibration_data, config: CompileConfig, eval_data, show_progress: bool, result: CompileResult,
            plain_seconds: float, plain_sqnr: float) -> CompileResult:
    """The plain compile met the floor but not ``config.recover_target_sqnr``. Tried, within
    ``config.recover_time_budget``: GPTQ rounding with bias correction (``REFINE_PASSES``, no
    latency cost); then, on the better of that and the plain compile, 16-bit activations for the
    tensors whose rounding costs the outputs most (``_rank`` on a sample of the evaluation batches),
    the first alone and then with the next two, but only when undoing the first one's rounding
    gains ``REFINE_MIN_GAIN_DB`` there (a model whose error is spread thin pays for the ranking
    only); nothing is kept float. The best candidate ships only if its worst output SQNR gains
    ``REFINE_MIN_GAIN_DB`` over the plain compile's: a 16-bit tensor's readers run in float on
    ORT's CPU provider, so it is a handful of tensors and only for a real gain. The report's
    ``recovery`` entry (``kind`` refine) says what was tried and what shipped; the plain compile's
    gate stands (the target is no floor)."""
    start = time.perf_counter()
    target = config.recover_target_sqnr
    if _wide_type(config, get_target(config.target)) is None:
        return result  # FP8 runs (and targets without a 16-bit type) are not refined
    logger.info("worst output SQNR %.2f dB is above the %.0f dB floor but below the %.0f dB target: trying GPTQ with "
                "bias correction, then 16-bit activations for its most sensitive tensors", plain_sqnr,
                config.recover_min_sqnr, target)
    gate = result.report.accuracy_gate
    try:
        best, search = compile_within_budget(
            model, calibration_data, config=config, eval_data=eval_data, min_sqnr=target,
            time_budget=config.recover_time_budget, show_progress=show_progress, pass_candidates=REFINE_PASSES,
            single_promotions=1, promote_16bit=True, promote_float=False, min_promotion_gain_db=REFINE_MIN_GAIN_DB,
            plain=(result, plain_seconds), fallback={}, rank_batches=RECOVERY_RANK_BATCHES,
            output_aware=RECOVERY_OUTPUT_AWARE, max_candidates=1 + len(REFINE_PASSES) + REFINE_CANDIDATES)
    except AccuracyGateError as missed:
        if getattr(missed, "result", None) is None:
            raise
        best, search = missed.result, missed.search
    final = worst_output_sqnr(best)
    kept = best is not result and final is not None and final - plain_sqnr >= REFINE_MIN_GAIN_DB
    chosen = search["steps"][search["chosen_step"]] if kept else search["steps"][0]
    shipped = best if kept else result
    shipped.report.transformations.pop("accuracy-search", None)
    shipped.report.accuracy_gate = gate
    added: list[str] = []
    if kept:  # the candidates accumulate: name every measure the shipped compile took
        wide = _wide_type(config, get_target(config.target))
        added = [re.sub(r"\\(.)", r"\1", pattern[1:-1]) for pattern in shipped.report.config.get("activation_type_overrides", {})
                 if pattern not in config.activation_type_overrides]
        order = {row["tensor"]: i for i, row in enumerate((search.get("sensitivity") or {}).get("ranking", []))}
        added.sort(key=lambda name: order.get(name, len(order)))
        parts = [label for label, switches in REFINE_PASSES.items()
                 if all(shipped.report.config.get(k) == v for k, v in switches.items())
                 and not all(getattr(config, k) == v for k, v in switches.items())]
        parts += [f"{', '.join(added)} -> {wide}"] if added else []
        chosen = {**chosen, "change": ", ".join(parts) or chosen["change"]}
    refinement = {
        "kind": "refine", "floor_db": config.recover_min_sqnr, "target_db": target,
        "plain_min_sqnr_db": round(plain_sqnr, 3), "final_min_sqnr_db": round(worst_output_sqnr(shipped), 3),
        "met": worst_output_sqnr(shipped) >= target, "kept": kept,
        "changed": chosen["change"] if kept else "nothing (the plain compile)", "stage": chosen["stage"],
        "candidates": len(search["steps"]), "stopped": search["stopped"],
        "tried": [{"change": s["change"], "min_sqnr_db": s.get("min_sqnr_db"), "seconds": s["seconds"]}
                  for s in search["steps"][1:]],
        "ranking": (search.get("sensitivity") or {}).get("ranking", [])[:5],
        "seconds": round(time.perf_counter() - start, 3),
    }
    if added:
        refinement["note"] = RECOVERY_16BIT_NOTE
    shipped.report.transformations["recovery"] = refinement
    logger.warning("refine: %.2f dB -> %.2f dB (target %.0f dB): %s", plain_sqnr, refinement["final_min_sqnr_db"], target,
                   f"{chosen['change']}" if kept else
                   f"kept the plain compile (no candidate gained {REFINE_MIN_GAIN_DB:g} dB)")
    return shipped


def worst_output_sqnr(result: CompileResult) -> float | None:
    """The lowest SQNR (dB) over the outputs the report evaluated, or None when none was."""
    values = [m["sqnr_db"] for m in result.report.evaluation.get("outputs", {}).values()
              if isinstance(m.get("sqnr_db"), (int, float))]
    return min(values) if values else None


def compile_or_recover(
    model: Any,
    calibration_data: Any = None,
    *,
    config: CompileConfig | Mapping | str | Path | None = None,
    target: str | None = None,
    eval_data: Any = None,
    show_progress: bool = False,
    **compile_options: Any,
) -> CompileResult:
    """``qcompile.compile``, and when its worst output SQNR on the evaluation batches is below
    ``config.recover_min_sqnr``, the accuracy search with that floor as its budget, within
    ``config.recover_time_budget`` seconds (the command line's default compile).

    The plain result is returned as it is when it meets ``config.recover_target_sqnr`` (and the
    floor), when ``config.recover`` is off, or when there is nothing to evaluate on. Between the
    floor and the target, ``_refine`` tries 16-bit activations for its most sensitive tensors and
    keeps them only for a real gain. Below the floor, the search's best model is returned, with
    ``report.transformations["recovery"]`` saying what the search changed and what it measured;
    when the floor is still missed, ``AccuracyGateError`` is raised with that best result as
    ``.result`` (the command line writes it and exits 3).
    """
    config = resolve_config(config, target=target)
    calibration_data, eval_data = repeatable(calibration_data), repeatable(eval_data)
    start = time.perf_counter()
    result = plain_compile(model, calibration_data, config=config, eval_data=eval_data,
                           show_progress=show_progress, **compile_options)
    plain_seconds = time.perf_counter() - start
    plain_sqnr = worst_output_sqnr(result)
    if not config.recover or plain_sqnr is None:
        return result
    if plain_sqnr >= config.recover_min_sqnr:
        if plain_sqnr >= config.recover_target_sqnr:
            return result
        return _refine(model, calibration_data, config, eval_data, show_progress, result, plain_seconds, plain_sqnr)
    floor, seconds = config.recover_min_sqnr, config.recover_time_budget
    logger.warning("worst output SQNR %.2f dB is below the %.0f dB floor: searching for accuracy measures "
                   "for up to %.0f s (recover = false / --no-recover ships the plain compile)", plain_sqnr, floor, seconds)
    start = time.perf_counter()
    error = None
    try:
        best, search = compile_within_budget(
            model, calibration_data, config=config, eval_data=eval_data, min_sqnr=floor, time_budget=seconds,
            show_progress=show_progress, pass_candidates={}, single_promotions=1, promote_16bit=False,
            plain=(result, plain_seconds), fallback=recovery_fallback(config), rank_batches=RECOVERY_RANK_BATCHES,
            output_aware=RECOVERY_OUTPUT_AWARE, max_float_fraction=RECOVERY_MAX_FLOAT_FRACTION)
    except AccuracyGateError as missed:
        if getattr(missed, "result", None) is None:
            raise
        best, search, error = missed.result, missed.search, missed
    chosen = search["steps"][search["chosen_step"]]
    recovery = {
        "floor_db": floor, "time_budget_s": seconds, "plain_min_sqnr_db": round(plain_sqnr, 3),
        "final_min_sqnr_db": None if worst_output_sqnr(best) is None else round(worst_output_sqnr(best), 3),
        "met": search["met"], "changed": chosen["change"], "stage": chosen["stage"],
        "candidates": len(search["steps"]), "stopped": search["stopped"],
        "seconds": round(time.perf_counter() - start, 3),
    }
    if best.report.config.get("activation_type") != config.activation_type:
        recovery["note"] = RECOVERY_16BIT_NOTE
    best.report.transformations["recovery"] = recovery
    logger.warning("recovery: %.2f dB -> %s dB with %s (%s)", plain_sqnr, recovery["final_min_sqnr_db"],
                   chosen["change"], "floor met" if search["met"] else f"floor missed: {search['stopped']}")
    if error is not None:
        error.args = (f"{error.args[0]} (recovery from the plain compile's {plain_sqnr:.2f} dB; "
                      "--no-recover ships the plain compile)",)
        raise error
    return best
