"""AdaRound: learn whether each weight rounds up or down, layer by layer, from calibration data.

Rounding every weight to its nearest grid point minimises the weight error, not the layer's
output error. Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML
2020), choose per weight between floor and floor + 1 on the same grid, to minimise

    || W X^T - W~ X^T ||^2 / ||W X^T - W_rtn X^T||^2  +  lambda * mean(1 - |2 h(V) - 1|^beta)
    W~ = s * clip(floor(W / s) + h(V), -qmax, qmax),  h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with zeta = 1.1, gamma = -0.1 (the rectified sigmoid), V initialised so that h(V) is the
fractional part of W / s, no regulariser for the first ``warmup`` share of the iterations, then
beta annealed (cosine) from ``beta_start`` (20) to ``beta_end`` (2), which drives every h to 0 or 1; the
result is floor(W / s) + [V >= 0]. The reconstruction term is normalised by round-to-nearest's,
so ``reg`` (lambda) means the same for every layer; its default, 3, was chosen on random 16 x 64
layers with correlated Relu inputs: 0.41 of round-to-nearest's error after 1000 iterations (reg 1:
0.48, 0.3: 0.89; too weak a regulariser leaves h soft and the final rounding falls back to
nearest). The paper's lambda = 0.01 weighs a summed regulariser against a mean error. Adam on V
(learning rate ``lr``).

X are the layer's float inputs on the calibration data (the paper's "asymmetric" variant feeds
the quantized model's inputs instead; float inputs keep layers independent). The error only
needs the Gram matrix X^T X (``layer_statistics``), so every iteration uses all the data: no
batch sampling, and the cost per iteration is out x D^2 for D = in x kernel size (small for the
CNNs this is for; a 512-channel 3x3 conv would take minutes).
"""

from __future__ import annotations

__all__ = ["AdaRound", "adaround_layer"]

import dataclasses
import logging
import time

import numpy as np
import onnx_ir as ir

from qcompile.io.chunked_runs import DEFAULT_CHUNK
from qcompile.errors import ConfigError
from qcompile.core.graph_edit import add_initializer
from qcompile.passes.layer_statistics import linear_layer, observe_layers
from qcompile.passes.registry import register_pass
from qcompile.numerics.qparams import constant_qparams, quantize

logger = logging.getLogger(__name__)

_ZETA, _GAMMA = 1.1, -0.1


@dataclasses.dataclass
class Rounding:
    """One layer's learned integers (weight-shaped) and its output errors, RTN and learned."""

    q: np.ndarray
    rtn_error: float
    error: float


def _reconstruction(delta: np.ndarray, gram: np.ndarray) -> float:
    """sum over groups and output channels of delta H delta^T ([groups, out, D] and [groups, D, D])."""
    return float(np.einsum("god,gde,goe->", delta, gram, delta, optimize=True))


def adaround_layer(
    w: np.ndarray, scale: np.ndarray, qmax: int, gram: np.ndarray, fixed: np.ndarray, *,
    iterations: int, reg: float, beta_start: float, beta_end: float, warmup: float, lr: float,
) -> Rounding:
    """Learn integers for ``w`` [groups, out, D] on the grid ``scale`` (same shape, broadcast).

    ``gram`` [groups, D, D] is X^T X of the layer's input rows; ``fixed`` marks weights that keep
    round-to-nearest (the largest of each channel, so the scale insert-qdq recomputes stays the same).
    """
    w = w.astype(np.float64)
    scale = scale.astype(np.float64)
    ratio = w / scale
    base = np.floor(ratio)
    nearest = np.clip(np.rint(ratio), -qmax, qmax)
    # V such that h(V) = the fractional part: sigmoid(V) = (rest - gamma) / (zeta - gamma).
    rest = np.clip(ratio - base, 1e-4, 1 - 1e-4)
    v = -np.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0)
    rtn_error = _reconstruction((nearest - ratio) * scale, gram)
    norm = max(rtn_error, 1e-30)
    m, s2 = np.zeros_like(v), np.zeros_like(v)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    start = int(warmup * iterations)
    free = ~fixed
    for step in range(iterations):
        sig = 1.0 / (1.0 + np.exp(-v))
        h_raw = sig * (_ZETA - _GAMMA) + _GAMMA
        h = np.clip(h_raw, 0.0, 1.0)
        level = base + h
        inside = (level >= -qmax) & (level <= qmax)
        delta = (np.clip(level, -qmax, qmax) - ratio) * scale
        # d/dW~ of delta H delta^T / norm is 2 delta H / norm; W~ = s * level.
        grad_h = 2.0 * np.einsum("god,gde->goe", delta, gram, optimize=True) / norm * scale * inside
        if step >= start:
            t = (step - start) / max(iterations - start - 1, 1)
            beta = beta_end + 0.5 * (beta_start - beta_end) * (1.0 + np.cos(np.pi * t))
            centered = 2.0 * h - 1.0
            # d/dh of lambda * mean(1 - |2h - 1|^beta).
            grad_h = grad_h - reg / h.size * beta * np.abs(centered) ** (beta - 1.0) * np.sign(centered) * 2.0
        grad = grad_h * (_ZETA - _GAMMA) * sig * (1.0 - sig) * ((h_raw > 0.0) & (h_raw < 1.0)) * free
        m = beta1 * m + (1 - beta1) * grad
        s2 = beta2 * s2 + (1 - beta2) * grad * grad
        m_hat, s2_hat = m / (1 - beta1 ** (step + 1)), s2 / (1 - beta2 ** (step + 1))
        v -= lr * m_hat / (np.sqrt(s2_hat) + eps)
    q = np.where(fixed, nearest, np.clip(base + (v >= 0.0), -qmax, qmax))
    return Rounding(q, rtn_error, _reconstruction((q - ratio) * scale, gram))


def _broadcast(scale: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if axis is None:
        return np.full(shape, float(scale.reshape(-1)[0]))
    view = [1] * len(shape)
    view[axis] = scale.size
    return np.broadcast_to(scale.reshape(view), shape)


def _channel_maxima(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Where |w| reaches its channel's maximum (the whole tensor's for axis None)."""
    magnitude = np.abs(weight)
    if axis is None:
        return magnitude == magnitude.max(initial=0.0)
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    return magnitude == magnitude.max(axis=reduce, keepdims=True)


@register_pass("adaround", needs_data=True)
class AdaRound(ir.passes.InPlacePass):
    """Learn per-weight rounding (up or down) that minimises each layer's output error (AdaRound).

    Requires: the ``plan`` analysis (which weights are quantized, per channel or not, in which
    symmetric type) and calibration data that can be read again (a directory or a list). Runs after
    ``calibrate``, before ``insert-qdq`` (and before ``bias-correction``). Guarantees: every planned
    Conv/Gemm/MatMul weight (symmetric, read by that node only) is replaced by s * q, where s are
    the scales ``insert-qdq`` computes (``qcompile.numerics.qparams``) and q the learned integers, each
    floor or ceil of W / s, the largest weight of each channel rounded to nearest so the scales
    do not move: ``insert-qdq`` then stores exactly q. A layer keeps round-to-nearest where the
    learned rounding is not better on the calibration data. The float weights are kept in the
    ``unrounded_weights`` analysis for ``bias-correction``; the report lists each layer's output
    error relative to round-to-nearest.
    """

    pass_name = "adaround"
    suffix = "adarounded"

    # It changes weights' values, not which tensors are quantized or their statistics' meaning.
    preserves = ("plan", "calibration", "unrounded_weights")

    def __init__(
        self, context, *, iterations: int = 1000, reg: float = 3.0, beta_start: float = 20.0, beta_end: float = 2.0,
        warmup: float = 0.2, lr: float = 0.01, batches: int | None = None, chunk: int = DEFAULT_CHUNK,
    ):
        super().__init__()
        if iterations < 1 or not 0.0 <= warmup < 1.0 or reg < 0 or lr <= 0:
            raise ConfigError("adaround: iterations must be >= 1, warmup in [0, 1), reg >= 0 and lr > 0.")
        self.context = context
        self.options = {"iterations": iterations, "reg": reg, "beta_start": beta_start, "beta_end": beta_end,
                        "warmup": warmup, "lr": lr}
        self.batches = batches
        self.chunk = chunk

    def requires(self, model: ir.Model) -> None:
        self.context.require_analysis("plan", self.pass_name, "plan-quantization")
        self.context.require_rereadable_data(self.pass_name, "learns each layer's rounding from its inputs",
                                             f"turn {self.pass_name} off")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.context.analyses.plan
        nodes = {node.name: node for node in model.graph}
        records = {"layers": {}, "skipped": {}}
        self.context.records[self.pass_name] = records
        candidates = []
        for quant in plan.weights:
            node = nodes.get(quant.node)
            if node is None or quant.input_index != 1 or quant.node not in plan.anchors:
                continue
            layer = linear_layer(node)
            if layer is None:
                records["skipped"][quant.node] = "not a Conv/Gemm/MatMul with a constant float weight"
            elif not quant.symmetric or quant.qtype.qmin >= 0:
                records["skipped"][quant.node] = "its weight format is not signed symmetric"
            elif len(layer.weight_value.uses()) != 1:
                records["skipped"][quant.node] = "its weight is shared with another node"
            else:
                candidates.append((layer, quant))
        if not candidates:
            return ir.passes.PassResult(model, False)
        statistics = observe_layers(
            model, [layer for layer, _ in candidates], self.context, gram=True, batches=self.batches,
            chunk=self.chunk, what=self.pass_name,
        )
        if self.context.analyses.unrounded_weights is None:
            self.context.analyses.unrounded_weights = {}
        unrounded = self.context.analyses.unrounded_weights
        modified = False
        for layer, quant in candidates:
            name = layer.node.name
            stats = statistics.get(name)
            if stats is None or stats.count == 0:
                records["skipped"][name] = "its input was never observed on the calibration data"
                continue
            start = time.perf_counter()
            weight = layer.weight.astype(np.float32)
            # The scales insert-qdq will compute for this weight (and recompute from s * q).
            scale, _ = constant_qparams(weight, quant.axis, quant.qtype, True)
            full_scale = _broadcast(scale, weight.shape, quant.axis)
            result = self.round_layer(layer.matrix(weight), layer.matrix(full_scale), quant.qtype.qmax,
                                      stats.gram / stats.count, layer.matrix(_channel_maxima(weight, quant.axis)))
            seconds = time.perf_counter() - start
            record = {"relative_error": round(result.error / max(result.rtn_error, 1e-30), 4),
                      "seconds": round(seconds, 3)}
            q = layer.stored(result.q)
            rounded = (full_scale * q).astype(np.float32)
            if result.error >= result.rtn_error or not self._representable(rounded, q, quant):
                record["kept"] = "round-to-nearest"
                records["layers"][name] = record
                continue
            unrounded.setdefault((name, 1), weight)  # the float weight, if another rounding ran first
            old = layer.weight_value
            layer.node.replace_input_with(1, add_initializer(model.graph, f"{old.name}_{self.suffix}", rounded))
            records["layers"][name] = record
            modified = True
        logger.info("%s: %d of %d layers rounded adaptively", self.pass_name,
                    sum("kept" not in r for r in records["layers"].values()), len(candidates))
        return ir.passes.PassResult(model, modified)

    def round_layer(self, w, scale, qmax, gram, fixed) -> Rounding:
        """This pass's rounding of one layer (``adaround_layer``'s arguments)."""
        return adaround_layer(w, scale, qmax, gram, fixed, **self.options)

    @staticmethod
    def _representable(rounded: np.ndarray, q: np.ndarray, quant) -> bool:
        """Whether insert-qdq, recomputing the scales from ``rounded``, stores exactly ``q``."""
        scale, zero_point = constant_qparams(rounded, quant.axis, quant.qtype, True)
        return bool(np.array_equal(quantize(rounded, scale, zero_point, quant.qtype, quant.axis).astype(np.int64),
                                   q.astype(np.int64)))
