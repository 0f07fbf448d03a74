"""``qcompile.compile``: load, run the pass pipeline, evaluate, report."""

from __future__ import annotations

__all__ = ["compile", "CompileResult", "resolve_config", "save_model_atomically"]

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qcompile.backends import get_target
from qcompile.config import CompileConfig, load_config
from qcompile.context import CompileContext
from qcompile.data import BatchSource, input_specs
from qcompile.errors import AccuracyGateError, ConfigError, OutputError
from qcompile.evaluate import compare_outputs, measure_latency
from qcompile.loader import describe_source, load_model
from qcompile.pipeline import format_pipeline, parse_pipeline, run_pipeline
from qcompile.recipes import pipeline_for
from qcompile.report import Report
from qcompile.runtime import make_session

logger = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("qcompile", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def resolve_config(config: CompileConfig | Mapping | str | Path | None, **overrides: Any) -> CompileConfig:
    """A CompileConfig from a config object, a dict, or a qcompile.toml path, plus non-None overrides."""
    if config is None:
        base = CompileConfig()
    elif isinstance(config, CompileConfig):
        base = config
    elif isinstance(config, Mapping):
        base = CompileConfig.from_dict(dict(config))
    elif isinstance(config, (str, Path)):
        base = load_config(config)
    else:
        raise ConfigError(f"config must be a CompileConfig, a dict or a path to qcompile.toml, not {type(config).__name__}.")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**changes) if changes else base


class CompileResult:
    """The compiled model and its report."""

    def __init__(self, model: ir.Model, report: Report):
        self.model = model
        self.report = report

    def to_proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)

    def save(self, path: str | Path, *, report_path: str | Path | None = None) -> None:
        """Write the model (and optionally report.json) atomically: complete files or none."""
        save_model_atomically(self.to_proto(), Path(path))
        if report_path is not None:
            write_text_atomically(Path(report_path), self.report.to_json())


def _temp_beside(path: Path):
    if not path.parent.is_dir():
        raise OutputError(f"Cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(f"Cannot write into {str(path.parent)!r}: {error.strerror}. Choose a writable folder.") from None
    os.close(fd)
    # mkstemp creates the file 0600; the output gets the mode any new file would (0666 less umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = _temp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        raise OutputError(f"Cannot write {str(path)!r}: {error.strerror}.") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_model_atomically(proto: onnx.ModelProto, path: Path) -> None:
    """Write to a temp file beside ``path`` and rename, so a failure leaves no partial output.

    Models over 2 GB get their weights in ``<name>.data`` beside the model, written the same way.
    """
    tmp = _temp_beside(path)
    data_tmp = None
    large = sum(len(t.raw_data) for t in proto.graph.initializer) > 1_800_000_000
    try:
        if large:
            data_name = f"{path.name}.data"
            data_tmp = path.parent / f".{data_name}.tmp"
            onnx.save_model(proto, str(tmp), save_as_external_data=True, location=data_tmp.name)
            # Point the model at the final data file name before renaming both.
            final = onnx.load_model(str(tmp), load_external_data=False)
            for tensor in final.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(final, str(tmp))
            os.replace(data_tmp, path.parent / data_name)
        else:
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except OSError as error:
        raise OutputError(
            f"Cannot write {str(path)!r}: {error.strerror or error}. Check free space and permissions."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
        if data_tmp is not None:
            data_tmp.unlink(missing_ok=True)


def compile(  # noqa: A001  (the verb users expect: qcompile.compile)
    model: Any,
    calibration_data: str | Path | Iterable[Mapping] | None = None,
    *,
    target: str | None = None,
    config: CompileConfig | Mapping | str | Path | None = None,
    eval_data: str | Path | Iterable[Mapping] | None = None,
    example_inputs: tuple | None = None,
    dynamic_shapes: Any = None,
    dump_after: Sequence[str] = (),
    dump_dir: str | Path | None = None,
    show_progress: bool = False,
) -> CompileResult:
    """Compile ``model`` for ``target`` and evaluate it against the float model.

    ``model``: an .onnx path (external data beside it is loaded), an ``onnx.ModelProto``, an
    ``onnx_ir.Model`` or a ``torch.nn.Module`` with ``example_inputs`` (and optional
    ``dynamic_shapes``, as torch.export takes them). ``calibration_data``: a directory of .npz
    files (one batch each, keys = input names) or an iterable of ``{input_name: array}``.
    The input model is never modified. Raises ``AccuracyGateError`` (with ``.result``) when
    ``config.min_sqnr`` is set and an output falls below it.
    """
    config = resolve_config(config, target=target)
    target_spec = get_target(config.target)
    float_model = load_model(model, example_inputs, dynamic_shapes)
    specs = parse_pipeline(pipeline_for(config.pipeline, config.recipe, target_spec))
    float_proto = ir.serde.serialize_model(float_model)
    inputs = input_specs(float_model)
    data = None
    if calibration_data is not None:
        data = BatchSource(calibration_data, inputs, eval_source=eval_data, max_eval=config.eval_batches)
    context = CompileContext(config=config, target=target_spec, data=data, show_progress=show_progress)
    working = ir.serde.deserialize_model(float_proto)
    compiled, timings = run_pipeline(working, specs, context, dump_after=dump_after, dump_dir=dump_dir)
    compiled_proto = ir.serde.serialize_model(compiled)

    plan = context.analyses.get("plan")
    evaluation, latency, fusion = _evaluate(float_proto, compiled_proto, data, config, target_spec, plan)
    verification = _verify_on_target(compiled_proto, data, config, target_spec)
    gate = _accuracy_gate(config, evaluation)
    report = Report(
        versions=_versions(),
        source=describe_source(model),
        target=target_spec.name,
        config=config.to_dict(),
        pipeline=format_pipeline(specs),
        passes=[{"name": t.name, "seconds": round(t.seconds, 4), "modified": t.modified} for t in timings],
        plan=plan.summary() if plan is not None else {},
        calibration=_calibration_summary(context, config),
        evaluation=evaluation,
        size={"float_bytes": float_proto.ByteSize(), "quantized_bytes": compiled_proto.ByteSize()},
        latency=latency,
        fusion=fusion,
        accuracy_gate=gate,
        transformations=context.records,
        verification=verification,
    )
    result = CompileResult(compiled, report)
    if not report.gate_passed:
        error = AccuracyGateError(
            f"Accuracy gate failed: {gate['failing']} below the required SQNR of {config.min_sqnr} dB. "
            "Exclude the most sensitive layers (exclude_nodes), use 16-bit activations for them, or "
            "try calibration_method = 'percentile' or 'mse'."
        )
        error.result = result
        raise error
    return result


def _calibration_summary(context: CompileContext, config: CompileConfig) -> dict:
    if context.data is None or not context.data.calibration_batches:
        return {}
    return {
        "batches": context.data.calibration_batches,
        "method": config.calibration_method,
        "percentile": config.percentile if config.calibration_method == "percentile" else None,
        "data": context.data.description,
    }


def _evaluate(float_proto, compiled_proto, data: BatchSource | None, config: CompileConfig, target, plan):
    if data is None:
        return {"data": None, "outputs": {}}, {}, {}
    description, batches = data.evaluation()
    float_session = make_session(float_proto, threads=config.threads, what="float model")
    with tempfile.TemporaryDirectory(prefix="qcompile-") as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        quant_session = make_session(
            compiled_proto, providers=target.evaluation_providers or target.providers, threads=config.threads,
            optimized_model_path=optimized, what="compiled model",
        )
        fusion = {}
        if target.fusion_report is not None and os.path.exists(optimized):
            with contextlib.suppress(Exception):  # the report is best effort; never fail the compile
                fusion = target.fusion_report(onnx.load_model(optimized, load_external_data=False),
                                              set(plan.anchors) if plan else set())
    evaluation = {"data": description, "batches": len(batches), "outputs": {}}
    latency = {}
    if batches:
        evaluation["outputs"] = compare_outputs(float_session, quant_session, batches)
        if config.measure_latency:
            latency = {
                "batch_shapes": {k: list(v.shape) for k, v in batches[0].items()},
                "float": measure_latency(float_session, batches[0], config.latency_runs),
                "quantized": measure_latency(quant_session, batches[0], config.latency_runs),
                "threads": config.threads or "onnxruntime default",
                "provider": quant_session.get_providers()[0],
            }
            latency["speedup"] = round(latency["float"]["median_ms"] / latency["quantized"]["median_ms"], 3)
    return evaluation, latency, fusion


def _verify_on_target(compiled_proto, data: BatchSource | None, config: CompileConfig, target) -> dict:
    """The target's own check on its provider (placement, fidelity), for targets that have one."""
    if target.verify is None:
        return {}
    batches = data.evaluation()[1] if data is not None else []
    return target.verify(compiled_proto, batches, config)


def _accuracy_gate(config: CompileConfig, evaluation: dict) -> dict:
    if config.min_sqnr is None:
        return {"min_sqnr": None, "passed": True}
    outputs = evaluation.get("outputs", {})
    if not outputs:
        return {"min_sqnr": config.min_sqnr, "passed": False, "failing": "no evaluation data to check"}
    failing = {name: m["sqnr_db"] for name, m in outputs.items() if m["sqnr_db"] < config.min_sqnr}
    return {
        "min_sqnr": config.min_sqnr,
        "passed": not failing,
        "failing": ", ".join(f"{k} ({v} dB)" for k, v in failing.items()) if failing else None,
    }
