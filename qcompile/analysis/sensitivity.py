"""Sensitivity analysis: how much each quantized activation costs the model's outputs.

For every activation the compiled model quantizes (a ``QuantizeLinear`` -> ``DequantizeLinear`` pair
on a computed tensor), the model is run with only that tensor's rounding undone (its
``DequantizeLinear`` replaced by the float tensor) and its outputs compared with the float model's:
the worst output's SQNR then, against the compiled model's own. The tensor whose rounding costs most
comes first: the first candidate for 16-bit activations or for float. One model variant and one
pass over the data per tensor, so it is the repeated work an executor spreads over workers: each
task scores one tensor, the compiled model and the reference outputs go to each worker once.

``node_sensitivity`` is the layer-wise analysis ``qcompile sensitivity`` runs: one whole compile per
quantized node with that node kept float (``exclude_nodes``), scored by the outputs' worst SQNR (and
a metric), each compile a task on the executor (``qcompile.analysis.candidates``).
"""

from __future__ import annotations

__all__ = ["TensorSensitivity", "activation_sensitivity", "node_sensitivity", "quantized_activations", "quantized_nodes"]

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import onnx

from qcompile.api import resolve_config
from qcompile.analysis.candidates import Budget, check_parallel_size, evaluation_batches, repeatable, run_candidates
from qcompile.io.data import input_specs, validate_batch
from qcompile.analysis.debug import _batch_source, _check_interfaces, _load
from qcompile.errors import CalibrationDataError, QcompileError
from qcompile.analysis.evaluate import compare_to_outputs
from qcompile.scaleout.executors import Executor, InProcessExecutor, make_executor
from qcompile.core.graph_edit import proto_nodes
from qcompile.io.runtime import make_session
from qcompile.io.workspace import serialize_inline


@dataclasses.dataclass
class TensorSensitivity:
    """One quantized activation: the outputs' worst SQNR (dB) with its rounding undone, and the gain
    over the compiled model's (None when the variant could not run)."""

    tensor: str
    dequantized: str
    consumers: list[str]
    output_sqnr_db_if_float: float | None
    gain_db: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quantized_activations(proto: onnx.ModelProto) -> list[tuple[str, str, list[str]]]:
    """(float tensor, its DequantizeLinear's output, the nodes reading that output), in graph order,
    for every computed tensor the model quantizes (weights and other constants are not activations),
    inside If branches and loop bodies too: undoing a rounding needs no subgraph value returned."""
    nodes = proto_nodes(proto.graph)
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    for graph in _subgraphs(proto.graph):
        constants |= {t.name for t in graph.initializer}
    producers = {o: n for n in nodes for o in n.output}
    readers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    found = []
    for node in nodes:
        if node.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(node.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] in constants:
            continue
        found.append((quantize.input[0], node.output[0], readers.get(node.output[0], [])))
    return found


def _subgraphs(graph) -> list:
    found = []
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                found += [subgraph, *_subgraphs(subgraph)]
    return found


def _without_rounding(proto: onnx.ModelProto, tensor: str, dequantized: str) -> onnx.ModelProto:
    """``proto`` with the DequantizeLinear that outputs ``dequantized`` passing ``tensor`` through
    (in whichever graph or subgraph it is)."""
    variant = onnx.ModelProto()
    variant.CopyFrom(proto)
    for node in proto_nodes(variant.graph):
        if node.op_type == "DequantizeLinear" and node.output[0] == dequantized:
            node.op_type, node.domain = "Identity", ""
            del node.input[:]
            node.input.append(tensor)
            del node.attribute[:]
            break
    return variant


def _worst_sqnr(outputs: dict[str, dict]) -> float | None:
    values = [float(m["sqnr_db"]) for m in outputs.values()]
    return min(values) if values else None


def score_tensor(item: tuple[str, str], shared: dict, threads: int) -> float | None:
    """One task: the outputs' worst SQNR with only ``item``'s rounding undone (None: it cannot run)."""
    tensor, dequantized = item
    proto = onnx.load_from_string(shared["model"])
    try:
        session = make_session(_without_rounding(proto, tensor, dequantized), threads=threads,
                               what=f"compiled model with {tensor} in float")
    except QcompileError:
        return None
    return _worst_sqnr(compare_to_outputs(shared["names"], shared["expected"], session, shared["batches"]))


def activation_sensitivity(
    float_model: Any,
    quant_model: Any,
    data: Any,
    *,
    tensors: Sequence[str] | None = None,
    executor: Executor | None = None,
    threads: int = 0,
    max_batches: int | None = None,
) -> tuple[list[TensorSensitivity], dict[str, Any]]:
    """Every quantized activation of ``quant_model`` (or those named in ``tensors``), most costly
    first, and a summary (the compiled model's worst output SQNR, batches, executor, seconds).

    Models: .onnx paths, protos or onnx-ir models; ``data``: as ``qcompile.analysis.debug.analyze`` takes it.
    ``executor`` (default: this process) runs one task per tensor; the result does not depend on it.
    """
    start = time.perf_counter()
    executor = executor or InProcessExecutor()
    float_ir, quant_ir = _load(float_model, "float model"), _load(quant_model, "quantized model")
    _check_interfaces(float_ir, quant_ir)
    specs = input_specs(float_ir)
    _, opener = _batch_source(data)
    batches = []
    for where, batch in opener():
        if max_batches is not None and len(batches) >= max_batches:
            break
        batches.append(validate_batch(batch, specs, f"sensitivity data, {where}"))
    if not batches:
        raise CalibrationDataError("The sensitivity analysis needs at least one batch of data.")
    float_session = make_session(float_ir, threads=threads, what="float model")
    names = [o.name for o in float_session.get_outputs()]
    expected = [float_session.run(names, batch) for batch in batches]
    del float_session
    quant_proto = serialize_inline(quant_ir)
    baseline = _worst_sqnr(compare_to_outputs(
        names, expected, make_session(quant_proto, threads=threads, what="compiled model"), batches))
    candidates = quantized_activations(quant_proto)
    if tensors is not None:
        wanted = set(tensors)
        candidates = [c for c in candidates if c[0] in wanted]
    shared = {"model": quant_proto.SerializeToString(), "names": names, "expected": expected, "batches": batches}
    scores = executor.map(score_tensor, [(t, dq) for t, dq, _ in candidates], shared=shared,
                          threads=executor.threads_per_task(threads), what="sensitivity task")
    rows = [
        TensorSensitivity(tensor, dq, consumers, score,
                          None if score is None or baseline is None else score - baseline)
        for (tensor, dq, consumers), score in zip(candidates, scores)
    ]
    order = {row.tensor: index for index, row in enumerate(rows)}
    rows.sort(key=lambda r: (-r.output_sqnr_db_if_float if r.output_sqnr_db_if_float is not None else math.inf,
                             order[r.tensor]))
    summary = {"compiled_worst_output_sqnr_db": baseline, "tensors": len(rows), "batches": len(batches),
               **executor.describe(), "seconds": round(time.perf_counter() - start, 3)}
    return rows, summary


def quantized_nodes(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(name, op type) of every node of a compiled model that reads a dequantized tensor, in graph order."""
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [(n.name, n.op_type) for n in proto.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in n.input)]


def node_sensitivity(
    model: Any,
    calibration_data: Any,
    *,
    config: Any = None,
    target: str | None = None,
    eval_data: Any = None,
    metric: Any = None,
    nodes: Sequence[str] | None = None,
    executor: Executor | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Layer-wise sensitivity: for every node the compile quantizes (or those in ``nodes``), compile
    with only that node kept float (``exclude_nodes``) and measure the outputs' worst SQNR against
    the float model (and ``metric``'s score, ``"module.py:function"`` or a callable, higher is
    better). Rows, most gained first, and a summary with the plain compile's measure.

    Each node is one candidate compile: ``executor`` (default: the config's) compiles them at once on
    its workers. The rows do not depend on the executor."""
    start = time.perf_counter()
    config = resolve_config(config, target=target).replace(min_sqnr=None, measure_latency=False)
    own_executor = executor is None
    if executor is None:
        executor = make_executor(config.executor, workers=config.workers, address=config.ray_address,
                                 threads=config.threads)
    try:
        float_ir = _load(model, "model")
        check_parallel_size(executor, float_ir)
        source = model if isinstance(model, (str, onnx.ModelProto)) or hasattr(model, "__fspath__") else serialize_inline(float_ir)
        calibration_data, eval_data = repeatable(calibration_data), repeatable(eval_data)
        batches = evaluation_batches(float_ir, calibration_data, eval_data, config) if metric is not None else []
        budget = Budget(metric=metric, max_loss=1.0 if metric is not None else None,
                        min_sqnr=None if metric is not None else -math.inf, float_model=float_ir, batches=batches,
                        threads=config.threads)
        shared = {"model": source, "calibration_data": calibration_data, "eval_data": eval_data, "budget": budget}
        (plain,) = run_candidates(executor, [config], {**shared, "raise_errors": True}, threads=config.threads,
                                  what="sensitivity compile")
        candidates = quantized_nodes(plain.result.to_proto())
        if nodes is not None:
            wanted = set(nodes)
            candidates = [c for c in candidates if c[0] in wanted]
        outcomes = run_candidates(
            executor, [config.replace(exclude_nodes=[*config.exclude_nodes, name]) for name, _ in candidates],
            shared, threads=config.threads, what="sensitivity compile")
    finally:
        if own_executor:
            executor.close()
    base_sqnr = plain.measure.get("min_sqnr_db")
    rows = []
    for (name, op_type), outcome in zip(candidates, outcomes):
        sqnr = outcome.measure.get("min_sqnr_db")
        row = {"node": name, "op_type": op_type, "min_sqnr_db_if_float": sqnr,
               "gain_db": None if sqnr is None or base_sqnr is None else sqnr - base_sqnr}
        if metric is not None:
            row.update(score_if_float=outcome.measure.get("score"), loss_if_float=outcome.measure.get("loss"))
        if outcome.error is not None:
            row["error"] = outcome.error
        rows.append(row)
    key = "score_if_float" if metric is not None else "min_sqnr_db_if_float"
    order = {row["node"]: index for index, row in enumerate(rows)}
    rows.sort(key=lambda r: (-r[key] if r.get(key) is not None else math.inf, order[r["node"]]))
    summary = {"compiled_min_sqnr_db": base_sqnr, "compiled_score": plain.measure.get("score"),
               "float_score": budget.float_score, "nodes": len(rows), **executor.describe(),
               "seconds": round(time.perf_counter() - start, 3)}
    return rows, summary

