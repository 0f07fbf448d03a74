"""Token-level perplexity of an ONNX causal language model, run by onnxruntime.

For each window of token ids the model predicts token t+1 from tokens 0..t; the negative
log-likelihood of every predicted token (511 per 512-token window) is summed over all windows,
and perplexity = exp(total NLL / number of predicted tokens). Windows are independent: no
context is carried from one to the next, and they are run one at a time so memory stays at one
window's logits (512 x 49152 float32, 100 MB for SmolLM2).

The log-softmax is computed in numpy in float64 with the max subtracted first, so a large logit
cannot overflow ``exp`` and a small probability does not underflow to log(0).

The model takes ``input_ids`` (int64 [batch, sequence]) and may take ``attention_mask`` (all
ones here) and zero-length ``past_key_values.*`` inputs (a KV-cache export); its first output
is the logits [batch, sequence, vocab].

Run it from the repository root (windows are the SmolLM2 evaluation windows of
CPython's ``pydoc_data.topics`` text, ``examples/smollm2.py``)::

    python examples/perplexity.py model.onnx [--windows 64] [--window 512]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger("perplexity")

ORT_THREADS = 2


def make_session(onnx_path: str | Path, threads: int = ORT_THREADS) -> ort.InferenceSession:
    """A CPU onnxruntime session with ``threads`` intra-op threads and no inter-op parallelism."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) over the last axis, in float64: x - max - log(sum(exp(x - max)))."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def next_token_nll(logits: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
    """-log p(ids[t+1] | ids[..t]) for every t < sequence - 1: [batch, sequence - 1]."""
    log_probs = log_softmax(logits[:, :-1])
    targets = input_ids[:, 1:]
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def empty_past(session: ort.InferenceSession, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Zero-length ``past_key_values.*`` inputs [batch, heads, 0, head_dim] of a KV-cache model."""
    past = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            _, heads, _, head_dim = value.shape
            past[value.name] = np.zeros((batch_size, heads, 0, head_dim), dtype=np.float32)
    return past


def model_feeds(session: ort.InferenceSession, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of ``session`` for full, unpadded sequences with no past."""
    feeds = {"input_ids": input_ids.astype(np.int64)} | empty_past(session, input_ids.shape[0])
    for value in session.get_inputs():
        if value.name == "attention_mask":
            feeds[value.name] = np.ones_like(input_ids, dtype=np.int64)
        elif value.name not in feeds:
            raise ValueError(f"do not know what to feed the model input {value.name!r}")
    return feeds


def perplexity(
    session_or_path: ort.InferenceSession | str | Path, windows: Sequence[np.ndarray]
) -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` (int64 [1, n] each).

    Windows are run one at a time; logs the seconds per window.
    """
    session = (
        session_or_path
        if isinstance(session_or_path, ort.InferenceSession)
        else make_session(session_or_path)
    )
    output_names = [value.name for value in session.get_outputs()]
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    for window in windows:
        window = np.asarray(window, dtype=np.int64).reshape(1, -1)
        # Only the logits: a KV-cache model's presents are not needed.
        (logits,) = session.run([output_names[0]], model_feeds(session, window))
        nll = next_token_nll(logits, window)
        total_nll += float(nll.sum())
        total_tokens += nll.size
    if not total_tokens:
        raise ValueError("no tokens to predict: give at least one window of 2 tokens or more")
    elapsed = time.perf_counter() - start
    logger.info(
        "%d windows, %d predicted tokens, %.2f s per window",
        len(windows),
        total_tokens,
        elapsed / len(windows),
    )
    return float(np.exp(total_nll / total_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an ONNX causal LM (input_ids -> logits)")
    parser.add_argument("--windows", type=int, default=64, help="number of evaluation windows")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument(
        "--threads", type=int, default=ORT_THREADS, help="onnxruntime intra-op threads"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from smollm2 import load_tokenizer, text_windows  # the tokenizer loads only for the CLI

    windows = text_windows(load_tokenizer(), args.windows, window=args.window)
    session = make_session(args.model, threads=args.threads)
    start = time.perf_counter()
    value = perplexity(session, windows)
    elapsed = time.perf_counter() - start
    print(
        f"{args.model}: perplexity {value:.4f} on {len(windows)} windows of {args.window} tokens"
        f" ({elapsed / len(windows):.2f} s per window, file {model_bytes(args.model) / 1e6:.1f} MB)"
    )


def model_bytes(onnx_path: str | Path) -> int:
    """Size on disk of the .onnx file and the external data files it refers to."""
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    data_files = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return onnx_path.stat().st_size + sum(
        (onnx_path.parent / name).stat().st_size for name in data_files
    )


if __name__ == "__main__":
    main()
