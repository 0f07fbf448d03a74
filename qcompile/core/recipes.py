"""Recipes: named pipelines for common jobs, expanded to ordinary pass lists (``--print-pipeline``).

A recipe is data, like a target's default pipeline: choosing one changes which passes run, never
code inside a pass. ``pipeline_for`` is the one place that decides which pipeline a run uses.
"""

from __future__ import annotations

__all__ = ["ACCURACY_PASSES", "RECIPES", "pipeline_for"]

from qcompile.backends.base import Target
from qcompile.errors import ConfigError
from qcompile.core.pipeline import parse_pipeline

_PREPARE = ("fix-names", "shape-inference", "lift-constants", "fold-constants",
            "deduplicate-initializers", "remove-identity",
            "remove-unused", "topological-sort")
_FINISH = ("remove-unused", "strip-metadata", "strip-value-info", "check-model")

RECIPES: dict[str, tuple[str, ...]] = {
    # Language models, weights only: asymmetric 4-bit blocks of 128 (AWQ scaling, then GPTQ rounding;
    # asymmetric measured better than symmetric on SmolLM2: perplexity 20.1 vs 20.5 with RTN); the head
    # (lm_head, tied or not) at 8 bits and the embedding table int8 per row. accuracy_level=4 lets
    # ORT's kernel multiply in int8 (activations quantized per block on the fly): SmolLM2 decodes at
    # 11.5 ms/token instead of 93.6 (fp32: 30.8), for perplexity 20.44 instead of 20.10 (RTN, 8 windows).
    "llm-int4": (*_PREPARE, "awq-scale(bits=4, block=128, symmetric=false)",
                 "quantize-weights(bits=4, block=128, symmetric=false, method=gptq, head_bits=8, accuracy_level=4)",
                 *_FINISH),
    # A model compiled from a .gguf file: its Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K blocks as they are (no second rounding),
    # then what the file kept in other types at 4 bits (round to nearest, blocks of 32, as GGUF's).
    "llm-gguf": (*_PREPARE, "gguf-weights",
                 "quantize-weights(bits=4, block=32, symmetric=false, head_bits=8, embedding_bits=0)", *_FINISH),
    # Weights only at 8 bits (asymmetric blocks of 128, round to nearest): near-lossless. SmolLM2 on
    # 64 windows: perplexity 14.579 (fp32 14.570; symmetric 14.622, as ORT's tool).
    "llm-int8-weight": (*_PREPARE, "quantize-weights(bits=8, block=128, symmetric=false)", *_FINISH),
    # Static W8A8 with SmoothQuant: the target's own pipeline, which includes smooth-quant.
    "llm-w8a8": (),
    # llm-w8a8, and the outlier channels that remain after smoothing multiplied in float (LLM.int8()):
    # the target's pipeline with split-outliers right before plan-quantization (_INSERTED).
    "llm-w8a8-outliers": (),
    # FP8 E4M3 activations and weights (per-tensor / per-channel, symmetric) on the target's pipeline:
    # for runtimes with FP8 kernels (TensorRT, CUDA on Hopper); the CPU provider runs it as reference.
    "llm-fp8": (),
}

# Recipes that give a pass of the target's default pipeline options: recipe -> (pass, with options).
_OPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "llm-fp8": (("plan-quantization", "plan-quantization(activation_type=float8e4m3fn, weight_type=float8e4m3fn)"),),
}

# Recipes built on the target's default pipeline (an empty entry in RECIPES) plus passes:
# recipe -> (pass, the pass it goes right before).
_INSERTED: dict[str, tuple[tuple[str, str], ...]] = {
    "llm-w8a8-outliers": (("split-outliers", "plan-quantization"),),
}

# Accuracy-recovery passes that a config switch adds to the pipeline a run uses (the target's
# default, a recipe's or an explicit one): config field -> (pass, the pass it goes right before).
# Equalization rewrites the float model, so it precedes planning and calibration; adaround and
# bias-correction change weights and biases once the plan says how they will be quantized, the
# roundings (adaround, gptq-rounding) first so that bias-correction corrects the shift they leave.
ACCURACY_PASSES: dict[str, tuple[str, str]] = {
    "cross_layer_equalization": ("cross-layer-equalization", "plan-quantization"),
    "adaround": ("adaround", "insert-qdq"),
    "gptq_rounding": ("gptq-rounding", "insert-qdq"),
    "bias_correction": ("bias-correction", "insert-qdq"),
}


def pipeline_for(pipeline: list[str] | None, recipe: str | None, target: Target, config=None) -> list[str]:
    """The pipeline a run uses: an explicit one, else the recipe's, else the target's default;
    with ``config`` (a CompileConfig), plus the accuracy passes its switches turn on."""
    if pipeline and recipe:
        raise ConfigError("Give a pipeline or a recipe, not both: a recipe is a named pipeline.")
    if pipeline:
        chosen = list(pipeline)
    elif recipe is None:
        chosen = list(target.default_pipeline)
    elif recipe not in RECIPES:
        raise ConfigError(f"Unknown recipe {recipe!r}. Known recipes: {', '.join(RECIPES)}.")
    else:
        chosen = list(RECIPES[recipe] or target.default_pipeline)
        for pass_name, before in _INSERTED.get(recipe, ()):
            if before not in chosen:
                raise ConfigError(
                    f"Recipe {recipe!r} adds {pass_name!r} before {before!r}, which target {target.name!r}'s "
                    "pipeline does not run."
                )
            chosen.insert(chosen.index(before), pass_name)
        for pass_name, with_options in _OPTIONS.get(recipe, ()):
            if pass_name not in chosen:
                raise ConfigError(f"Recipe {recipe!r} sets options of {pass_name!r}, which target {target.name!r}'s pipeline does not run.")
            chosen[chosen.index(pass_name)] = with_options
    return chosen if config is None else _with_accuracy_passes(chosen, config)


def _with_accuracy_passes(pipeline: list[str], config) -> list[str]:
    wanted = [(field, *where) for field, where in ACCURACY_PASSES.items() if getattr(config, field)]
    if not wanted:
        return pipeline
    specs = [str(spec) for spec in parse_pipeline(pipeline)]
    names = [spec.split("(", 1)[0] for spec in specs]
    for field, pass_name, before in wanted:
        if pass_name in names:
            continue  # the pipeline names it already, perhaps with options
        if before not in names:
            raise ConfigError(
                f"{field} = true adds {pass_name!r} before {before!r}, which this pipeline does not run "
                f"({', '.join(names)}). Use a pipeline with {before!r} (the target's default has it) or "
                f"turn {field} off."
            )
        index = names.index(before)
        specs.insert(index, pass_name)
        names.insert(index, pass_name)
    return specs
