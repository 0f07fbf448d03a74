"""What every case shares: quantizing in a child process, CPU sessions, alternating latency runs."""

from __future__ import annotations

__all__ = ["CaseSkipped", "examples_module", "THREADS", "QUANTIZERS", "compile_in_child", "compile_variants", "cpu_session",
           "alternating_latencies", "sqnr_db", "ratio_note", "available_gib"]

import json
import logging
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class CaseSkipped(Exception):
    """A case that cannot run here (a missing optional package); the message says what to install."""


def examples_module(name: str):
    """Import ``examples/<name>.py`` (the examples own the real models and data), or skip the case
    when what it needs is not installed."""
    import importlib

    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] in ("qcompile", "benchmarks", name):
            raise  # our own code is broken: that is a failure, not a missing extra
        raise CaseSkipped(f"needs {error.name}: pip install -e '.[examples]'") from None

CHILD = Path(__file__).with_name("_compile_child.py")
THREADS = 2
# Row label -> the child's --tool. ORT u8 is the configuration that runs fast on the CPU provider;
# ORT s8 (signed activations) is the other one users commonly pick.
QUANTIZERS = {"qcompile": "qcompile", "ORT u8": "ort-u8", "ORT s8": "ort-s8"}


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def compile_in_child(tool: str, model: Path, out: Path, *, cap_gib: float | None = None, **options) -> dict:
    """Run one quantizer in ``_compile_child.py``; its wall time and peak RSS, or ``{"error": ...}``.

    ``options`` become the child's flags (``calib=DIR`` -> ``--calib DIR``). Each child gets an
    address-space cap (70% of the memory available now, unless given) so that a run that would
    exhaust the machine fails instead.
    """
    cap = cap_gib if cap_gib is not None else 0.7 * available_gib()
    command = [sys.executable, str(CHILD), "--tool", tool, "--model", str(model), "--out", str(out),
               "--max-gib", f"{cap:.1f}"]
    for key, value in options.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    logger.info("quantizing with %s: %s", tool, " ".join(command[2:]))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        logger.error("%s failed (exit %d): %s", tool, done.returncode, done.stderr[-2000:])
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(results[-1][len("RESULT "):])


def compile_variants(
    fp32: Path, folder: Path, variants: Mapping[str, tuple[str, dict]]
) -> tuple[dict[str, Path], dict[str, dict], dict[str, str]]:
    """Quantize ``fp32`` once per variant (row label -> (child tool, child options)), each in its own
    child process. Returns the models that exist (fp32 first), every compile's measurements, and
    the error of each variant that failed (its row is left out; the case notes say why)."""
    paths, compiles = {"fp32": fp32}, {}
    for label, (tool, options) in variants.items():
        slug = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        paths[label] = folder / f"{fp32.stem}_{slug}.onnx"
        compiles[label] = compile_in_child(tool, fp32, paths[label], **options)
    failed = {label: c["error"] for label, c in compiles.items() if "error" in c}
    return {label: path for label, path in paths.items() if label not in failed}, compiles, failed


def cpu_session(path: Path) -> tuple[ort.InferenceSession, dict]:
    """A CPU session with THREADS threads, and what ORT made of the model (integer kernels, float
    compute left), read from its optimized graph."""
    from qcompile.backends.cpu import cpu_fusion_report

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    # Idle sessions must not spin: their threads would steal the cores of the one being timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fusion = cpu_fusion_report(onnx.load_model(options.optimized_model_filepath), set())
    return session, fusion


def alternating_latencies(sessions: Mapping[str, ort.InferenceSession], feed: dict, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per model. After warm-up the models take turns, the starting one rotating each
    round, so that machine noise hits all of them alike."""
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feed)
    times = {name: [] for name in names}
    for round_ in range(runs):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10 log10(sum x^2 / sum (x - x_q)^2), in float64."""
    x, y = reference.astype(np.float64), candidate.astype(np.float64)
    return float(10.0 * np.log10(np.sum(x * x) / np.sum((x - y) ** 2)))


def ratio_note(ours: Mapping, theirs: Mapping, label: str, keys: Mapping[str, str]) -> str:
    """'qcompile / LABEL: k1 0.95x, k2 1.10x' for the numeric keys both rows have (<1: qcompile lower)."""
    parts = []
    for key, title in keys.items():
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            parts.append(f"{title} {a / b:.2f}x")
    return f"qcompile / {label}: " + ", ".join(parts)
