"""Where a large model's weights live during a compile: files on disk, never one big protobuf.

Protobuf cannot hold more than 2 GB, and every serialisation of a model is one more copy of its
weights. A compile of a model whose weights exceed ``LARGE_MODEL_BYTES`` therefore gets a
``Workspace``, a temporary folder that holds:

- a copy of the input's external data files (a kernel-side copy: it costs disk, not memory), so
  every weight the compile has not changed is a memory-mapped ``onnx_ir.ExternalTensor`` into a
  file in the workspace: ONNX Runtime refuses external data outside the model file's own folder
  (symbolic links included), and onnx-ir refuses files with more than one hard link;
- weights the passes rewrote, spilled there before a session is made, so the process does not
  hold them in memory while ONNX Runtime maps its own view of them;
- the small model files that ONNX Runtime sessions load, whose weights are references into the
  files above.

Small models (the common case) get no workspace: their sessions are made from bytes.
"""

from __future__ import annotations

__all__ = ["LARGE_MODEL_BYTES", "Workspace", "drop_dead_initializers", "release_tensor", "serialize_inline",
           "weight_bytes"]

import contextlib
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import OutputError

logger = logging.getLogger(__name__)

# Above this many weight bytes a compile keeps weights on disk (tests lower it to exercise the path).
# Not lower: onnx-ir maps a weight's whole data file for each weight it reads, so the address space
# (not memory) grows with the number of weights mapped at once, which an address-space limit
# (ulimit -v) refuses: SmolLM2 (0.54 GB, 211 weights) failed under the benchmarks' cap (70% of free memory).
LARGE_MODEL_BYTES = 1536 * 2**20
# In-memory initializers at least this large are spilled to the workspace; smaller ones stay inline.
SPILL_MIN_BYTES = 1 * 2**20


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, in memory or external, without reading any of them."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def drop_dead_initializers(model: ir.Model) -> dict[str, int]:
    """Remove, in place, the initializers (of the main graph and of every If/Loop/Scan body) that no
    node in any graph reads and that are no graph's output; returns ``{"count", "bytes"}`` removed.

    Guarantees: a compiled model never ships a weight nothing reads, whatever the pipeline. The
    ``remove-unused`` pass does this too, but a user's ``--pipeline`` may leave it out: then the float
    weights that quantize-weights replaced by MatMulNBits stayed in the file (an INT4 model came out
    at 113% of fp32). Only initializers are removed (no nodes). Kept: initializers that are also
    graph inputs (a caller may feed them), and any initializer whose name a node input names, in any
    scope: a body reads outer-scope values by name, so a name read anywhere keeps the value (a
    conservative rule: a shadowed name keeps both). No weight is read (external ones stay on disk)."""
    # By name alone: an initializer's name is its key, so a node reading the value names it too.
    kept = {v.name for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.inputs if v is not None}
    graphs = list(model.graphs())
    for graph in graphs:  # a body may return an outer-scope value as its output
        kept.update(v.name for v in (*graph.outputs, *graph.inputs))
    count = nbytes = 0
    for graph in graphs:
        for name, value in list(graph.initializers.items()):
            if name in kept:
                continue
            graph.initializers.pop(name)
            count += 1
            nbytes += value.const_value.nbytes if value.const_value is not None else 0
    if count:
        logger.info("dropped %d initializers nothing reads (%.2f MB)", count, nbytes / 1e6)
    return {"count": count, "bytes": nbytes}


def serialize_inline(model: ir.Model) -> onnx.ModelProto:
    """``model`` as one proto holding every weight's bytes: external weights (the input's data
    file, the workspace) are read in, on a clone, so the proto stands on its own."""
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        model = ir.external_data.load_to_model(model.clone())
    proto = ir.serde.serialize_model(model)
    _drop_initializer_value_info(proto.graph)
    return proto


def _drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    """Remove the value_info onnx-ir writes for each initializer: it repeats the tensor's own dtype
    and dims (ONNX takes an initializer's type from its tensor), 458 entries and 20 KB of PP-OCR's
    0.28 MB direction classifier."""
    initializers = {t.name for t in graph.initializer}
    if initializers and any(v.name in initializers for v in graph.value_info):
        kept = [v for v in graph.value_info if v.name not in initializers]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _drop_initializer_value_info(attribute.g)
            for sub in attribute.graphs:
                _drop_initializer_value_info(sub)


def release_tensor(tensor) -> None:
    """Unmap an external tensor's file once its values have been read: mapped pages count in the
    process's memory until then. Other tensors are left as they are."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a view of it is still alive: it stays mapped
            tensor.release()


class Workspace:
    """A temporary folder for one compile's on-disk weights and session models (see the module doc)."""

    def __init__(self, parent: str | os.PathLike | None = None):
        try:
            self.path = Path(tempfile.mkdtemp(prefix="qcompile-workspace-", dir=parent))
        except OSError as error:
            raise OutputError(
                f"Cannot create a workspace folder for a large model in {parent or tempfile.gettempdir()!r}: "
                f"{error.strerror}. Set TMPDIR to a writable folder with room for the model's weights."
            ) from None
        self._linked: dict[str, str] = {}  # source file (resolved) -> name in the workspace
        self._counter = itertools.count()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # ----- weights -----
    def adopt(self, model: ir.Model) -> None:
        """Point every external weight of ``model`` at a copy of its file inside the workspace, so
        sessions made from the workspace can read it. No weight is read into memory."""
        for value in _initializers(model):
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor) or Path(tensor.base_dir) == self.path:
                continue
            name = self._link(Path(tensor.base_dir, tensor.location))
            value.const_value = ir.ExternalTensor(
                name, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                name=tensor.name, base_dir=self.path,
            )

    def spill(self, model: ir.Model, min_bytes: int | None = None) -> int:
        """Write in-memory initializers of at least ``min_bytes`` into one new file in the workspace and
        point ``model`` at it (values unchanged), so their memory can be freed. Returns bytes written."""
        min_bytes = SPILL_MIN_BYTES if min_bytes is None else min_bytes
        values = [
            v for v in _initializers(model)
            if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
            and v.const_value.nbytes >= min_bytes
        ]
        if not values:
            return 0
        relative = f"spill-{next(self._counter)}.data"
        try:
            externals = ir.external_data.convert_tensors_to_external(
                [v.const_value for v in values], self.path, relative, alignment=4096,
            )
        except OSError as error:
            raise OutputError(
                f"Cannot write the large model's weights to the workspace {str(self.path)!r}: "
                f"{error.strerror or error}. Free disk space there, or set TMPDIR to another folder."
            ) from None
        for value, external in zip(values, externals, strict=True):
            value.const_value = external
        written = sum(e.nbytes for e in externals)
        logger.debug("spilled %d weights (%.1f MB) to %s", len(values), written / 1e6, relative)
        return written

    @contextlib.contextmanager
    def session_model(self, model: ir.Model, extra_outputs: Iterable[str] = ()) -> Iterator[str]:
        """Spill ``model``'s rewritten weights, then yield a model file for ONNX Runtime whose
        weights are references into the workspace, with ``extra_outputs`` exposed as outputs.
        The file is removed afterwards (a session has read it by then; the weights stay).
        The process's own mappings of the weights are closed first: the session maps its own."""
        self.adopt(model)
        self.spill(model)
        for value in _initializers(model):
            release_tensor(value.const_value)
        view = model.clone()  # shares the (now external) tensors; only the outputs differ
        add_outputs(view, extra_outputs)
        path = self.path / f"session-{next(self._counter)}.onnx"
        try:
            ir.save(view, path)
            yield str(path)
        finally:
            path.unlink(missing_ok=True)

    def _link(self, source: Path) -> str:
        key = str(source.resolve())
        if key in self._linked:
            return self._linked[key]
        name = f"input-{len(self._linked)}-{source.name}"
        logger.info("copying %s into the workspace %s", source, self.path)
        try:
            shutil.copyfile(key, self.path / name)  # sendfile: the data does not pass through memory
        except OSError as error:
            raise OutputError(
                f"Cannot copy the model's external data {str(source)!r} into the workspace "
                f"{str(self.path)!r}: {error.strerror}. Set TMPDIR to a folder with room for its weights."
            ) from None
        self._linked[key] = name
        return name


def add_outputs(model: ir.Model, names: Iterable[str]) -> None:
    """Expose the values called ``names`` as graph outputs (those already outputs stay once).

    A value inside an If branch (at any depth of If nesting) is exposed too, under its own name:
    ONNX Runtime cannot fetch a subgraph's values, so ``model`` (a session's own copy) is changed
    to carry it out, see ``_expose_from_branch``. Values in Loop/Scan bodies cannot be exposed
    this way (one per iteration) and raise KeyError."""
    wanted = [n for n in dict.fromkeys(names) if n not in {o.name for o in model.graph.outputs}]
    if not wanted:
        return
    by_name = {v.name: v for v in model.graph.inputs}
    by_name.update(model.graph.initializers)
    for node in model.graph:
        by_name.update((o.name, o) for o in node.outputs)
    inner = {}
    if any(name not in by_name for name in wanted):
        inner = {o.name: o for node in ir.traversal.RecursiveGraphIterator(model.graph)
                 if node.graph is not model.graph for o in node.outputs if o.name}
    for name in wanted:
        if name in by_name:
            value = by_name[name]
        else:
            value = _expose_from_branch(model, inner[name])
        if value.producer() is not None:
            # No declared type: ONNX Runtime reports the real one, so values that shape inference
            # missed still work. (This is the view's own copy of the value.)
            value.type = None
            value.shape = None
        model.graph.outputs.append(value)


def _expose_from_branch(model: ir.Model, value: ir.Value) -> ir.Value:
    """The top-level value, named as ``value``, that carries ``value`` out of its If branches.

    In each enclosing If: the branch returns ``Identity(value)`` as one more output, the other
    branch returns an empty float tensor in that slot (of the same rank where known, so ONNX
    type inference can merge the two), and the If gets one more output. A batch that takes the
    other branch yields an empty array: no statistics, as the value was never computed. The
    inner value is renamed so that the top-level output can keep its name (names are unique
    across all scopes). ``model`` must be a copy made for a session: it is changed."""
    parents = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                parents[id(attr.value)] = (node, attr.name)
    used = {v.name for n in ir.traversal.RecursiveGraphIterator(model.graph) for v in (*n.inputs, *n.outputs) if v}
    used |= {v.name for v in model.graph.inputs} | set(model.graph.initializers)

    def fresh(base: str) -> str:
        name, index = base, 0
        while name in used:
            index += 1
            name = f"{base}__{index}"
        used.add(name)
        return name

    name = value.name
    value.name = fresh(f"{name}__inner")
    while value.graph is not model.graph:
        graph = value.graph
        node, branch = parents[id(graph)]
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            raise KeyError(f"{name!r} is inside a {node.op_type} body, which runs once per iteration")
        copy = ir.node("Identity", [value], name=fresh(f"{name}__observe"))
        copy.outputs[0].name = fresh(f"{name}__observed")
        graph.append(copy)
        graph.outputs.append(copy.outputs[0])
        other = node.attributes["else_branch" if branch == "then_branch" else "then_branch"].value
        rank = len(value.shape) if value.shape is not None else 1
        empty = ir.node("Constant", [], attributes={"value": ir.tensor(np.zeros((0,) * rank, np.float32))},
                        name=fresh(f"{name}__absent"))
        empty.outputs[0].name = fresh(f"{name}__absent_value")
        other.append(empty)
        other.outputs.append(empty.outputs[0])
        node.resize_outputs(len(node.outputs) + 1)
        value = node.outputs[-1]
        value.name = name if value.graph is model.graph else fresh(f"{name}__carried")
    return value


def _initializers(model: ir.Model) -> list[ir.Value]:
    return list(model.graph.initializers.values())
