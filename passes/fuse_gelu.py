"""Rewrite GELU written with Erf, or as com.microsoft Gelu, into the ONNX Gelu op (opset 20)."""

from __future__ import annotations

__all__ = ["FuseGelu"]

import logging
import math

import onnx_ir as ir
import onnxscript.rewriter
from onnxscript.rewriter import pattern

from qcompile.errors import PipelineError
from qcompile.passes.registry import register_pass

logger = logging.getLogger(__name__)

_SQRT2 = math.sqrt(2.0)


class _ErfGeluDiv(pattern.RewriteRuleClassBase):
    """0.5 * x * (1 + Erf(x / sqrt(2))), the form PyTorch and Hugging Face export."""

    def pattern(self, op, x):
        return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, _SQRT2)), 1.0)), 0.5)

    def rewrite(self, op, x):
        return op.Gelu(x)


class _ErfGeluMul(pattern.RewriteRuleClassBase):
    """The same with x * (1 / sqrt(2)) and the 0.5 applied first."""

    def pattern(self, op, x):
        return op.Mul(x, op.Mul(op.Add(op.Erf(op.Mul(x, 1.0 / _SQRT2)), 1.0), 0.5))

    def rewrite(self, op, x):
        return op.Gelu(x)


class _MicrosoftGelu(pattern.RewriteRuleClassBase):
    """ORT's contrib Gelu (exact GELU, like the ONNX op's default approximate='none')."""

    def pattern(self, op, x):
        return op.Gelu(x, _domain="com.microsoft")

    def rewrite(self, op, x):
        return op.Gelu(x)


# commute: the exporters order the operands of Mul and Add either way.
_RULES = pattern.RewriteRuleSet([_ErfGeluDiv.rule(), _ErfGeluMul.rule(), _MicrosoftGelu.rule()], commute=True)


@register_pass("fuse-gelu")
class FuseGelu(ir.passes.InPlacePass):
    """Replace Erf-based GELU subgraphs and com.microsoft Gelu by the ONNX Gelu op.

    Providers without Erf (QNN) run the Gelu op as one quantized node. Requires: default-domain
    opset >= 20 (put ``upgrade-opset(min_opset=20)`` first). Guarantees: no matched pattern is left;
    ``records['fuse-gelu']`` counts the rewrites.
    """

    def __init__(self, context):
        super().__init__()
        self.context = context

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 1) < 20:
            raise PipelineError(
                f"fuse-gelu writes the Gelu op of opset 20, but the model has opset "
                f"{model.opset_imports.get('', 1)}. Put 'upgrade-opset(min_opset=20)' before 'fuse-gelu'."
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _count(model)
        onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=_RULES)
        fused = _count(model) - before
        if fused:
            self.context.records["fuse-gelu"] = {"fused_gelu_nodes": fused}
        erf_left = [n.name for n in model.graph if n.op_type == "Erf"]
        if erf_left:
            logger.warning("fuse-gelu: %d Erf node(s) are not part of a GELU it recognises (e.g. %s)",
                           len(erf_left), erf_left[0])
        return ir.passes.PassResult(model, fused > 0)


def _count(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.op_type == "Gelu" and n.domain in ("", "ai.onnx"))
