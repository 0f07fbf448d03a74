"""The compile report: what was done, what it cost, and how accurate and fast the result is."""

from __future__ import annotations

__all__ = ["Report"]

import dataclasses
import json
import math
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return value


@dataclasses.dataclass
class Report:
    """Everything one compilation did, as plain data; ``str(report)`` is the terminal summary."""

    versions: dict[str, str]
    source: str
    target: str
    config: dict[str, Any]
    pipeline: str
    passes: list[dict[str, Any]]
    plan: dict[str, Any]
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    size: dict[str, int]
    latency: dict[str, Any]
    fusion: dict[str, Any]
    accuracy_gate: dict[str, Any]
    transformations: dict[str, Any] = dataclasses.field(default_factory=dict)  # records passes left
    # The target's check on its own provider: where nodes run, agreement with the CPU reference.
    verification: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Full sha256 of what went into the compile and of its output (qcompile.core.reproduce): input_model
    # (the model as loaded, weights included), input_file (the .onnx file given), calibration_data
    # and evaluation_data (their arrays, in order), config (the keys that can change the output and
    # the resolved pipeline), versions, qcompile_code, inputs (all that determines the output),
    # output_model (the written .onnx file's sha256; for large models, of its content), and
    # output_files (large models: each file as written). `qcompile verify` checks a file against them.
    hashes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The pass cache: where, and what it saved (passes[i]["cache"] says which passes were hits).
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    # What the user should know before deploying: the target's measured caveats (``Target.warnings``,
    # e.g. cuda: slower than fp32, use tensorrt) and nodes its provider has no kernel for.
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @property
    def gate_passed(self) -> bool:
        return bool(self.accuracy_gate.get("passed", True))

    def __str__(self) -> str:
        lines = [f"qcompile {self.versions.get('qcompile')}: {self.source} -> target {self.target}"]
        plan = self.plan
        by_op = ", ".join(f"{k} {v}" for k, v in plan.get("quantized_by_op_type", {}).items())
        lines.append(f"  quantized: {plan.get('quantized_nodes', 0)} nodes ({by_op})")
        floats = plan.get("float_tensors", {})
        if floats:
            lines.append(f"  kept float: {len(floats)} tensors (masks/sentinels/exclusions; see report.json)")
        smoothing = self.transformations.get("smooth-quant", {})
        if smoothing.get("smoothed"):
            lines.append(f"  smooth-quant: {len(smoothing['smoothed'])} of {smoothing['candidates']} MatMul inputs smoothed")
        outliers = self.transformations.get("split-outliers", {})
        if outliers.get("split"):
            channels = sum(len(r["channels"]) for r in outliers["split"].values())
            lines.append(
                f"  split-outliers: {len(outliers['split'])} of {outliers['candidates']} MatMul inputs split, "
                f"{channels} channels multiplied in float"
            )
        if self.calibration:
            lines.append(
                f"  calibration: {self.calibration.get('batches')} batches, method {self.calibration.get('method')}"
            )
        before, after = self.size.get("float_bytes", 0), self.size.get("quantized_bytes", 0)
        if before:
            lines.append(f"  size: {_readable_bytes(before)} -> {_readable_bytes(after)} ({after / before:.1%})")
        for name, metrics in self.evaluation.get("outputs", {}).items():
            lines.append(
                f"  output {name}: SQNR {metrics['sqnr_db']} dB, cosine {metrics['cosine']}, "
                f"max abs error {metrics['max_abs_error']}"
            )
        if self.evaluation.get("data"):
            lines.append(f"  evaluated on: {self.evaluation['data']}")
        if self.latency.get("float") and self.latency.get("quantized"):
            lines.append(
                f"  latency (median): {self.latency['float']['median_ms']} ms float -> "
                f"{self.latency['quantized']['median_ms']} ms quantized ({self.latency['speedup']}x)"
            )
        if self.fusion:
            kernels = ", ".join(f"{k} {v}" for k, v in self.fusion.get("integer_kernels", {}).items())
            unfused = len(self.fusion.get("unfused_quantized_anchors", []))
            lines.append(f"  ORT integer kernels: {kernels or 'none'}; unfused quantized anchors: {unfused}")
            if self.fusion.get("weight_only_matmuls_by_bits"):
                counts = ", ".join(f"{count} at {bits} bits" for bits, count in self.fusion["weight_only_matmuls_by_bits"].items())
                lines.append(f"  weight-only MatMulNBits (float activations): {counts}")
            if self.fusion.get("note"):
                lines.append(f"  note: {self.fusion['note']}")
        fixed = self.transformations.get("fix-shapes")
        if fixed:
            shapes = ", ".join(f"{k} {v['from']} -> {v['to']}" for k, v in fixed["inputs"].items())
            lines.append(f"  fixed shapes ({fixed['source']}): {shapes}")
        lines.extend(_verification_lines(self.verification))
        total = sum(p["seconds"] for p in self.passes)
        lines.append(f"  compile time: {total:.2f}s in {len(self.passes)} passes")
        hits = [p["name"] for p in self.passes if p.get("cache") == "hit"]
        if hits:
            lines.append(f"  pass cache: {len(hits)} passes restored (up to {hits[-1]}), "
                         f"{self.cache.get('saved_seconds', 0):.2f}s saved")
        if self.hashes.get("output_model"):
            lines.append(f"  sha256: {self.hashes['output_model']}")
        search = self.transformations.get("accuracy-search")
        if search:
            lines.append(f"  accuracy search ({search['budget']}): {'met' if search['met'] else 'NOT met'}; "
                         f"chose step {search['chosen_step']} ({search['chosen']}) of {len(search['steps'])}, "
                         f"{search['seconds']:.1f}s" + ("" if search["met"] else f"; {self.accuracy_gate.get('failing')}"))
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        gate = self.accuracy_gate
        if gate.get("min_sqnr") is not None:
            verdict = "passed" if gate.get("passed") else f"FAILED: {gate.get('failing')}"
            lines.append(f"  accuracy gate (SQNR >= {gate['min_sqnr']} dB): {verdict}")
        return "\n".join(lines)


def _verification_lines(verification: dict[str, Any]) -> list[str]:
    if not verification:
        return []
    if "skipped" in verification:  # the provider is not installed where this compile ran
        return [f"  not verified on {verification['provider']}: {verification['skipped']}"]
    placed = verification["placement"]
    lines = [f"  placement: {placed['on_provider']} of {placed['nodes']} nodes on {placed['provider']}"
             + (f"; on other providers: {', '.join(r['name'] or r['op_type'] for r in placed['off_provider'][:5])}"
                if placed["off_provider"] else "")]
    floats = verification.get("float_compute_nodes", [])
    if floats:
        names = ", ".join(f"{n['name']} ({n['op_type']})" for n in floats[:5])
        more = f" and {len(floats) - 5} more" if len(floats) > 5 else ""
        lines.append(f"  float ops left (run in float on the provider): {names}{more}")
    for name, m in verification.get("fidelity", {}).get("outputs", {}).items():
        agreement = (f"{m['within_1_step']:.4%} within 1 step, max {m['max_diff_steps']} steps, "
                     if "within_1_step" in m else "")
        lines.append(f"  {placed['provider']} vs CPU reference, output {name}: {agreement}SQNR {m['sqnr_db']} dB")
    return lines


def _readable_bytes(count: int) -> str:
    """``count`` in the unit that shows it: bytes, KiB or MB (as the README's tables write sizes)."""
    if count < 1024:
        return f"{count} bytes"
    if count < 1_000_000:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1e6:.2f} MB"
