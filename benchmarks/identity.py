"""``python -m benchmarks.identity write|check FILE``: are the compiled models byte-identical?

A refactoring that promises "behaviour unchanged" (issue 18's one-way core) proves it here: the
corpus is compiled before the first commit (``write``), and after each step (``check``) every
compiled .onnx must have the same sha256. The corpus, in groups (``--groups``, all by default):

- ``onnx-test-models``: the ONNX package's test models, compiled as ``benchmarks.onnx_test_models``
  compiles them (149 models, ~90 s);
- ``fuzz``: the first ``--fuzz-examples`` graphs of ``tests/test_fuzz.py``'s grammar with its
  configurations, derandomized, so every run draws the same graphs (needs hypothesis);
- ``configs``: the tests' tiny CNN, transformer block, LSTM and language model under every
  target, recipe, accuracy pass, calibration method and activation type (the paths the other
  groups' default configurations do not take: INT4 blocks, GPTQ, bias correction, FP8, 16-bit);
- ``real-models``: the ``real_models`` benchmark corpus with its cached calibration and evaluation
  data, compiled with the default configuration (recovery included; needs the benchmark's cache,
  ``python -m benchmarks --case real_models`` fills it; ~6 min).

A model that fails to compile records its error's class and first line instead of a hash, so a
change in what is refused shows too. ``check`` prints each difference and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

import qcompile
from qcompile.analysis.accuracy_search import compile_or_recover
from qcompile.errors import QcompileError

GROUPS = ("onnx-test-models", "fuzz", "configs", "real-models")
FUZZ_EXAMPLES = 120


def _outcome(compile_one: Callable[[], qcompile.CompileResult]) -> str:
    try:
        result = compile_one()
    except QcompileError as error:
        return f"refused: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return "sha256:" + hashlib.sha256(result.to_proto().SerializeToString(deterministic=True)).hexdigest()


def _onnx_test_models() -> Iterator[tuple[str, Callable]]:
    import onnx

    from benchmarks.onnx_test_models import calibration_batches, discover

    for case in discover():
        if not case.data_sets or not case.data_sets[0][0]:
            continue
        settings = {"measure_latency": False, "eval_batches": 1, "threads": 1}
        yield f"{case.suite}/{case.name}", lambda case=case, settings=settings: qcompile.compile(
            onnx.load_model(str(case.model_path)), calibration_batches(case.data_sets[0][0]), config=settings)


def _fuzz(examples: int) -> Iterator[tuple[str, Callable]]:
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    import test_fuzz
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    drawn = []

    @settings(derandomize=True, database=None, max_examples=examples, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), deadline=None)
    @given(test_fuzz.graphs(), st.sampled_from(test_fuzz.CONFIGS))
    def draw(case, config):
        drawn.append((case, config))

    draw()
    for index, ((model, shapes), config) in enumerate(drawn):
        settings_ = {"measure_latency": False, "eval_batches": 1, "threads": 1, **config}
        calibration = test_fuzz._batches(shapes, test_fuzz.CALIBRATION_BATCHES, seed=1)
        yield f"fuzz/{index:04d}", lambda m=model, c=calibration, s=settings_: qcompile.compile(m, c, config=s)


# (model, its batches, the config) for the configs group: each line a path through the compiler.
_CONFIGS = (
    *((model, {"target": target}) for model in ("cnn", "transformer") for target in ("cpu", "cuda", "tensorrt", "openvino")),
    ("cnn", {"target": "qnn-htp"}),
    *(("cnn", {"calibration_method": method}) for method in ("minmax", "percentile", "entropy", "mse", "auto")),
    *(("cnn", {switch: True}) for switch in ("bias_correction", "gptq_rounding", "adaround", "cross_layer_equalization")),
    ("cnn", {"activation_type": "uint16", "bias_correction": True, "gptq_rounding": True}),
    ("cnn", {"activation_type": "int8"}),
    ("transformer", {"activation_type": "uint16"}),
    *(("transformer", {"recipe": recipe}) for recipe in ("llm-w8a8", "llm-w8a8-outliers", "llm-fp8")),
    *(("lm", {"recipe": recipe}) for recipe in ("llm-int4", "llm-int8-weight")),
    ("lm", {"pipeline": ["fix-names", "shape-inference", "quantize-weights(bits=4, block=32)", "remove-unused"]}),
    ("lstm", {"target": "cpu"}),
)


def _configs() -> Iterator[tuple[str, Callable]]:
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    import tiny_models as tm

    models = {"cnn": (tm.tiny_cnn, lambda: tm.cnn_batches(4)), "transformer": (tm.tiny_transformer, lambda: tm.transformer_batches(4)),
              "lstm": (tm.tiny_lstm, lambda: tm.lstm_batches(4)),
              "lm": (tm.tiny_lm, lambda: [{"ids": (np.arange(16).reshape(2, 8) * 7 % tm.VOCAB).astype(np.int64)}])}
    for index, (name, config) in enumerate(_CONFIGS):
        build, batches = models[name]
        settings = {"measure_latency": False, "eval_batches": 1, "threads": 1, **config}
        label = ",".join(f"{k}={v}" for k, v in config.items())[:80]
        yield f"configs/{index:02d}-{name}-{label}", lambda b=build, d=batches, s=settings: qcompile.compile(b(), d(), config=s)


def _real_models() -> Iterator[tuple[str, Callable]]:
    import benchmarks.real_models as rm

    for spec in rm.MODELS:
        try:
            model = rm.fetch_model(spec)
            calib, evaluation = rm.prepare(spec, model, 16, 8)
        except rm.Unavailable:
            continue
        config = {"target": "cpu", "measure_latency": False, "threads": 1}
        yield f"real/{spec.name}", lambda m=model, c=calib, e=evaluation, s=config: compile_or_recover(
            str(m), str(c), config=s, eval_data=str(e))


def corpus(groups: tuple[str, ...], fuzz_examples: int) -> Iterator[tuple[str, Callable]]:
    if "onnx-test-models" in groups:
        yield from _onnx_test_models()
    if "fuzz" in groups:
        yield from _fuzz(fuzz_examples)
    if "configs" in groups:
        yield from _configs()
    if "real-models" in groups:
        yield from _real_models()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.identity", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("write", "check"))
    parser.add_argument("file", type=Path, help="the JSON of sha256s (written by write, read by check)")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--fuzz-examples", type=int, default=FUZZ_EXAMPLES)
    args = parser.parse_args(argv)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; use {', '.join(GROUPS)}")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    hashes = {name: _outcome(compile_one) for name, compile_one in corpus(groups, args.fuzz_examples)}
    seconds = time.perf_counter() - start
    if args.mode == "write":
        args.file.write_text(json.dumps({"groups": list(groups), "models": hashes}, indent=1, sort_keys=True) + "\n")
        print(f"{len(hashes)} compiled models in {seconds:.0f} s -> {args.file}")
        return 0
    recorded = json.loads(args.file.read_text())["models"]
    differences = [f"{name}: {recorded.get(name, 'absent')} -> {hashes.get(name, 'absent')}"
                   for name in sorted(set(recorded) | set(hashes)) if recorded.get(name) != hashes.get(name)]
    for line in differences:
        print(line)
    print(f"{len(hashes)} compiled models in {seconds:.0f} s: "
          f"{len(differences)} differ from {args.file}" if differences else f"all {len(hashes)} identical")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
