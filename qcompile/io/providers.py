"""Execution providers: what is installed here, sessions on a target's provider, and where nodes run.

A session for a target runs on that target's provider with the CPU fallback disabled, so a model
that would quietly run part of itself on the CPU fails instead; the nodes responsible are named by
opening it once more with the fallback allowed and reading ORT's per-node assignment. A missing
provider is an error that says what to install, never a session on another provider.
"""

from __future__ import annotations

__all__ = [
    "ProviderStatus",
    "provider_status",
    "open_session",
    "placement",
    "placement_summary",
    "output_steps",
    "compare_with_reference",
    "verify_on_target",
    "verify_if_installed",
    "reference_session",
    "write_ep_context",
]

import dataclasses
import functools
import importlib
import importlib.util
import logging
import math
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.errors import PlacementError, ProviderError, detail
from qcompile.io.runtime import make_session

logger = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"


@dataclasses.dataclass(frozen=True)
class _Plugin:
    """A provider shipped as a plugin library in its own Python package."""

    module: str  # the package's import name; its get_library_path() locates the library
    package: str  # what to pip install


# Providers that are not built into the onnxruntime package but registered at run time.
_PLUGINS = {"QNNExecutionProvider": _Plugin("onnxruntime_qnn", "onnxruntime-qnn")}

# Providers built into another distribution of the ``onnxruntime`` module. Each replaces the
# onnxruntime package (same module name, files overwrite each other), so one virtual environment
# holds one of them: installing it beside onnxruntime breaks both.
_OTHER_BUILDS = {
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "TensorrtExecutionProvider": "onnxruntime-gpu",
}


@dataclasses.dataclass(frozen=True)
class ProviderStatus:
    name: str
    installed: bool
    how: str  # "built into onnxruntime", "plugin from onnxruntime-qnn 2.7.0", or why it is missing


def _registered(name: str) -> bool:
    return any(device.ep_name == name for device in ort.get_ep_devices())


def _register_plugin(name: str) -> ProviderStatus:
    plugin = _PLUGINS[name]
    if importlib.util.find_spec(plugin.module) is None:
        return ProviderStatus(name, False, f"not installed (pip install {plugin.package})")
    try:
        version = metadata.version(plugin.package)
    except metadata.PackageNotFoundError:
        version = "unknown version"
    how = f"plugin from {plugin.package} {version}"
    if _registered(name):
        return ProviderStatus(name, True, how)
    try:
        module = importlib.import_module(plugin.module)
        # Registering twice raises, hence the check above.
        ort.register_execution_provider_library(name, module.get_library_path())
    except Exception as error:  # noqa: BLE001  (ORT raises its own types; a broken install must not crash discovery)
        return ProviderStatus(name, False, f"{plugin.package} {version} is installed but its library does not load: {detail(error)}")
    if not _registered(name):
        return ProviderStatus(name, False, f"{plugin.package} {version} registered no device")
    return ProviderStatus(name, True, how)


@functools.lru_cache(maxsize=1)
def _onnxruntime_build() -> str:
    """The distribution that installed the ``onnxruntime`` module, e.g. "onnxruntime-openvino 1.24.1"."""
    names = metadata.packages_distributions().get("onnxruntime") or ["onnxruntime"]
    try:
        return f"{names[0]} {metadata.version(names[0])}"
    except metadata.PackageNotFoundError:
        return f"onnxruntime {ort.__version__}"


def provider_status(name: str) -> ProviderStatus:
    """Whether provider ``name`` can run sessions here; plugin providers are registered on the way."""
    if name in _PLUGINS:
        return _register_plugin(name)
    build = _onnxruntime_build()
    if name in ort.get_available_providers():
        return ProviderStatus(name, True, f"built into {build}")
    if name in _OTHER_BUILDS:
        package = _OTHER_BUILDS[name]
        return ProviderStatus(
            name, False, f"not in this onnxruntime build ({build}): it comes with {package}, which replaces onnxruntime",
        )
    return ProviderStatus(name, False, f"not in this onnxruntime build ({build})")


def _model_input(model: str | Path | bytes | onnx.ModelProto) -> str | bytes:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, Path):
        return str(model)
    return model


def _session(model, target, *, allow_fallback: bool, config: dict[str, str]) -> ort.InferenceSession:
    provider = target.providers[0]
    entries = {"session.record_ep_graph_assignment_info": "1"}
    if not allow_fallback and provider != _CPU:
        entries["session.disable_cpu_ep_fallback"] = "1"
    entries.update(config)
    provider_options = target.provider_options() if target.provider_options is not None else {}
    what = f"model on {provider}"
    if provider in _PLUGINS:
        # A plugin provider named in providers=[...] is silently ignored (a CPU-only session):
        # it must be attached through its device.
        devices = [d for d in ort.get_ep_devices() if d.ep_name == provider]
        return make_session(model, config_entries=entries, plugin_devices=(devices, provider_options), what=what)
    # ORT refuses a CPU provider named explicitly while the fallback to it is disabled (1.24 on).
    providers = [(provider, provider_options)] + ([(_CPU, {})] if provider != _CPU and allow_fallback else [])
    session = make_session(model, providers=providers, config_entries=entries, what=what)
    if session.get_providers()[0] != provider:
        raise ProviderError(f"ONNX Runtime did not enable {provider} for this session; nothing runs on it.")
    return session


def open_session(
    model: str | Path | bytes | onnx.ModelProto,
    target,
    *,
    allow_fallback: bool = False,
    config: dict[str, str] | None = None,
) -> ort.InferenceSession:
    """A session running ``model`` on ``target``'s provider, with the CPU fallback disabled.

    Raises ProviderError when the provider is not installed, and PlacementError naming the nodes
    that the provider does not take (unless ``allow_fallback``: then they run on the CPU, and
    ``placement(session)`` says which). ``config`` adds session config entries (e.g. ep.context_*).
    """
    provider = target.providers[0]
    status = provider_status(provider)
    if not status.installed:
        hint = f" Install it: {target.install_hint}." if target.install_hint else ""
        raise ProviderError(f"Target {target.name!r} needs {provider}, which is {status.how}.{hint}")
    model = _model_input(model)
    try:
        return _session(model, target, allow_fallback=allow_fallback, config=config or {})
    except (ProviderError, PlacementError):
        raise
    except Exception as error:  # noqa: BLE001  (ORT raises its own exception types from C++)
        message = detail(error)
    if allow_fallback:
        raise PlacementError(f"{provider} cannot compile this model: {message}")
    # Fallback disabled: ORT says only that some node went to the CPU. Ask it which ones.
    try:
        fallback = _session(model, target, allow_fallback=True, config={})
    except Exception as error:  # noqa: BLE001  (re-raised as a QcompileError that names the input)
        raise PlacementError(
            f"{provider} cannot compile this model: {message} (with the CPU fallback allowed too: {detail(error)})"
        ) from None
    off = [row for row in placement(fallback) if row["provider"] != provider]
    if not off:
        raise PlacementError(f"{provider} cannot compile this model: {message}")
    names = ", ".join(f"{row['name'] or '(unnamed)'} ({row['op_type']})" for row in off[:10])
    more = f" and {len(off) - 10} more" if len(off) > 10 else ""
    raise PlacementError(
        f"{len(off)} node(s) would not run on {provider} for target {target.name!r}: {names}{more}. "
        "Replace or remove those ops before compiling, or allow the fallback (allow_fallback = true) "
        "to run them on the CPU provider."
    ) from None


def placement(session: ort.InferenceSession) -> list[dict[str, str]]:
    """The provider of every node ORT runs (after its layout changes, so QNN's inserted NHWC
    Transposes appear too), from ``session.record_ep_graph_assignment_info``."""
    return [
        {"provider": subgraph.ep_name, "op_type": node.op_type, "name": node.name}
        for subgraph in session.get_provider_graph_assignment_info()
        for node in subgraph.get_nodes()
    ]


def placement_summary(rows: list[dict[str, str]], provider: str) -> dict:
    off = [row for row in rows if row["provider"] != provider]
    return {
        "provider": provider,
        "nodes": len(rows),
        "on_provider": len(rows) - len(off),
        "by_provider": dict(Counter(row["provider"] for row in rows)),
        "off_provider": off,
    }


def output_steps(proto: onnx.ModelProto) -> dict[str, float]:
    """Quantization step of each graph output that a per-tensor DequantizeLinear produces."""
    constants = {t.name: t for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    steps = {}
    for output in proto.graph.output:
        node = producers.get(output.name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in constants:
            continue
        scale = onnx.numpy_helper.to_array(constants[node.input[1]])
        if scale.size == 1:
            steps[output.name] = float(scale.reshape(()))
    return steps


def float_compute_nodes(proto: onnx.ModelProto) -> list[dict[str, str]]:
    """Nodes that compute in float between quantized ones: on an NPU these are not integer ops.

    A node counts as integer when every non-constant float input comes from a DequantizeLinear
    and every float output goes only to QuantizeLinear (ORT's QDQ node units).
    """
    if not proto.graph.value_info:  # strip-value-info dropped the types: integer inputs need them
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # noqa: BLE001 (a model onnx cannot infer, or one over 2 GB: judge by graph inputs)
            pass
    constants = {t.name for t in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}
    graph_inputs = {i.name for i in proto.graph.input}
    result = []
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        reads_float = any(
            name and name not in constants
            and (name in graph_inputs or (name in producers and producers[name].op_type != "DequantizeLinear"))
            and not _is_integer_input(name, producers, proto)
            for name in node.input
        )
        writes_float = any(
            name in outputs or any(c.op_type != "QuantizeLinear" for c in consumers.get(name, []))
            for name in node.output
        )
        if reads_float or writes_float:
            result.append({"name": node.name, "op_type": node.op_type})
    return result


def _is_integer_input(name: str, producers, proto) -> bool:
    # Indices, masks and shapes are not float: a graph input or Cast with a non-float type.
    for value in list(proto.graph.input) + list(proto.graph.value_info):
        if value.name == name:
            return value.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, 0)
    return False


def compare_with_reference(
    reference: ort.InferenceSession, candidate: ort.InferenceSession, batches: Sequence[dict],
    steps: dict[str, float],
) -> dict[str, dict]:
    """Per output: share of elements within 1 quantization step of the reference, the largest
    difference in steps, and the SQNR of the candidate against the reference."""
    names = [o.name for o in reference.get_outputs()]
    totals = {name: {"elements": 0, "within": 0, "max_steps": 0.0, "signal": 0.0, "noise": 0.0} for name in names}
    for batch in batches:
        for name, x, y in zip(names, reference.run(names, batch), candidate.run(names, batch)):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            diff = np.abs(x - y)
            total = totals[name]
            total["elements"] += diff.size
            total["signal"] += float((x * x).sum())
            total["noise"] += float((diff * diff).sum())
            if name in steps:
                in_steps = diff / steps[name]
                # A thousandth of a step of slack: the two providers' float rounding.
                total["within"] += int((in_steps <= 1.001).sum())
                total["max_steps"] = max(total["max_steps"], float(in_steps.max(initial=0.0)))
    result = {}
    for name, total in totals.items():
        noise, signal = total["noise"], total["signal"]
        sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
        entry = {"elements": total["elements"], "sqnr_db": round(sqnr, 3)}
        if name in steps:
            entry.update(
                step=steps[name],
                within_1_step=round(total["within"] / max(total["elements"], 1), 6),
                max_diff_steps=round(total["max_steps"], 3),
            )
        result[name] = entry
    return result


def write_ep_context(compiled_proto: onnx.ModelProto, target, path: str | Path, *, allow_fallback: bool = False) -> dict:
    """Compile ``compiled_proto`` on the target's provider and write the EP-context model to ``path``.

    The provider's compiled graph goes to a binary beside it (QNN: ``<stem>_qnn.bin``, embed mode
    0), so loading it on the device skips graph compilation; the outputs are the same. ORT refuses
    to overwrite, so an existing ``path`` is replaced. Returns the files written and their sizes.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ProviderError(f"Cannot write the EP-context model {str(path)!r}: its folder does not exist.")
    path.unlink(missing_ok=True)
    before = set(path.parent.iterdir())
    open_session(compiled_proto, target, allow_fallback=allow_fallback, config={
        "ep.context_enable": "1", "ep.context_file_path": str(path), "ep.context_embed_mode": "0",
    })
    written = sorted({path} | (set(path.parent.iterdir()) - before))
    return {"path": str(path), "files": {str(f): f.stat().st_size for f in written if f.exists()}}


def verify_on_target(
    compiled_proto: onnx.ModelProto, batches: Sequence[dict], target, *, allow_fallback: bool = False,
    ep_context_path: str | Path | None = None,
) -> dict:
    """Run the compiled model on the target's provider: where each node runs, and how close its
    outputs are to the CPU provider running the same QDQ model (the reference a user can check).
    With ``ep_context_path``, also write the provider's EP-context model there."""
    provider = target.providers[0]
    session = open_session(compiled_proto, target, allow_fallback=allow_fallback)
    rows = placement(session)
    result = {
        "provider": provider,
        "provider_package": provider_status(provider).how,
        "provider_options": target.provider_options() if target.provider_options is not None else {},
        "placement": placement_summary(rows, provider),
        # Only where the target promises integer kernels everywhere (an NPU): elsewhere a provider
        # fuses a Conv with the float Relu after it, and a float bias is what it expects.
        **({"float_compute_nodes": float_compute_nodes(compiled_proto)} if target.quantize_all else {}),
    }
    if ep_context_path is not None:
        result["ep_context"] = write_ep_context(compiled_proto, target, ep_context_path, allow_fallback=allow_fallback)
    if batches:
        result["fidelity"] = {
            "reference": "the same QDQ model on CPUExecutionProvider, computed as written "
                         "(session.qdq_matmulnbits_accuracy_level = 0)",
            "batches": len(batches),
            "outputs": compare_with_reference(reference_session(compiled_proto), session, batches,
                                              output_steps(compiled_proto)),
        }
    return result


# ORT's CPU provider rewrites DQ(int8 weight) -> MatMul into MatMulNBits, whose default accuracy
# level (4) quantizes the activations to int8 blocks: with uint16 activations its MatMuls were up
# to ~190 steps off the QDQ model's own arithmetic. Level 0 computes them in float32, as written.
# Its other QDQ fusions (QLinearConv, QLinearMatMul) are no reference either: on an x86-64 CPU
# without VNNI (AVX2 only) their u8s8 kernels saturate int16 pair sums, and a tiny CNN's logits came
# out 18 steps off the QDQ arithmetic. So the reference runs with no graph rewrites at all.
EXACT_REFERENCE_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def reference_session(compiled_proto: onnx.ModelProto) -> ort.InferenceSession:
    """The CPU provider running ``compiled_proto`` as written: the reference a target's provider is
    compared with (what the QDQ model means, not what a CPU kernel rewrite approximates)."""
    return make_session(compiled_proto, what="compiled model (CPU reference)", config_entries=EXACT_REFERENCE_CONFIG,
                        optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)


def verify_if_installed(
    compiled_proto: onnx.ModelProto, batches: Sequence[dict], target, *, allow_fallback: bool = False,
) -> dict:
    """``verify_on_target`` where the target's provider is installed; elsewhere a record of why
    the provider check did not run and what to install, so a model can be compiled on one machine
    (or virtual environment) and verified on another. The compiled model is the same either way."""
    provider = target.providers[0]
    status = provider_status(provider)
    if status.installed:
        return verify_on_target(compiled_proto, batches, target, allow_fallback=allow_fallback)
    hint = f" Install it: {target.install_hint}." if target.install_hint else ""
    why = f"{provider} is {status.how}.{hint}"
    logger.warning("Not verified on %s: %s", provider, why)
    return {
        "provider": provider,
        "skipped": why,
        "provider_options": target.provider_options() if target.provider_options is not None else {},
    }
