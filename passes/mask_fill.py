"""Give an additive attention mask a finite fill value, so the mask and its Softmax can be quantized."""

from __future__ import annotations

__all__ = ["ClampMaskFill"]

import logging

import numpy as np
import onnx_ir as ir

from qcompile.passes.registry import register_pass

logger = logging.getLogger(__name__)

# Ops a mask passes through between its fill constant and the Softmax that reads it.
_MASK_PATH = {"Where", "Mul", "Sub", "Add", "Cast", "Unsqueeze", "Expand", "Reshape", "Squeeze", "Concat", "Slice"}
# A constant this small is a fill value; a larger one is a table of signal.
_FILL_CONSTANT_LIMIT = 16


def _reaches_softmax(value: ir.Value, depth: int = 8) -> bool:
    """Whether ``value`` flows into a Softmax through mask-building ops only."""
    frontier, seen = [value], set()
    for _ in range(depth):
        following = []
        for current in frontier:
            for use in current.uses():
                node = use.node
                if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                    return True
                if node.op_type in _MASK_PATH and node.domain in ("", "ai.onnx") and id(node) not in seen:
                    seen.add(id(node))
                    following.extend(node.outputs)
        frontier = following
    return False


@register_pass("clamp-mask-fill")
class ClampMaskFill(ir.passes.InPlacePass):
    """Replace a mask's sentinel fill (float32 min, -inf) by the finite ``fill`` value.

    Exporters build additive attention masks as Where(mask, 0, float32.min) or
    (1 - mask) * float32.min; no integer grid holds both 0 and float32.min next to the attention
    scores, so the mask, the Add and the Softmax reading it stayed float (and on QNN such a float
    path fails to finalize with 16-bit activations). Softmax gives a masked position the weight
    exp(score + fill - max): with ``fill = -100`` that is below 4e-44, zero in float32 for any
    scores within +-40 of each other, so the float model computes the same result.
    Only constants of at most 16 elements whose magnitude reaches ``config.sentinel_threshold``
    (or that are infinite) and that flow into a Softmax through mask-building ops are changed.
    Guarantees: ``records['clamp-mask-fill']`` names every constant changed and the fill used.
    """

    def __init__(self, context, *, fill: float = -1e4):
        super().__init__()
        self.context = context
        self.fill = float(fill)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        threshold = self.context.config.sentinel_threshold
        changed = {}
        for value in list(model.graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or value.dtype != ir.DataType.FLOAT or tensor.size > _FILL_CONSTANT_LIMIT:
                continue
            array = tensor.numpy()
            sentinel = ~np.isfinite(array) | (np.abs(array) >= threshold)
            if not sentinel.any() or not _reaches_softmax(value):
                continue
            # Keep the sign: a negative sentinel (the usual fill) becomes fill, a positive one -fill.
            clamped = np.where(sentinel, np.sign(array) * abs(self.fill), array).astype(np.float32)
            value.const_value = ir.tensor(clamped, name=value.name)
            changed[value.name] = {"from": float(array[sentinel].flat[0]), "to": float(clamped[sentinel].flat[0])}
        if not changed:
            return ir.passes.PassResult(model, False)
        self.context.records["clamp-mask-fill"] = {"fill": -abs(self.fill), "constants": changed}
        logger.info("clamp-mask-fill: %d mask fill constant(s) set to %g", len(changed), -abs(self.fill))
        return ir.passes.PassResult(model, True)
