"""``qcompile.compile``: load, run the pass pipeline, evaluate, report."""

from __future__ import annotations

__all__ = ["CompileResult", "check_destination", "compile", "resolve_config", "save_model_atomically",
           "write_text_atomically"]

import contextlib
import logging
import os
import platform
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qcompile.backends import get_target
from qcompile.core.cache import PassCache, PipelineCache, cache_directory
from qcompile.core.config import CompileConfig, load_config
from qcompile.core.context import CompileContext
from qcompile.io.data import BatchSource, check_npz_headers, input_specs
from qcompile.errors import AccuracyGateError, ConfigError, OutputError
from qcompile.analysis.evaluate import compare_outputs, compare_to_outputs, measure_latency
from qcompile.scaleout.executors import Executor
from qcompile.io.loader import describe_source, load_model, refuse_non_finite_weights, refuse_quantized
from qcompile.log import Progress, TerminalProgress
from qcompile.io.outputs import Read, check_destination, files_read, rename_together, temp_beside, write_text_atomically
from qcompile.core.pipeline import format_pipeline, parse_pipeline, run_pipeline
from qcompile.core.recipes import pipeline_for
from qcompile.core.report import Report
from qcompile.core.reproduce import (
    HashingIterable,
    canonical_json,
    code_digest,
    config_digest,
    data_digest,
    file_digest,
    model_digest,
    sha256_hex,
)
from qcompile.io.runtime import make_session
from qcompile.io.workspace import (
    LARGE_MODEL_BYTES,
    Workspace,
    drop_dead_initializers,
    serialize_inline,
    weight_bytes,
)

logger = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("qcompile", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "protobuf"):
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
    """The compiled model and its report. ``reads``: the files the compile read (the model, its
    external data, the data files, the config), which ``save`` refuses to overwrite."""

    def __init__(self, model: ir.Model, report: Report, reads: Sequence[Read] = ()):
        self.model = model
        self.report = report
        self.reads = list(reads)

    def to_proto(self) -> onnx.ModelProto:
        return serialize_inline(self.model)

    def save(self, path: str | Path, *, report_path: str | Path | None = None) -> None:
        """Write the model (and optionally its report) atomically: both complete, or neither.

        ``report_path``: None writes no report; the command line's name for it is
        ``qcompile.io.outputs.report_path_for(path)`` (``m.int8.onnx`` -> ``m.int8.report.json``).

        Both are written to temp files first and renamed model first, report last, with SIGINT and
        SIGTERM held between the renames (``qcompile.io.outputs``). Refused (``OutputError``, nothing
        written): a destination that is one of the files the compile read, or that exists and is
        not a regular file."""
        path = Path(path)
        large = weight_bytes(self.model) > _INLINE_LIMIT
        destinations = [(path, "path"), *([(Path(report_path), "report_path")] if report_path is not None else [])]
        if large:
            destinations.append((path.parent / f"{path.name}.data", "path (its .data file)"))
        # Every destination first: a bad report path must not leave the model written alone.
        for destination, flag in destinations:
            check_destination(destination, reads=self.reads, flag=flag)
        if report_path is not None and _same_path(Path(report_path), path):
            raise OutputError(f"report_path and path both name {str(path)!r}; give the report another path.")
        temps = []
        try:
            # Weights beyond what one protobuf holds go to <name>.data, written tensor by tensor.
            model_tmp = _large_model_to_temp(self.model, path) if large else _model_to_temp(self.to_proto(), path)
            temps.append(model_tmp)
            if weight_bytes(self.model) > LARGE_MODEL_BYTES and self.report.hashes:
                # A large model's output_model hashes its content; record the files as written too.
                data = path.parent / f"{path.name}.data"
                self.report.hashes["output_files"] = {
                    "model": file_digest(model_tmp), **({data.name: file_digest(data)} if data.is_file() else {}),
                }
            moves = [(model_tmp, path)]
            if report_path is not None:
                report_tmp = temp_beside(Path(report_path))
                temps.append(report_tmp)
                _write_bytes(report_tmp, self.report.to_json().encode(), Path(report_path))
                moves.append((report_tmp, Path(report_path)))
            rename_together(moves)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _write_bytes(tmp: Path, data: bytes, destination: Path) -> None:
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except OSError as error:
        raise OutputError(
            f"Cannot write {str(destination)!r}: {error.strerror or error}. Check free space and permissions."
        ) from None


# Protobuf cannot serialise 2 GB; a model with more weights than this is saved with external data.
_INLINE_LIMIT = 1_800_000_000


def _large_model_to_temp(model: ir.Model, path: Path) -> Path:
    """``ir.save`` into a temp file beside ``path`` with the weights in ``<name>.data`` (no
    serialised copy of the whole model); the caller renames the temp file. A failure removes what
    was written."""
    tmp = temp_beside(path)
    data_name = f"{path.name}.data"
    try:
        # ir.save writes the data file through a temporary file of its own, then renames it.
        ir.save(model, tmp, external_data=data_name)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if not path.exists():
            (path.parent / data_name).unlink(missing_ok=True)
        raise OutputError(
            f"Cannot write {str(path)!r}: {error.strerror or error}. Check free space and permissions."
        ) from None
    return tmp


def save_large_model_atomically(model: ir.Model, path: Path) -> None:
    """``_large_model_to_temp``, renamed into place."""
    tmp = _large_model_to_temp(model, path)
    try:
        rename_together([(tmp, path)])
    finally:
        tmp.unlink(missing_ok=True)


def _model_to_temp(proto: onnx.ModelProto, path: Path) -> Path:
    """The model in a temp file beside ``path``, for the caller to rename; a failure leaves nothing.

    Models over 2 GB get their weights in ``<name>.data`` beside the model, renamed into place here
    (before the model: a model file never names a data file that is not there).
    """
    tmp = temp_beside(path)
    data_tmp = None
    large = sum(len(t.raw_data) for t in proto.graph.initializer) > 1_800_000_000
    try:
        if large:
            data_name = f"{path.name}.data"
            data_tmp = temp_beside(path.parent / data_name)
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
                f.write(proto.SerializeToString(deterministic=True))
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"Cannot write {str(path)!r}: {error.strerror or error}. Check free space and permissions."
        ) from None
    finally:
        if data_tmp is not None:
            data_tmp.unlink(missing_ok=True)
    return tmp


def save_model_atomically(proto: onnx.ModelProto, path: Path) -> None:
    """Write to a temp file beside ``path`` and rename, so a failure leaves no partial output."""
    tmp = _model_to_temp(proto, path)
    try:
        rename_together([(tmp, path)])
    finally:
        tmp.unlink(missing_ok=True)


def compile(  # the verb users expect: qcompile.compile
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
    show_progress: bool | Progress = False,
    executor: Executor | None = None,
) -> CompileResult:
    """Compile ``model`` for ``target`` and evaluate it against the float model.

    ``model``: an .onnx path (external data beside it is loaded), an ``onnx.ModelProto``, an
    ``onnx_ir.Model`` or a ``torch.nn.Module`` with ``example_inputs`` (and optional
    ``dynamic_shapes``, as torch.export takes them). ``calibration_data``: a directory of .npz
    files (one batch each, keys = input names) or an iterable of ``{input_name: array}``.
    The input model is never modified. Raises ``AccuracyGateError`` (with ``.result``) when
    ``config.min_sqnr`` is set and an output falls below it. ``show_progress``: True shows
    the progress of calibration, evaluation and latency runs on stderr, or pass a
    ``qcompile.log.Progress`` callback to get it.
    ``executor``: a ``qcompile.scaleout.executors.Executor`` to run repeated work on (sharded calibration),
    kept open for the caller; by default the config's (``executor``, ``workers``, ``ray_address``),
    made for this call and closed after it.
    """
    config_file = config if isinstance(config, (str, Path)) else None
    config = resolve_config(config, target=target)
    target_spec = get_target(config.target)
    float_model = load_model(model, example_inputs, dynamic_shapes)
    # What this compile reads, which result.save refuses to overwrite.
    reads = files_read(model=model, external_data=_external_data_paths(float_model), calibration=calibration_data,
                       evaluation=eval_data, config=config_file, metric=config.metric)
    refuse_quantized(float_model, repr(str(model)) if isinstance(model, (str, Path)) else "The model")
    refuse_non_finite_weights(float_model, repr(str(model)) if isinstance(model, (str, Path)) else "The model")
    specs = parse_pipeline(pipeline_for(config.pipeline, config.recipe, target_spec, config))
    inputs = input_specs(float_model)
    if isinstance(calibration_data, Iterable) and not isinstance(calibration_data, (str, Path, list, tuple, Mapping)):
        # A one-shot iterator: hashed as calibration reads it (see qcompile.core.reproduce).
        calibration_data = HashingIterable(calibration_data)
    versions = _versions()
    # Headers first: a wrong shape, a damaged header or a zip bomb is refused before hashing reads the data.
    check_npz_headers(calibration_data, inputs)
    input_sha, data_sha = model_digest(float_model), data_digest(calibration_data)
    data = None
    if calibration_data is not None:
        data = BatchSource(calibration_data, inputs, eval_source=eval_data, max_eval=config.eval_batches)
    # Large models keep their weights in files (qcompile.io.workspace): no protobuf of the whole model,
    # and ONNX Runtime maps the weights instead of copying them.
    workspace = Workspace() if weight_bytes(float_model) > LARGE_MODEL_BYTES else None
    try:
        if workspace is not None:
            workspace.adopt(float_model)
            logger.info("large model (%.2f GB of weights): weights stay on disk in %s",
                        weight_bytes(float_model) / 1e9, workspace.path)
        progress = show_progress if callable(show_progress) else TerminalProgress() if show_progress else None
        context = CompileContext(config=config, target=target_spec, data=data, progress=progress,
                                 workspace=workspace, given_executor=executor)
        cache, cache_summary = _pass_cache(config, calibration_data, {
            "input_model": input_sha, "data": data_sha, "eval_data_given": eval_data is not None,
            "versions": versions, "code": code_digest(),
        })
        # The passes work on a clone that shares the weight tensors (never modified in place).
        working = float_model.clone()
        try:
            compiled, timings = run_pipeline(working, specs, context, dump_after=dump_after, dump_dir=dump_dir,
                                             cache=cache)
        finally:
            context.close()
        # Whatever the pipeline (a user's may lack remove-unused): no weight nothing reads ships, is
        # measured or is hashed. Here, not in a pass, so that no pipeline can leave it out.
        dropped = drop_dead_initializers(compiled)
        if dropped["count"]:
            context.records["dead-initializers"] = {"dropped": dropped["count"], "bytes": dropped["bytes"]}
        plan = context.analyses.plan
        warnings = _target_warnings(float_model, compiled, target_spec)
        evaluation, latency, fusion = _evaluate(float_model, compiled, data, config, target_spec, plan, workspace,
                                                progress)
        verification = _verify_on_target(compiled, data, config, target_spec)
    except BaseException:
        if workspace is not None:
            workspace.close()
        raise
    gate = _accuracy_gate(config, evaluation)
    if isinstance(calibration_data, HashingIterable):
        data_sha = calibration_data.digest  # known now that calibration has read it
    hashes = {
        "algorithm": "sha256",
        "input_model": input_sha,
        "input_file": file_digest(model) if isinstance(model, (str, Path)) else None,
        "calibration_data": data_sha,
        "evaluation_data": data_digest(eval_data) if isinstance(eval_data, (str, Path, list, tuple)) else None,
        "config": config_digest(config, format_pipeline(specs)),
        "versions": sha256_hex(canonical_json(versions)),
        "qcompile_code": code_digest(),
    }
    hashes["inputs"] = sha256_hex(canonical_json(
        {k: hashes[k] for k in ("input_model", "calibration_data", "config", "versions", "qcompile_code")}))
    hashes["output_model"] = model_digest(compiled)
    if cache is not None:
        cache_summary.update(
            hits=sum(t.cache == "hit" for t in timings), stored=sum(t.cache == "stored" for t in timings),
            saved_seconds=round(sum(t.saved_seconds for t in timings), 4),
            restore_seconds=round(cache.restore_seconds, 4), store_seconds=round(cache.store_seconds, 4),
        )
    size = {"float_bytes": _model_bytes(float_model), "quantized_bytes": _model_bytes(compiled)}
    if size["quantized_bytes"] > size["float_bytes"]:
        # Quantization metadata (scales, zero points, Q/DQ nodes) costs a fixed amount per tensor: on a
        # model whose weights are tinier than that, the file grows. Say so rather than ship it silently.
        warnings.append(
            f"the quantized model ({size['quantized_bytes']} bytes) is larger than the float model "
            f"({size['float_bytes']} bytes): its weights are too small for 8-bit storage to pay for the "
            "scales and Q/DQ nodes. Quantize it only for speed, or keep the float model.")
        logger.warning("size: %s", warnings[-1])
    report = Report(
        versions=versions,
        source=describe_source(model),
        target=target_spec.name,
        config=config.to_dict(),
        pipeline=format_pipeline(specs),
        passes=[{"name": t.name, "seconds": round(t.seconds, 4), "modified": t.modified, "cache": t.cache}
                for t in timings],
        plan=plan.summary() if plan is not None else {},
        calibration=_calibration_summary(context, config),
        evaluation=evaluation,
        size=size,
        latency=latency,
        fusion=fusion,
        accuracy_gate=gate,
        transformations=context.records,
        verification=verification,
        hashes=hashes,
        cache=cache_summary,
        warnings=warnings,
    )
    result = CompileResult(compiled, report, reads)
    if workspace is not None:
        # Weights the compile left unchanged are still read from the workspace: keep it while the
        # result lives (result.save reads them), remove it afterwards.
        weakref.finalize(result, workspace.close)
    if not report.gate_passed:
        error = AccuracyGateError(
            f"Accuracy gate failed: {gate['failing']} below the required SQNR of {config.min_sqnr} dB. "
            "Exclude the most sensitive layers (exclude_nodes), use 16-bit activations for them, or "
            "try calibration_method = 'percentile' or 'mse'."
        )
        error.result = result
        raise error
    return result


def _target_warnings(float_model: ir.Model, compiled: ir.Model, target) -> list[str]:
    """The target's standing warnings, plus the compiled model's nodes that its provider has no
    kernel for (``Target.kernels``; ops the input model had already are the input's business).
    Each is logged as well as reported."""
    warnings = list(target.warnings)
    if target.kernels is not None:
        own = {(n.domain if n.domain != "ai.onnx" else "", n.op_type)
               for n in ir.traversal.RecursiveGraphIterator(float_model.graph)}
        missing = target.kernels.nodes_without_kernel(compiled, ignore=own)
        if missing:
            listed = ", ".join(f"{m['name'] or '?'} ({m['domain'] + '.' if m['domain'] else ''}{m['op_type']}"
                               f"{' ' + m['element_type'] if m['element_type'] else ''})" for m in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            warnings.append(
                f"{len(missing)} node(s) have no {target.kernels.provider} kernel and will run on the CPU "
                f"provider: {listed}{more}. A pass in this pipeline emits ops target {target.name!r} "
                f"does not run (its default pipeline: `qcompile targets`)."
            )
    for warning in warnings:
        logger.warning("target %s: %s", target.name, warning)
    return warnings


def _external_data_paths(model: ir.Model) -> list[Path]:
    """The data files the model's external weights lie in (before a workspace adopts them)."""
    paths = set()
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            paths.add(Path(value.const_value.path))
    return sorted(paths)


def _pass_cache(config: CompileConfig, calibration_data, identity: dict) -> tuple[PipelineCache | None, dict]:
    """The pass cache for this run, or None; and the report's summary of it (why it is off)."""
    if config.cache is None:
        return None, {"enabled": False, "why": "off by default in the Python API (cache = true turns it on)"}
    if not config.cache:
        return None, {"enabled": False, "why": "turned off (cache = false, --no-cache)"}
    if calibration_data is not None and identity["data"] is None:
        return None, {"enabled": False, "why": "the calibration data's content hash is not known before "
                      "calibration reads it (a one-shot iterator, or unreadable data)"}
    directory = cache_directory(config.cache_dir)
    store, why = PassCache.open(directory, config.cache_max_mb * 1_000_000)
    if store is None:
        return None, {"enabled": False, "dir": str(directory), "why": why}
    return PipelineCache(store, identity), {"enabled": True, "dir": str(directory)}


def _calibration_summary(context: CompileContext, config: CompileConfig) -> dict:
    if context.data is None or not context.data.calibration_batches:
        return {}
    return {
        "batches": context.data.calibration_batches,
        "method": config.calibration_method,
        "percentile": config.percentile if config.calibration_method == "percentile" else None,
        "data": context.data.description,
    }


def _model_bytes(model: ir.Model) -> int:
    """Serialised size of ``model``; for large models, its weight bytes (no serialised copy)."""
    if weight_bytes(model) > LARGE_MODEL_BYTES:
        return weight_bytes(model)
    return serialize_inline(model).ByteSize()


def _evaluate(float_model: ir.Model, compiled: ir.Model, data: BatchSource | None, config: CompileConfig,
              target, plan, workspace: Workspace | None, progress: Progress | None = None):
    """Accuracy on the evaluation batches, latency, and the fusion report; ``progress`` hears of
    each evaluation batch and latency run (steps ``evaluating``, ``latency (float model)``,
    ``latency (compiled model)``)."""
    if data is None:
        return {"data": None, "outputs": {}}, {}, {}
    description, batches = data.evaluation()
    if workspace is not None:
        workspace.spill(compiled)  # the quantized weights wait on disk while the float model runs
    float_session = make_session(float_model, workspace=workspace, threads=config.threads, what="float model")
    expected = names = None
    float_latency = None
    if workspace is not None and batches:
        # One session at a time: the float outputs are kept, the float session's weights are not.
        names = [o.name for o in float_session.get_outputs()]
        expected = [float_session.run(names, batch) for batch in batches]
        if config.measure_latency:
            float_latency = measure_latency(float_session, batches[0], config.latency_runs, progress=progress,
                                            step="latency (float model)")
        float_session = None
    with tempfile.TemporaryDirectory(prefix="qcompile-") as tmp:
        # ORT cannot write an optimized model over 2 GB; the fusion report is for small models.
        optimized = os.path.join(tmp, "optimized.onnx") if workspace is None else None
        quant_session = make_session(
            compiled, workspace=workspace, providers=target.evaluation_providers or target.providers,
            threads=config.threads, optimized_model_path=optimized, what="compiled model",
        )
        fusion = {}
        if target.fusion_report is not None and optimized is not None and os.path.exists(optimized):
            with contextlib.suppress(Exception):  # the report is best effort; never fail the compile
                fusion = target.fusion_report(onnx.load_model(optimized, load_external_data=False),
                                              set(plan.anchors) if plan else set())
    evaluation = {"data": description, "batches": len(batches), "outputs": {}}
    latency = {}
    if batches:
        if expected is None:
            evaluation["outputs"] = compare_outputs(float_session, quant_session, batches, progress=progress)
        else:
            evaluation["outputs"] = compare_to_outputs(names, expected, quant_session, batches, progress=progress)
        if config.measure_latency:
            latency = {
                "batch_shapes": {k: list(v.shape) for k, v in batches[0].items()},
                "float": float_latency or measure_latency(float_session, batches[0], config.latency_runs,
                                                          progress=progress, step="latency (float model)"),
                "quantized": measure_latency(quant_session, batches[0], config.latency_runs, progress=progress,
                                             step="latency (compiled model)"),
                "threads": config.threads or "onnxruntime default",
                "provider": quant_session.get_providers()[0],
            }
            latency["speedup"] = round(latency["float"]["median_ms"] / latency["quantized"]["median_ms"], 3)
    return evaluation, latency, fusion


def _verify_on_target(compiled: ir.Model, data: BatchSource | None, config: CompileConfig, target) -> dict:
    """The target's own check on its provider (placement, fidelity), for targets that have one."""
    if target.verify is None:
        return {}
    batches = data.evaluation()[1] if data is not None else []
    return target.verify(serialize_inline(compiled), batches, config)


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
