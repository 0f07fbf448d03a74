"""A compiled language model at work: perplexity on a text and greedy generation, on the
interface ``qcompile.io.causal_lm`` exports (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.*`` in; ``logits``, ``present.*`` out). ``qcompile perplexity`` and
``qcompile generate`` run them."""

from __future__ import annotations

__all__ = ["perplexity", "next_token_agreement", "generate", "feeds", "load_session_and_tokenizer"]

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qcompile.errors import ModelError
from qcompile.io.causal_lm import fill_inputs, load_tokenizer
from qcompile.io.data import InputSpec

logger = logging.getLogger(__name__)

_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(float16)": np.float16}


def _specs(session: ort.InferenceSession) -> list[InputSpec]:
    return [InputSpec(i.name, np.dtype(_DTYPES.get(i.type, np.float32)), tuple(i.shape)) for i in session.get_inputs()]


def feeds(session: ort.InferenceSession, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict:
    """The session's inputs for ``input_ids`` [1, n] after ``past`` (the presents of the calls
    before, renamed to ``past_key_values.*``; None: an empty past): a mask over past and new
    tokens, positions continuing from the past."""
    specs = _specs(session)
    names = {spec.name for spec in specs}
    if "input_ids" not in names:
        raise ModelError(f"The model's inputs are {sorted(names)}: not a causal language model (no input_ids).")
    if not past:
        return dict(fill_inputs({"input_ids": input_ids}, specs))
    length = next(iter(past.values())).shape[2]
    batch = {"input_ids": input_ids, **past}
    if "attention_mask" in names:
        batch["attention_mask"] = np.ones((1, length + input_ids.shape[1]), np.int64)
    if "position_ids" in names:
        batch["position_ids"] = np.arange(length, length + input_ids.shape[1], dtype=np.int64)[None]
    return batch


def perplexity(session: ort.InferenceSession, windows: Sequence[np.ndarray]) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``windows``
    (int64 [1, n] each, run one at a time, each from an empty past)."""
    logits_name = session.get_outputs()[0].name
    total, count, start = 0.0, 0, time.perf_counter()
    for window in windows:
        ids = np.asarray(window, dtype=np.int64).reshape(1, -1)
        (logits,) = session.run([logits_name], feeds(session, ids))
        log_probs = _log_softmax(logits[0, :-1])
        total -= float(log_probs[np.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        count += ids.shape[1] - 1
    if not count:
        raise ModelError("No token to predict: give windows of at least 2 tokens.")
    logger.info("perplexity over %d windows, %d predicted tokens, %.2f s a window", len(windows), count,
                (time.perf_counter() - start) / len(windows))
    return float(np.exp(total / count))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def next_token_agreement(session: ort.InferenceSession, reference: ort.InferenceSession,
                         windows: Sequence[np.ndarray]) -> dict[str, float]:
    """How close ``session``'s next-token distributions are to ``reference``'s (the float model)
    at every position of ``windows``: the mean KL divergence KL(reference || session) in nats, and
    the share of positions whose most likely next token is the same (top-1 agreement)."""
    kl, same, count = 0.0, 0, 0
    for window in windows:
        ids = np.asarray(window, dtype=np.int64).reshape(1, -1)
        (ours,) = session.run([session.get_outputs()[0].name], feeds(session, ids))
        (theirs,) = reference.run([reference.get_outputs()[0].name], feeds(reference, ids))
        p, q = _log_softmax(theirs[0]), _log_softmax(ours[0])
        kl += float((np.exp(p) * (p - q)).sum())
        same += int((p.argmax(axis=-1) == q.argmax(axis=-1)).sum())
        count += ids.shape[1]
    return {"kl_divergence": kl / count, "top1_agreement": same / count, "positions": count}


def generate(session: ort.InferenceSession, prompt_ids: np.ndarray, max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy decoding of up to ``max_new_tokens`` after ``prompt_ids`` (int64 [1, n]): the prompt
    runs once, then one token a call with the presents fed back as the past; stops at ``eos_id``."""
    outputs = [o.name for o in session.get_outputs()]
    presents = [name for name in outputs if name.startswith("present.")]
    ids, past, new = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1), None, []
    for _ in range(max_new_tokens):
        logits, *present = session.run([outputs[0], *presents], feeds(session, ids, past))
        token = int(np.argmax(logits[0, -1]))
        new.append(token)
        if token == eos_id:
            break
        past = {name.replace("present.", "past_key_values.", 1): value for name, value in zip(presents, present)}
        if not past:  # a model without a cache: the whole sequence again
            ids = np.concatenate([ids, [[token]]], axis=1)
        else:
            ids = np.asarray([[token]], dtype=np.int64)
    return new


def load_session_and_tokenizer(model: Path, tokenizer: Path | None, threads: int = 0):
    """(session, tokenizer) for a compiled model: ``model`` an .onnx file or a folder holding
    ``model.onnx`` (what ``qcompile compile FOLDER -o out/`` writes, tokenizer files beside it);
    the tokenizer from ``tokenizer`` (a folder or GGUF file), else from the model's folder."""
    path = model / "model.onnx" if model.is_dir() else model
    if not path.is_file():
        raise ModelError(f"{str(model)!r} is neither an .onnx file nor a folder with a model.onnx.")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, load_tokenizer(tokenizer if tokenizer is not None else path.parent)
