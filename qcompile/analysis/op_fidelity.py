"""Op-by-op fidelity of a compiled QDQ model on a target's provider against the CPU reference.

``verify_on_target`` compares graph outputs: after a few layers every op's disagreement has been
propagated and mixed, so it cannot say which op a provider computes differently. Here each QDQ node
unit (DQ -> op -> Q) runs alone on identical inputs ("decoupled"): every DequantizeLinear that reads
a QuantizeLinear's output reads a new graph input instead, fed with the codes the CPU reference
computed there. A unit's share of output codes within 1 step of the reference is then that op's own
disagreement. The coupled (end-to-end) share of the same tensor is reported beside it.
"""

from __future__ import annotations

__all__ = ["op_fidelity"]

import logging
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from qcompile.io.providers import open_session, placement, reference_session

logger = logging.getLogger(__name__)

# Outputs of pure data movement stay internal: their codes are their input's, and exposing them
# stops ORT's layout transformer from folding them (on MiniLM a MatMul then fell off QNN).
_DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def _code_type(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> int:
    if len(node.input) > 2 and node.input[2] in constants:
        return constants[node.input[2]].data_type
    for attribute in node.attribute:
        if attribute.name == "output_dtype" and attribute.i:
            return attribute.i
    return onnx.TensorProto.UINT8  # QuantizeLinear's default without a zero point


def _off(session, provider: str) -> list[dict[str, str]]:
    return [row for row in placement(session) if row["provider"] != provider]


def _agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if np.issubdtype(reference.dtype, np.integer):
        diff = candidate.astype(np.int64) - reference.astype(np.int64)
    else:  # FP8 codes: compare values (their grid is not uniform: "steps" are approximate)
        diff = candidate.astype(np.float64) - reference.astype(np.float64)
    return np.abs(diff), diff


def op_fidelity(
    compiled_proto: onnx.ModelProto, target, batches: Sequence[dict], *, allow_fallback: bool = False,
) -> dict:
    """Per QDQ node unit of ``compiled_proto``: how the target's provider agrees with the CPU
    provider running the same QDQ model as written, in output codes.

    Returns ``{"units": [...], "by_op_type": {...}, "placement": {...}}``. Each unit row has the
    quantized op's ``op_type`` and ``node`` name (``QuantizeLinear`` and the Q's name for a graph
    input's quantization), the ``tensor`` (the Q's output), ``elements``, the decoupled
    ``within_1_step`` share, ``max_steps`` and ``mean_signed_steps`` (provider - reference), and
    ``coupled_within_1_step``: the same tensor's share when the whole model runs on the provider.
    ``by_op_type`` has per op type (``"MatMul x constant"`` where the op reads a quantized constant
    other than a bias, e.g. a weight) the unit count, mean and worst decoupled share and max steps.
    ``placement`` lists, per analysis model, the nodes the provider did not take (exposing
    internal tensors as outputs can change what a provider fuses).
    """
    if not batches:
        raise ValueError("op_fidelity needs at least one batch of inputs")
    provider = target.providers[0]
    graph = compiled_proto.graph
    constants = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    units = []  # (tensor, op_type, node name)
    code_types = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type in _DATA_MOVEMENT:
            continue
        op_type, name = (source.op_type, source.name) if source is not None else ("QuantizeLinear", node.name)
        # A MatMul with a weight and one of two activations are different kernels: group them apart.
        reads_constant = source is not None and any(
            i in producers and producers[i].op_type == "DequantizeLinear" and producers[i].input[0] in constants
            and constants[producers[i].input[0]].data_type != onnx.TensorProto.INT32  # not a bias
            for i in source.input
        )
        units.append((node.output[0], op_type, name, reads_constant))
        code_types[node.output[0]] = _code_type(node, constants)
    tensors = [unit[0] for unit in units]

    # Coupled: every unit's codes become graph outputs; the whole model runs on each provider.
    coupled = onnx.ModelProto()
    coupled.CopyFrom(compiled_proto)
    existing = {o.name for o in coupled.graph.output}
    coupled.graph.output.extend(
        helper.make_tensor_value_info(t, code_types[t], None) for t in tensors if t not in existing
    )
    reference = reference_session(coupled)
    candidate = open_session(coupled, target, allow_fallback=allow_fallback)
    off = {"coupled": _off(candidate, provider)}
    coupled_totals = defaultdict(lambda: [0, 0])
    codes = []
    for batch in batches:
        ref = dict(zip(tensors, reference.run(tensors, batch)))
        got = dict(zip(tensors, candidate.run(tensors, batch)))
        codes.append(ref)
        for t in tensors:
            distance, _ = _agreement(ref[t], got[t])
            coupled_totals[t][0] += distance.size
            coupled_totals[t][1] += int((distance <= 1).sum())
    del reference, candidate

    # Decoupled: each DequantizeLinear of a unit's codes reads the reference's codes instead.
    decoupled = onnx.ModelProto()
    decoupled.CopyFrom(coupled)
    exposed, fed = set(tensors), {}
    used_names = {v.name for v in graph.input} | set(producers) | set(constants)
    for node in decoupled.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in exposed:
            source = node.input[0]
            if source not in fed:
                name, suffix = f"{source}__reference", 1
                while name in used_names:
                    name, suffix = f"{source}__reference_{suffix}", suffix + 1
                used_names.add(name)
                fed[source] = name
                shape = list(codes[0][source].shape)
                decoupled.graph.input.append(helper.make_tensor_value_info(name, code_types[source], shape))
            node.input[0] = fed[source]
    reference = reference_session(decoupled)
    candidate = open_session(decoupled, target, allow_fallback=allow_fallback)
    off["decoupled"] = _off(candidate, provider)
    input_names = {i.name for i in reference.get_inputs()}
    totals = defaultdict(lambda: {"elements": 0, "within": 0, "max": 0.0, "signed": 0.0})
    for batch, ref_codes in zip(batches, codes):
        feed = {**batch, **{name: ref_codes[source] for source, name in fed.items()}}
        feed = {k: v for k, v in feed.items() if k in input_names}
        ref = reference.run(tensors, feed)
        got = candidate.run(tensors, feed)
        for t, r, g in zip(tensors, ref, got):
            distance, signed = _agreement(r, g)
            total = totals[t]
            total["elements"] += distance.size
            total["within"] += int((distance <= 1).sum())
            total["max"] = max(total["max"], float(distance.max(initial=0)))
            total["signed"] += float(signed.sum())

    rows = []
    for tensor, op_type, name, reads_constant in units:
        total, elements = totals[tensor], max(totals[tensor]["elements"], 1)
        rows.append({
            "op_type": op_type,
            "node": name,
            "tensor": tensor,
            "reads_constant": reads_constant,
            "elements": total["elements"],
            "within_1_step": round(total["within"] / elements, 6),
            "max_steps": total["max"],
            "mean_signed_steps": round(total["signed"] / elements, 4),
            "coupled_within_1_step": round(coupled_totals[tensor][1] / max(coupled_totals[tensor][0], 1), 6),
        })
    by_op_type: dict[str, dict] = {}
    for row in rows:
        group = row["op_type"] + (" x constant" if row["reads_constant"] else "")
        entry = by_op_type.setdefault(group, {"units": 0, "shares": [], "max_steps": 0.0})
        entry["units"] += 1
        entry["shares"].append(row["within_1_step"])
        entry["max_steps"] = max(entry["max_steps"], row["max_steps"])
    for entry in by_op_type.values():
        shares = entry.pop("shares")
        entry["mean_within_1_step"] = round(float(np.mean(shares)), 6)
        entry["worst_within_1_step"] = min(shares)
    return {
        "reference": "the same QDQ model on CPUExecutionProvider, computed as written "
                     "(session.qdq_matmulnbits_accuracy_level = 0), each unit fed the reference's input codes",
        "provider": provider,
        "batches": len(batches),
        "units": rows,
        "by_op_type": dict(sorted(by_op_type.items())),
        "placement": {"off_provider": off},
    }
