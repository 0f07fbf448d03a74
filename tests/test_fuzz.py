"""Fuzzing: random valid ONNX graphs from a grammar of common ops, compiled and checked.

Each example is a graph built op by op from a pool of live tensors: Conv (grouped, depthwise,
strided), BatchNormalization, MaxPool/AveragePool, GlobalAveragePool, MatMul, Gemm, attention
(two activation x activation MatMuls around a Softmax), Add, Mul, Relu, Sigmoid, Clip, LeakyRelu,
Tanh, GELU (the Erf pattern or com.microsoft.Gelu), Softmax, LayerNormalization, Concat, Split,
Slice, Reshape, Transpose, Flatten; with residual branches (an Add of two live tensors, a Mul by
the Sigmoid of one), a second graph input, weights shared by two consumers, static or dynamic
batch, and intermediate tensors as extra graph outputs; and control flow: If on a condition computed
from the input data, whose branches run grammar ops on outer-scope tensors and weights and return their
own tensors or outer-scope ones (graph inputs included) through an Identity; Loop with a
loop-carried value and a scan output; Scan over a sequence's steps with a state; an If, Loop or
Scan nested in a branch or body. Weights are scaled by 1/sqrt(fan-in) and
inputs are N(0, 1), so values stay well scaled. Each graph is calibrated on 256 random samples
and compiled for the CPU target (mostly the default configuration, else another activation type,
calibration method, per-tensor weights or symmetric activations), and must:

- compile without raising anything (the grammar only makes models ONNX Runtime runs, so even a
  QcompileError is a finding);
- pass ``onnx.checker.check_model(full_check=True)``, keep its output names, run in ONNX Runtime;
- keep every output's SQNR against the float model at or above ``MIN_SQNR_DB`` on a fresh batch.

A failing example is shrunk and printed as ONNX text. Profiles: ``ci`` (the default: 200
examples, derandomized so every run checks the same graphs; ~20 s) and ``long`` (random,
``QCOMPILE_FUZZ_EXAMPLES`` examples, default 2000), chosen with ``HYPOTHESIS_PROFILE=long`` or by
setting ``QCOMPILE_FUZZ_EXAMPLES``::

    QCOMPILE_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings  # noqa: E402  (after the importorskip)
from hypothesis import strategies as st  # noqa: E402  (after the importorskip)

import qcompile  # noqa: E402  (after the importorskip)
from qcompile.analysis.evaluate import sqnr_db  # noqa: E402  (after the importorskip)

# A random-weight graph of up to ~12 ops quantized to 8 bits measures 25-45 dB against float. The
# bound is lower for two measured reasons: the evaluation batch is fresh, and one of its values
# beyond a calibrated range (MSE calibration clips the far tail on purpose) costs a small output
# up to ~15 dB (seen at 16-18 dB in 3000 examples); a wrong scale, zero point, axis or rewiring
# lands near or below 5 dB.
MIN_SQNR_DB = 15.0
# Entropy (KL) calibration chooses a clip threshold by the shape of the histogram, not by the size of
# the error: on a spiky distribution (a per-channel affine after a Relu: one spike per channel) it
# keeps a quarter of the range and measures 12-13 dB. 10 dB still catches a wrong scale, zero
# point or rewiring.
MIN_SQNR_DB_ENTROPY = 10.0
# Calibration: 16 batches of 16 samples; evaluation: one fresh batch of 16. A fresh batch exceeds the
# calibrated extremes of a tensor with probability 16 / (256 + 16) = 6%, and then clips; with 64
# calibration samples, small tensors (a 2 x 2 feature map) clipped often enough to fail at 18 dB.
BATCH = 16
CALIBRATION_BATCHES = 16
EVALUATION_BATCHES = 1

_COMMON = {
    "deadline": None, "database": None, "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
}
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("QCOMPILE_FUZZ_EXAMPLES", "2000")), **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("long" if "QCOMPILE_FUZZ_EXAMPLES" in os.environ else "ci")

# Configurations: the default most of the time, the others often enough to be covered in 200 examples.
CONFIGS = [
    {},
    {},
    {},
    {"activation_type": "int8"},
    {"activation_type": "uint16"},
    {"activation_type": "int16", "calibration_method": "minmax"},
    {"calibration_method": "minmax"},
    {"calibration_method": "percentile", "percentile": 99.99},
    {"calibration_method": "entropy"},
    {"per_channel": False},
    {"activation_symmetric": True},
]


class GraphBuilder:
    """Builds a graph op by op; tracks every tensor's concrete shape (batch = BATCH)."""

    def __init__(self, draw, seed: int):
        self.draw = draw
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.live: list[str] = []  # tensors later ops may read
        self.weights: dict[tuple[int, ...], list[str]] = {}  # shape -> weight names, for sharing
        self.counter = [0]  # shared with subgraph builders: names are unique across all scopes
        self.depth = 0  # subgraph nesting
        self.batch_dim: int | str = BATCH
        self.produced: list[str] = []  # tensors this builder's own nodes wrote

    def name(self, base: str) -> str:
        self.counter[0] += 1
        return f"{base}{self.counter[0]}"

    def child(self) -> GraphBuilder:
        """A builder for a subgraph (an If branch, a Loop body): it reads every tensor and weight
        of the enclosing scopes (outer-scope reads); what it defines stays inside it."""
        sub = GraphBuilder.__new__(GraphBuilder)
        sub.draw, sub.rng, sub.shapes, sub.counter = self.draw, self.rng, self.shapes, self.counter
        sub.nodes, sub.initializers, sub.produced = [], [], []
        sub.live = list(self.live)
        sub.weights = {shape: list(names) for shape, names in self.weights.items()}
        sub.depth, sub.batch_dim = self.depth + 1, self.batch_dim
        return sub

    def value_info(self, name: str) -> onnx.ValueInfoProto:
        shape = self.shapes[name]
        dims = [self.batch_dim, *shape[1:]] if shape and shape[0] == BATCH else list(shape)
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int) -> str:
        """N(0, 1/fan_in) weights; a weight of the same shape may be reused (two consumers)."""
        shared = self.weights.get(shape, [])
        if shared and self.draw(st.integers(0, 3)) == 0:
            return shared[0]
        name = self.constant("w", self.rng.normal(0, 1 / math.sqrt(fan_in), shape).astype(np.float32))
        self.weights.setdefault(shape, []).append(name)
        return name

    def vector(self, size: int, low: float = -0.2, high: float = 0.2) -> str:
        return self.constant("c", self.rng.uniform(low, high, size).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], shapes: list[tuple[int, ...]], *, live: bool = True,
           **attrs) -> list[str]:
        """Add a node; its outputs join the pool later ops read unless ``live`` is False (the inside
        of a composite such as attention, whose raw scores are no signal to build on)."""
        outputs = [self.name(op_type.lower() + "_") for _ in shapes]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(f"n_{op_type}_"), **attrs))
        for out, shape in zip(outputs, shapes):
            self.shapes[out] = tuple(shape)
            self.produced.append(out)
            if live:
                self.live.append(out)
        return outputs

    def same_shape(self, x: str) -> list[str]:
        return [t for t in self.live if t != x and self.shapes[t] == self.shapes[x]]


# ----- the grammar: each op takes a tensor and adds nodes; None if it does not apply -----

def conv(b: GraphBuilder, x: str):
    n, c, h, w = b.shapes[x]
    # A 3x3 kernel over a 1x1 map reads only its centre tap (no real network does that); its
    # per-channel weight scale would be set by taps that never touch data.
    k = b.draw(st.sampled_from([1, 3])) if min(h, w) > 1 else 1
    stride = b.draw(st.sampled_from([1, 1, 2])) if min(h, w) >= 4 else 1
    depthwise = c > 1 and b.draw(st.integers(0, 4)) == 0
    out = c if depthwise else b.draw(st.sampled_from([2, 4, 8]))
    groups = c if depthwise else 1
    weight = b.weight((out, c // groups, k, k), (c // groups) * k * k)
    inputs = [x, weight] + ([b.vector(out)] if b.draw(st.booleans()) else [])
    pad = k // 2
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    return b.op("Conv", inputs, [(n, out, oh, ow)], kernel_shape=[k, k], pads=[pad] * 4,
                strides=[stride, stride], group=groups)[0]


def batch_norm(b: GraphBuilder, x: str):
    c = b.shapes[x][1]
    params = [b.vector(c, 0.5, 1.5), b.vector(c), b.vector(c), b.vector(c, 0.5, 1.5)]
    return b.op("BatchNormalization", [x, *params], [b.shapes[x]])[0]


def pool(b: GraphBuilder, x: str):
    n, c, h, w = b.shapes[x]
    op_type = b.draw(st.sampled_from(["MaxPool", "AveragePool"]))
    if h >= 2 and w >= 2 and b.draw(st.booleans()):
        return b.op(op_type, [x], [(n, c, h // 2, w // 2)], kernel_shape=[2, 2], strides=[2, 2])[0]
    return b.op(op_type, [x], [(n, c, h, w)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])[0]


def global_pool(b: GraphBuilder, x: str):
    n, c, _, _ = b.shapes[x]
    pooled = b.op("GlobalAveragePool", [x], [(n, c, 1, 1)])[0]
    if b.draw(st.booleans()):
        return b.op("Flatten", [pooled], [(n, c)])[0]
    return pooled


def matmul(b: GraphBuilder, x: str):
    shape = b.shapes[x]
    d = shape[-1]
    out = b.draw(st.sampled_from([4, 8, 16]))
    return b.op("MatMul", [x, b.weight((d, out), d)], [(*shape[:-1], out)])[0]


def attention(b: GraphBuilder, x: str):
    """Attention: Softmax(x k^T / sqrt(d)) v, with k and v live tensors of x's shape (or x itself);
    two activation x activation MatMuls. The Softmax keeps the values bounded, as in a transformer
    (a product of products, x x^T x x^T, has tails calibration cannot cover)."""
    n, s, d = b.shapes[x]
    k = b.draw(st.sampled_from([x, *b.same_shape(x)]))
    transposed = b.op("Transpose", [k], [(n, d, s)], perm=[0, 2, 1], live=False)[0]
    scores = b.op("MatMul", [x, transposed], [(n, s, s)], live=False)[0]
    scaled = b.op("Mul", [scores, b.constant("c", np.array(1 / math.sqrt(d), np.float32))], [(n, s, s)],
                  live=False)[0]
    probs = b.op("Softmax", [scaled], [(n, s, s)], axis=-1)[0]
    if not b.draw(st.booleans()):
        return probs
    v = b.draw(st.sampled_from([x, *b.same_shape(x)]))
    return b.op("MatMul", [probs, v], [(n, s, d)])[0]


def gemm(b: GraphBuilder, x: str):
    n, d = b.shapes[x]
    out = b.draw(st.sampled_from([4, 8, 16]))
    trans_b = b.draw(st.booleans())
    weight = b.weight((out, d) if trans_b else (d, out), d)
    inputs = [x, weight] + ([b.vector(out)] if b.draw(st.booleans()) else [])
    return b.op("Gemm", inputs, [(n, out)], transB=int(trans_b))[0]


def binary(b: GraphBuilder, x: str):
    """Add of two live tensors of one shape (a residual branch) or of a constant; Mul by a constant
    or by the Sigmoid of a live tensor (a gate: products of raw activations have tails that
    calibration on a few samples cannot cover)."""
    op_type = b.draw(st.sampled_from(["Add", "Add", "Mul"]))
    partners = b.same_shape(x)
    if partners and b.draw(st.booleans()):
        other = b.draw(st.sampled_from(partners))
        if op_type == "Mul":
            other = b.op("Sigmoid", [other], [b.shapes[other]])[0]
    else:
        size = b.shapes[x][-1]
        low, high = (0.5, 1.5) if op_type == "Mul" else (-0.5, 0.5)
        other = b.vector(size, low, high) if b.draw(st.booleans()) else b.constant(
            "c", np.array(b.rng.uniform(low, high), np.float32))
    inputs = [other, x] if b.draw(st.booleans()) else [x, other]
    return b.op(op_type, inputs, [b.shapes[x]])[0]


def unary(b: GraphBuilder, x: str):
    op_type = b.draw(st.sampled_from(["Relu", "Relu", "Sigmoid", "Clip", "LeakyRelu", "Tanh"]))
    if op_type == "Clip":
        bounds = [b.constant("c", np.array(v, np.float32)) for v in (0.0, 6.0)]
        return b.op("Clip", [x, *bounds], [b.shapes[x]])[0]
    attrs = {"alpha": 0.1} if op_type == "LeakyRelu" else {}
    return b.op(op_type, [x], [b.shapes[x]], **attrs)[0]


def gelu(b: GraphBuilder, x: str):
    """GELU as exporters write it, 0.5 x (1 + erf(x / sqrt 2)), or as ORT's com.microsoft.Gelu."""
    shape = b.shapes[x]
    if b.draw(st.integers(0, 3)) == 0:
        return b.op("Gelu", [x], [shape], domain="com.microsoft")[0]
    scaled = b.op("Div", [x, b.constant("c", np.array(math.sqrt(2), np.float32))], [shape], live=False)[0]
    erf = b.op("Erf", [scaled], [shape], live=False)[0]
    one = b.op("Add", [erf, b.constant("c", np.array(1.0, np.float32))], [shape], live=False)[0]
    product = b.op("Mul", [x, one], [shape], live=False)[0]
    return b.op("Mul", [product, b.constant("c", np.array(0.5, np.float32))], [shape])[0]


def softmax(b: GraphBuilder, x: str):
    return b.op("Softmax", [x], [b.shapes[x]], axis=-1)[0]


def layer_norm(b: GraphBuilder, x: str):
    d = b.shapes[x][-1]
    inputs = [x, b.vector(d, 0.5, 1.5)] + ([b.vector(d)] if b.draw(st.booleans()) else [])
    return b.op("LayerNormalization", inputs, [b.shapes[x]], axis=-1)[0]


def concat(b: GraphBuilder, x: str):
    shape = b.shapes[x]
    axis = 1 if len(shape) == 4 else len(shape) - 1
    others = [t for t in b.live if t != x and len(b.shapes[t]) == len(shape)
              and all(a == o for i, (a, o) in enumerate(zip(b.shapes[t], shape)) if i != axis)]
    other = b.draw(st.sampled_from(others)) if others else x  # Concat of a tensor with itself is valid too
    out = list(shape)
    out[axis] += b.shapes[other][axis]
    return b.op("Concat", [x, other], [tuple(out)], axis=axis)[0]


def split(b: GraphBuilder, x: str):
    shape = b.shapes[x]
    axis = 1 if len(shape) == 4 else len(shape) - 1
    if shape[axis] < 2 or shape[axis] % 2:
        return None
    half = list(shape)
    half[axis] //= 2
    sizes = b.constant("split", np.array([half[axis]] * 2, np.int64))
    first, second = b.op("Split", [x, sizes], [tuple(half)] * 2, axis=axis)
    return b.draw(st.sampled_from([first, second]))


def slice_(b: GraphBuilder, x: str):
    shape = b.shapes[x]
    axis = len(shape) - 1
    if shape[axis] < 2:
        return None
    step = b.draw(st.sampled_from([1, 2]))
    end = shape[axis] if step == 2 else shape[axis] // 2 + 1
    out = list(shape)
    out[axis] = len(range(0, end, step))
    consts = [b.constant("s", np.array([v], np.int64)) for v in (0, end, axis, step)]
    return b.op("Slice", [x, *consts], [tuple(out)])[0]


def transpose(b: GraphBuilder, x: str):
    rank = len(b.shapes[x])
    rest = list(b.draw(st.permutations(list(range(1, rank)))))
    perm = [0, *rest]
    return b.op("Transpose", [x], [tuple(b.shapes[x][p] for p in perm)], perm=perm)[0]


def reshape(b: GraphBuilder, x: str):
    shape = b.shapes[x]
    options = [(0, -1)]  # flatten to [N, rest]
    if len(shape) == 3 and shape[-1] % 2 == 0:
        options.append((0, 0, 2, -1))  # split heads: [N, S, 2, D/2]
    if len(shape) == 2 and shape[-1] % 2 == 0:
        options.append((0, 2, -1))  # [N, 2, D/2]
    if len(shape) == 4:
        options.append((0, 0, -1))  # [N, C, H*W]
    target = b.draw(st.sampled_from(options))
    size = int(np.prod(shape))
    out = [shape[i] if v == 0 else v for i, v in enumerate(target)]
    out[out.index(-1)] = size // int(np.prod([v for v in out if v != -1]))
    if tuple(out) == shape:
        return None
    return b.op("Reshape", [x, b.constant("shape", np.array(target, np.int64))], [tuple(out)])[0]



# ----- control flow: If branches and Loop bodies built from the same grammar -----

MAX_DEPTH = 2  # an If inside an If branch (or a Loop body), no deeper


def _body_ops(sub: GraphBuilder, start: str, count: int) -> None:
    """``count`` grammar ops in a subgraph, starting from ``start`` (an outer-scope tensor or a
    subgraph input), reading outer-scope tensors too."""
    x = start
    for _ in range(count):
        candidates = OPS_BY_RANK.get(len(sub.shapes[x]))
        if candidates:
            sub.draw(st.sampled_from(candidates))(sub, x)
        x = sub.draw(st.sampled_from(sub.live[-3:]))


def _ending_in(sub: GraphBuilder, shape: tuple[int, ...], avoid: set[str]) -> str:
    """A subgraph output of ``shape``: one of its own tensors, or an outer-scope tensor (or graph
    input) returned through an Identity (ONNX Runtime refuses one returned directly)."""
    own = [t for t in sub.produced if sub.shapes[t] == shape and t not in avoid]
    outer = [t for t in sub.live if sub.shapes[t] == shape and t not in sub.produced]
    if own and (not outer or sub.draw(st.integers(0, 2)) > 0):
        return sub.draw(st.sampled_from(own))
    source = sub.draw(st.sampled_from(outer)) if outer else own[0]
    return sub.op("Identity", [source], [shape], live=False)[0]


def if_(b: GraphBuilder, x: str):
    """If on a condition computed from the data (the mean of the graph input ``x`` above 0: a batch
    may take either branch); each branch runs grammar ops on outer-scope tensors and returns one or
    two tensors of ``x``'s shape. The condition reads the input, not a computed tensor: the mean of
    a quantized tensor moves by a rounding, and a batch whose float mean lies within it of 0 would
    take the other branch (a fuzz graph found that), a knife edge no quantizer can avoid."""
    if b.depth >= MAX_DEPTH:
        return None
    shape = b.shapes[x]
    mean = b.op("ReduceMean", ["x"], [()], live=False, keepdims=0)[0]
    condition = b.op("Greater", [mean, b.constant("c", np.array(0.0, np.float32))], [()], live=False)[0]
    outputs = b.draw(st.integers(1, 2))
    branches = []
    for branch in ("then", "else"):
        sub = b.child()
        _body_ops(sub, x, b.draw(st.integers(0, 3)))
        results: list[str] = []
        for _ in range(outputs):
            results.append(_ending_in(sub, shape, set(results)))
        branches.append(helper.make_graph(sub.nodes, b.name(branch), [], [sub.value_info(r) for r in results],
                                          sub.initializers))
    return b.op("If", [condition], [shape] * outputs, then_branch=branches[0], else_branch=branches[1])[0]


def loop(b: GraphBuilder, x: str):
    """Loop of 2-3 iterations: ``x`` is the loop-carried value, the body runs grammar ops on it (and
    on outer-scope tensors); one tensor per iteration is a scan output, averaged after the loop."""
    if b.depth >= MAX_DEPTH:
        return None
    shape = b.shapes[x]
    trips = b.draw(st.integers(2, 3))
    sub = b.child()
    iteration, condition, carried = b.name("iter"), b.name("cond"), b.name("carried")
    sub.shapes[carried] = shape
    sub.live.append(carried)
    _body_ops(sub, carried, b.draw(st.integers(1, 3)))
    own = [t for t in sub.produced if sub.shapes[t] == shape]
    carried_out = sub.draw(st.sampled_from(own)) if own else unary(sub, carried)
    scan = _ending_in(sub, shape, set())
    if scan == carried_out:  # one value listed twice: give the scan output its own name
        scan = sub.op("Identity", [scan], [shape], live=False)[0]
    condition_out = sub.op("Identity", [condition], [()], live=False)[0]
    body = helper.make_graph(
        sub.nodes, b.name("body"),
        [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
         helper.make_tensor_value_info(condition, TensorProto.BOOL, []), sub.value_info(carried)],
        [helper.make_tensor_value_info(condition_out, TensorProto.BOOL, []), sub.value_info(carried_out),
         sub.value_info(scan)],
        sub.initializers,
    )
    count = b.constant("trips", np.array(trips, np.int64))
    keep_going = b.constant("true", np.array(True))
    final, stacked = b.op("Loop", [count, keep_going, x], [shape, (trips, *shape)], body=body)
    b.live.remove(stacked)
    return b.op("ReduceMean", [stacked], [shape], axes=[0], keepdims=0)[0]

def scan(b: GraphBuilder, x: str):
    """Scan over the sequence axis of ``x`` [N, S, D]: the state starts as the mean over S, the body
    runs grammar ops on each step's [N, D] slice, the state and outer-scope tensors; its per-step
    output is stacked back into [N, S, D]."""
    if b.depth >= MAX_DEPTH or len(b.shapes[x]) != 3:
        return None
    n, s, d = b.shapes[x]
    initial = b.op("ReduceMean", [x], [(n, d)], live=False, axes=[1], keepdims=0)[0]
    sub = b.child()
    state, step = b.name("state"), b.name("step")
    sub.shapes[state] = sub.shapes[step] = (n, d)
    sub.live += [state, step]
    _body_ops(sub, step, b.draw(st.integers(1, 3)))
    state_out = _ending_in(sub, (n, d), set())
    out = _ending_in(sub, (n, d), {state_out})
    if out == state_out:
        out = sub.op("Identity", [out], [(n, d)], live=False)[0]
    body = helper.make_graph(sub.nodes, b.name("scan_body"), [sub.value_info(state), sub.value_info(step)],
                             [sub.value_info(state_out), sub.value_info(out)], sub.initializers)
    return b.op("Scan", [initial, x], [(n, d), (n, s, d)], body=body, num_scan_inputs=1,
                scan_input_axes=[1], scan_output_axes=[1])[1]


OPS_BY_RANK = {
    4: [conv, conv, conv, batch_norm, pool, pool, global_pool, global_pool, binary, binary, unary, unary, concat,
        split, slice_, transpose, reshape, softmax, if_, loop],
    3: [matmul, matmul, matmul, attention, binary, binary, unary, unary, gelu, softmax, layer_norm,
        concat, split, slice_, transpose, reshape, if_, loop, scan],
    2: [gemm, gemm, matmul, binary, binary, unary, unary, gelu, softmax, layer_norm, concat, split, slice_, reshape,
        if_, loop],
}
# Ops whose output rank the table does not cover are skipped; Reshape/Flatten move between ranks.


@st.composite
def graphs(draw):
    """(model, input shapes) of a random valid graph."""
    b = GraphBuilder(draw, draw(st.integers(0, 2**32 - 1)))
    family = draw(st.sampled_from(["image", "image", "sequence", "sequence", "vector"]))
    dynamic_batch = draw(st.booleans())
    b.batch_dim = "N" if dynamic_batch else BATCH
    shape = {
        # No 1-channel images: a 1x1 Conv would spread one signal over all channels (rank 1), and a
        # later projection of them cancels it to a small remainder of the channels' quantization noise.
        "image": lambda: (BATCH, draw(st.sampled_from([3, 4])), *([draw(st.sampled_from([4, 6, 8]))] * 2)),
        "sequence": lambda: (BATCH, draw(st.sampled_from([3, 5])), draw(st.sampled_from([4, 8, 16]))),
        "vector": lambda: (BATCH, draw(st.sampled_from([4, 8, 16]))),
    }[family]()
    inputs = ["x"]
    b.shapes["x"] = shape
    b.live.append("x")
    if draw(st.integers(0, 3)) == 0:  # a second input of the same shape: two branches that meet
        inputs.append("x2")
        b.shapes["x2"] = shape
        b.live.append("x2")
    for _ in range(draw(st.integers(3, 12))):
        x = draw(st.sampled_from(b.live[-4:]))
        candidates = OPS_BY_RANK.get(len(b.shapes[x]))
        if not candidates:
            continue
        draw(st.sampled_from(candidates))(b, x)
    produced = [t for t in b.live if t not in inputs and len(b.shapes[t]) > 0]
    if not produced:
        unary(b, b.live[-1])
        produced = [b.live[-1]]
    outputs = [produced[-1]]
    # Intermediate tensors as graph outputs too (they may also be read by later nodes).
    for extra in draw(st.lists(st.sampled_from(produced), max_size=2, unique=True)):
        if extra not in outputs:
            outputs.append(extra)
    graph = helper.make_graph(
        b.nodes, "fuzz", [b.value_info(name) for name in inputs], [b.value_info(name) for name in outputs],
        b.initializers,
    )
    opsets = [helper.make_opsetid("", 17)]
    if "com.microsoft" in _domains(graph):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model, {name: b.shapes[name] for name in inputs}


def _domains(graph: onnx.GraphProto) -> set[str]:
    """The domains of the nodes of ``graph`` and of its subgraphs."""
    found = set()
    for node in graph.node:
        found.add(node.domain)
        for attribute in node.attribute:
            if attribute.HasField("g"):
                found |= _domains(attribute.g)
    return found


def _batches(shapes: dict, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in shapes.items()} for _ in range(count)]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    x, y = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    return sqnr_db(float(x @ x), float((x - y) @ (x - y)))


def compile_and_check(model: onnx.ModelProto, shapes: dict, config: dict) -> dict[str, float]:
    """Compile ``model``; check the result with onnx.checker and ONNX Runtime; SQNR per output (dB)
    against the float model on fresh inputs."""
    float_session = _session(model)  # ONNX Runtime runs the float model: the grammar's promise
    calibration = _batches(shapes, CALIBRATION_BATCHES, seed=1)
    settings_ = {"measure_latency": False, "eval_batches": 1, "threads": 1, **config}
    compiled = qcompile.compile(model, calibration, config=settings_).to_proto()
    onnx.checker.check_model(compiled, full_check=True)
    quant_session = _session(compiled)
    names = [o.name for o in model.graph.output]
    assert [o.name for o in compiled.graph.output] == names
    evaluation = _batches(shapes, EVALUATION_BATCHES, seed=2)
    expected = [np.concatenate(outputs) for outputs in zip(*(float_session.run(names, b) for b in evaluation))]
    got = [np.concatenate(outputs) for outputs in zip(*(quant_session.run(names, b) for b in evaluation))]
    sqnr = {}
    for name, want, have in zip(names, expected, got):
        assert have.shape == want.shape, name
        sqnr[name] = _sqnr(want, have)
    return sqnr


@settings(settings.get_profile(PROFILE))
@given(graphs(), st.sampled_from(CONFIGS))
def test_random_graphs_compile_check_run_and_keep_their_accuracy(case, config):
    model, shapes = case
    note(onnx.printer.to_text(model))  # shown with a failing example: the whole graph
    onnx.checker.check_model(model, full_check=True)  # the grammar's own promise
    bound = MIN_SQNR_DB_ENTROPY if config.get("calibration_method") == "entropy" else MIN_SQNR_DB
    for name, sqnr in compile_and_check(model, shapes, config).items():
        assert sqnr >= bound, f"output {name!r}: SQNR {sqnr:.1f} dB < {bound} dB with {config}"
