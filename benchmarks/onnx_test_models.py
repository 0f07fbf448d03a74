"""``python -m benchmarks.onnx_test_models``: compile every model the ``onnx`` package ships as test data.

The models under ``onnx/backend/test/data`` (``light/``, ``pytorch-converted/``,
``pytorch-operator/``, ``simple/``) come with their inputs and reference outputs. Each is compiled
for the CPU target, calibrated on its test inputs plus a few small perturbations of them, and the
compiled model is run in ONNX Runtime on the test inputs. Every model lands in one class:

- ``ok``: compiled, every float output within tolerance (SQNR >= ``MIN_SQNR_DB`` against the
  reference output, or against ONNX Runtime's float output where that itself differs from the
  reference), every non-float output equal;
- ``out of tolerance``: compiled, but an output misses that bound (its SQNR is listed);
- ``refused``: a ``QcompileError`` with a message saying why (the message is listed);
- ``CRASH``: any other exception, or a refusal that admits a qcompile bug (a compiled model that
  onnx.checker or ONNX Runtime rejects).

``real/`` holds only pointers (``data.json`` naming a download URL) and is skipped. Prints the
counts and a per-model table, and writes ``benchmarks/results/onnx_test_models.md``.
"""

from __future__ import annotations

__all__ = ["MIN_SQNR_DB", "SUITES", "Case", "Outcome", "discover", "format_markdown", "main", "run_case", "sweep"]

import argparse
import dataclasses
import logging
import math
import sys
import time
import traceback
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper

import qcompile
from qcompile.errors import QcompileError, detail
from qcompile.io.loader import load_model

logger = logging.getLogger("benchmarks.onnx_test_models")

DATA_ROOT = Path(onnx.__file__).parent / "backend" / "test" / "data"
SUITES = ("light", "pytorch-converted", "pytorch-operator", "simple")
SKIPPED_SUITES = {"real": "holds only data.json pointers to model archives downloaded at test time; nothing to compile here"}
# An 8-bit model of a float network typically reaches 25-45 dB; 20 dB is a relative RMS error of 10%.
MIN_SQNR_DB = 20.0
# Calibration batches: the test input and this many perturbations of it (one sample is too few to
# calibrate on: every range would be that sample's exact extremes).
PERTURBATIONS = 7
PERTURBATION = 0.05  # noise of this fraction of each float input's standard deviation
# Refusals that admit a qcompile bug are crashes, not refusals.
_BUG_MARKERS = ("qcompile bug", "cannot load the compiled model")
CLASSES = ("ok", "out of tolerance", "refused", "CRASH")


@dataclasses.dataclass
class Case:
    suite: str
    name: str
    model_path: Path
    # (inputs by name, reference outputs by name), one per test_data_set_*.
    data_sets: list[tuple[dict, dict]]


@dataclasses.dataclass
class Outcome:
    suite: str
    name: str
    status: str  # one of CLASSES
    detail: str = ""
    worst_sqnr_db: float | None = None
    compared_with: str = ""  # "reference" or "ORT float"
    quantized_nodes: int | None = None
    seconds: float = 0.0


# ----- loading the test data -----

def _read_value(path: Path, type_proto: onnx.TypeProto):
    """A test_data_set file as what ONNX Runtime takes: an array, a list of arrays, or None."""
    data = path.read_bytes()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _light_input(value: onnx.ValueInfoProto) -> np.ndarray:
    """The input onnx's own backend test feeds a light/ model (runner.generate_dummy_data)."""
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim)
    count = int(np.prod(shape))
    return (np.arange(count).reshape(shape) / count).astype(np.float32)


def discover(root: Path = DATA_ROOT, suites=SUITES) -> list[Case]:
    cases = []
    for suite in suites:
        directory = root / suite
        if suite == "light":
            for model_path in sorted(directory.glob("*.onnx")):
                model = onnx.load_model(str(model_path), load_external_data=False)
                inputs = {v.name: _light_input(v) for v in _graph_inputs(model)}
                outputs = {}
                for index, value in enumerate(model.graph.output):
                    path = model_path.with_name(f"{model_path.stem}_output_{index}.pb")
                    if path.exists():
                        outputs[value.name] = _read_value(path, value.type)
                cases.append(Case(suite, model_path.stem, model_path, [(inputs, outputs)]))
            continue
        for case_dir in sorted(p for p in directory.iterdir() if (p / "model.onnx").exists()):
            model_path = case_dir / "model.onnx"
            model = onnx.load_model(str(model_path), load_external_data=False)
            data_sets = []
            for set_dir in sorted(case_dir.glob("test_data_set_*")):
                inputs = {
                    v.name: _read_value(set_dir / f"input_{i}.pb", v.type)
                    for i, v in enumerate(_graph_inputs(model)) if (set_dir / f"input_{i}.pb").exists()
                }
                outputs = {
                    v.name: _read_value(set_dir / f"output_{i}.pb", v.type)
                    for i, v in enumerate(model.graph.output) if (set_dir / f"output_{i}.pb").exists()
                }
                data_sets.append((inputs, outputs))
            cases.append(Case(suite, case_dir.name, model_path, data_sets))
    return cases


# ----- calibration data -----

def calibration_batches(inputs: dict, count: int = PERTURBATIONS, seed: int = 0) -> list[dict]:
    """The test inputs and ``count`` perturbations of them: float arrays get Gaussian noise of
    PERTURBATION x their standard deviation; other inputs (indices, masks, strings) are kept."""
    rng = np.random.default_rng(seed)
    batches = [dict(inputs)]
    for _ in range(count):
        batch = {}
        for name, value in inputs.items():
            noise = None
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
                with np.errstate(all="ignore"):  # some inputs are uninitialized memory (1e199, 1e-310)
                    spread = float(np.std(value, dtype=np.float64)) or float(np.abs(value).max()) or 1.0
                    noise = rng.normal(0.0, PERTURBATION * spread, value.shape)
                    perturbed = (value + noise).astype(value.dtype)
                if not np.isfinite(perturbed).all():
                    noise = None
            batch[name] = value if noise is None else perturbed
        batches.append(batch)
    return batches


# ----- comparing outputs -----

def _sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    x = reference.astype(np.float64).ravel()
    y = candidate.astype(np.float64).ravel()
    with np.errstate(over="ignore"):  # some float64 test inputs are uninitialized memory (1e199)
        noise = float(np.sum((x - y) ** 2))
        signal = float(np.sum(x * x))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        # An all-zero reference: within tolerance only if the error is float rounding.
        return math.inf if math.sqrt(noise / x.size) < 1e-6 else -math.inf
    return 10.0 * math.log10(signal / noise)


def _matches_reference(reference, got) -> bool:
    """ONNX's own backend-test check: numpy allclose, rtol 1e-3 (atol 1e-5 instead of 1e-7, as
    the pytorch-converted references were computed in another runtime)."""
    if isinstance(reference, list):
        return isinstance(got, list) and len(reference) == len(got) and all(
            _matches_reference(r, g) for r, g in zip(reference, got)
        )
    if reference is None or got is None:
        return reference is None and got is None
    reference, got = np.asarray(reference), np.asarray(got)
    if reference.shape != got.shape:
        return False
    if reference.dtype.kind in "fc":
        return bool(np.allclose(got, reference, rtol=1e-3, atol=1e-5, equal_nan=True))
    return bool(np.array_equal(got, reference))


def _compare(reference, got) -> tuple[bool, float | None, str]:
    """(within tolerance, SQNR in dB for float outputs, why not) of one output."""
    if isinstance(reference, list) or reference is None:
        ok = _matches_reference(reference, got)
        return ok, None, "" if ok else "a sequence/optional output differs"
    reference, got = np.asarray(reference), np.asarray(got)
    if reference.shape != got.shape:
        return False, None, f"shape {list(got.shape)} instead of {list(reference.shape)}"
    if reference.dtype.kind != "f":
        ok = bool(np.array_equal(reference, got))
        share = float(np.mean(reference == got)) if reference.size else 1.0
        return ok, None, "" if ok else f"{reference.dtype} output: {share:.1%} of elements equal"
    if not (np.isfinite(reference).all() and np.isfinite(got).all()):
        same = bool(np.array_equal(np.isfinite(reference), np.isfinite(got)))
        finite = np.isfinite(reference)
        sqnr = _sqnr_db(reference[finite], got[finite]) if same else -math.inf
        return same and sqnr >= MIN_SQNR_DB, sqnr, "" if same else "non-finite values differ"
    sqnr = _sqnr_db(reference, got)
    return sqnr >= MIN_SQNR_DB, sqnr, ""


def _run(proto: onnx.ModelProto, feeds: dict) -> dict:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def run_case(case: Case, *, config: dict | None = None) -> Outcome:
    """Compile one test model and judge the compiled model on its test inputs."""
    start = time.perf_counter()
    outcome = Outcome(case.suite, case.name, "CRASH")
    try:
        _judge(case, outcome, config or {})
    except Exception as error:  # noqa: BLE001  (the sweep records every failure)
        frame = traceback.extract_tb(error.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        outcome.status, outcome.detail = "CRASH", f"{type(error).__name__} at {where}: {detail(error, 300)}"
    outcome.seconds = time.perf_counter() - start
    return outcome


def _judge(case: Case, outcome: Outcome, config: dict) -> None:
    model = onnx.load_model(str(case.model_path))
    # The float model as qcompile reads it (IR version 3 and opsets before 7 converted): what ORT can run.
    float_model = ir.serde.serialize_model(load_model(model))
    if not case.data_sets or not case.data_sets[0][0]:
        outcome.status, outcome.detail = "refused", "no test inputs to calibrate on"
        return
    inputs, _ = case.data_sets[0]
    settings = {"measure_latency": False, "eval_batches": 1, "threads": 1, **config}
    try:
        result = qcompile.compile(model, calibration_batches(inputs), config=settings)
    except QcompileError as error:
        message = detail(error, 300)
        bug = any(marker in message for marker in _BUG_MARKERS)
        outcome.status, outcome.detail = ("CRASH" if bug else "refused"), message
        return
    outcome.quantized_nodes = result.report.plan.get("quantized_nodes", 0) if result.report.plan else 0
    compiled = result.to_proto()
    onnx.checker.check_model(compiled, full_check=True)
    worst, problems, against, compared_float = math.inf, [], set(), False
    for feeds, references in case.data_sets:
        got = _run(compiled, feeds)
        # Where ONNX Runtime's float result already differs from the reference (another runtime's
        # numerics, or an op ORT computes differently), the float model is the yardstick.
        float_outputs = None
        for name, reference in references.items():
            expected, source = reference, "reference"
            if not _matches_reference(reference, got.get(name)):
                if float_outputs is None:
                    float_outputs = _run(float_model, feeds)
                if not _matches_reference(reference, float_outputs[name]):
                    expected, source = float_outputs[name], "ORT float"
            against.add(source)
            ok, sqnr, why = _compare(expected, got[name])
            if sqnr is not None:
                worst, compared_float = min(worst, sqnr), True
            if not ok:
                problems.append(f"{name}: {why or f'SQNR {sqnr:.1f} dB'}")
    outcome.worst_sqnr_db = worst if compared_float else None
    outcome.compared_with = " + ".join(sorted(against))
    outcome.status = "out of tolerance" if problems else "ok"
    outcome.detail = "; ".join(problems[:3])


def sweep(cases: list[Case], *, config: dict | None = None, progress: bool = False) -> list[Outcome]:
    outcomes = []
    for index, case in enumerate(cases):
        outcome = run_case(case, config=config)
        outcomes.append(outcome)
        if progress:
            print(f"[{index + 1}/{len(cases)}] {case.suite}/{case.name}: {outcome.status} "
                  f"({outcome.seconds:.1f}s) {outcome.detail[:120]}", file=sys.stderr, flush=True)
    return outcomes


# ----- reporting -----

def _format_sqnr(value: float | None) -> str:
    if value is None:
        return ""
    return "exact" if value == math.inf else f"{value:.1f}"


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    found = Counter(o.status for o in outcomes)
    return {status: found.get(status, 0) for status in CLASSES}


def format_markdown(outcomes: list[Outcome], seconds: float) -> str:
    total = counts(outcomes)
    lines = [
        "# qcompile on the ONNX project's test models",
        "",
        (f"`python -m benchmarks.onnx_test_models` (onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
         f"qcompile {metadata.version('qcompile')}), {len(outcomes)} models from `onnx/backend/test/data` "
         f"({', '.join(f'{s}/' for s in SUITES)}), {seconds:.0f} s."),
        "",
        (f"Calibration: each model's test input and {PERTURBATIONS} copies with Gaussian noise of "
         f"{PERTURBATION:g} x its standard deviation. Tolerance: every float output at SQNR >= {MIN_SQNR_DB:g} dB "
         "against the reference output (against ONNX Runtime's float output where that one differs from "
         "the reference: rtol 1e-3, atol 1e-5), every other output equal."),
        "",
        "| class | models |",
        "|---|---|",
        *(f"| {status} | {count} |" for status, count in total.items()),
        "",
        "Skipped: " + "; ".join(f"`{s}/` ({why})" for s, why in SKIPPED_SUITES.items()) + ".",
        "",
        "| suite | model | class | worst SQNR dB | compared with | quantized nodes | s | detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        text = o.detail.replace("|", "\\|")
        lines.append(
            f"| {o.suite} | {o.name} | {o.status} | {_format_sqnr(o.worst_sqnr_db)} | {o.compared_with} | "
            f"{'' if o.quantized_nodes is None else o.quantized_nodes} | {o.seconds:.1f} | {text} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_test_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", choices=SUITES, help="only this suite (repeatable)")
    parser.add_argument("--model", action="append", help="only models whose name contains this (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_test_models.md")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per model as it finishes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    cases = discover(suites=args.suite or SUITES)
    if args.model:
        cases = [c for c in cases if any(m in c.name for m in args.model)]
    start = time.perf_counter()
    outcomes = sweep(cases, progress=args.verbose)
    seconds = time.perf_counter() - start
    markdown = format_markdown(outcomes, seconds)
    print(markdown)
    print("counts: " + ", ".join(f"{k} {v}" for k, v in counts(outcomes).items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown)
    return 1 if counts(outcomes)["CRASH"] else 0


if __name__ == "__main__":
    sys.exit(main())
