"""The language-model front end (issue 19): a Hugging Face folder in, exported with a key/value
cache and checked against PyTorch, compiled by ``qcompile compile FOLDER --recipe llm-int4 -o out/``
with the tokenizer files beside the result. Tiny random models of each architecture, built here."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompile.cli import main
from qcompile.errors import ModelError
from qcompile.io.causal_lm import export_causal_lm, fill_inputs, is_causal_lm_source
from qcompile.io.data import InputSpec

torch = pytest.importorskip("torch", reason="the language-model front end needs torch: pip install -e '.[torch,dev]'")
transformers = pytest.importorskip("transformers", reason="the language-model front end needs transformers: pip install -e '.[dev]'")

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _folder(tmp_path, architecture: str):
    configs = {
        "llama": lambda: (transformers.LlamaConfig(**SMALL, tie_word_embeddings=True), transformers.LlamaForCausalLM),
        "qwen2": lambda: (transformers.Qwen2Config(**SMALL), transformers.Qwen2ForCausalLM),
        "phi3": lambda: (transformers.Phi3Config(**SMALL, pad_token_id=0), transformers.Phi3ForCausalLM),
        "gemma3": lambda: (transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=16), transformers.Gemma3ForCausalLM),
    }
    config, cls = configs[architecture]()
    torch.manual_seed(0)
    folder = tmp_path / f"tiny-{architecture}"
    cls(config).eval().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "phi3"])
def test_a_folder_exports_with_a_cache_that_matches_pytorch(tmp_path, architecture):
    """LLaMA (tied embeddings), Qwen2 and Phi-3 (grouped-query attention, 2 kv heads of 4): the
    export's logits over 34 tokens fed in two calls through its cache match PyTorch's one pass
    (export_causal_lm raises past 1e-3; the check runs inside it)."""
    folder = _folder(tmp_path, architecture)
    assert is_causal_lm_source(folder) and not is_causal_lm_source(tmp_path)
    path = export_causal_lm(folder, tmp_path / "out")
    model = onnx.load(path)
    names = [i.name for i in model.graph.input]
    assert names == ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value"))]
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    assert past[1].dim_value == 2 and past[3].dim_value == 16 and past[2].dim_param  # 2 kv heads, dynamic length
    tables = [t for t in model.graph.initializer if sorted(t.dims) == [64, 96]]  # vocab 96 x hidden 64
    assert len(tables) == (1 if architecture == "llama" else 2)  # a tied head reads the embedding table


def test_sliding_window_attention_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ModelError, match="sliding-window attention"):
        export_causal_lm(_folder(tmp_path, "gemma3"), tmp_path / "out")


def test_input_ids_are_enough_for_calibration():
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "sequence")),
             InputSpec("attention_mask", np.dtype(np.int64), ("batch", "mask")),
             InputSpec("position_ids", np.dtype(np.int64), ("batch", "sequence")),
             InputSpec("past_key_values.0.key", np.dtype(np.float32), ("batch", 2, "past", 16))]
    ids = np.arange(10, dtype=np.int64).reshape(2, 5)
    filled = fill_inputs({"input_ids": ids, "attention_mask": np.array([[1] * 5, [1, 1, 1, 0, 0]])}, specs)
    np.testing.assert_array_equal(filled["position_ids"], [[0, 1, 2, 3, 4], [0, 1, 2, 2, 2]])
    assert filled["past_key_values.0.key"].shape == (2, 2, 0, 16)
    other = {"x": ids}
    assert fill_inputs(other, [InputSpec("x", np.dtype(np.int64), None)]) is other


def test_compile_a_folder_into_a_folder_with_its_tokenizer(tmp_path):
    folder = _folder(tmp_path, "llama")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.savez(calib / f"b{i}.npz", input_ids=rng.integers(0, 96, (2, 32)).astype(np.int64))
    out = tmp_path / "out"
    assert main(["compile", str(folder), "--recipe", "llm-int4", "--calib", str(calib), "-o", f"{out}/", "--no-latency", "-q"]) == 0
    assert {"model.onnx", "model.report.json", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    model = onnx.load(out / "model.onnx")
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits")
    assert bits == [4] * 14 + [8]  # 2 layers x 7 projections, the tied head at 8 bits
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = fill_inputs({"input_ids": rng.integers(0, 96, (1, 9)).astype(np.int64)},
                       [InputSpec(i.name, np.dtype(np.float32 if "past" in i.name else np.int64), tuple(i.shape)) for i in session.get_inputs()])
    logits, *present = session.run(None, feed)
    assert logits.shape == (1, 9, 96) and present[0].shape == (1, 2, 9, 16)


def test_a_text_file_is_calibration_data_tokenized_by_the_model_s_own_tokenizer(tmp_path):
    """--calib text.txt for a language model: its tokenizer (a character-level one saved in the
    folder here) cuts the text into windows of 256 tokens, one a batch, at most 16."""
    from qcompile.io.causal_lm import text_batches

    text = ("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40)[:3000]
    folder = _folder(tmp_path, "llama")
    vocabulary = _char_tokenizer(folder, text)
    (tmp_path / "text.txt").write_text(text)
    batches = text_batches(folder, tmp_path / "text.txt")
    assert len(batches) == 3000 // 256 and all(b["input_ids"].shape == (1, 256) for b in batches)
    assert "".join(next(k for k, v in vocabulary.items() if v == i) for i in batches[0]["input_ids"][0]) == text[:256]
    out = tmp_path / "out"
    assert main(["compile", str(folder), "--recipe", "llm-int4", "--calib", str(tmp_path / "text.txt"), "-o", f"{out}/",
                 "--no-latency", "-q"]) == 0
    report = json.loads((out / "model.report.json").read_text())
    assert report["calibration"]["batches"] + report["evaluation"]["batches"] >= len(batches) - 1
    assert (out / "tokenizer.json").is_file()


def _char_tokenizer(folder, text):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocabulary = {c: i for i, c in enumerate(["[UNK]", *sorted(set(text))])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return vocabulary


def test_generate_and_perplexity_match_pytorch_on_the_float_export(tmp_path, capsys):
    """Through the exported cache, greedy generation gives PyTorch's tokens and perplexity PyTorch's
    loss; the commands run on a compiled folder (its tokenizer beside it)."""
    from qcompile.analysis.language_model import generate, load_session_and_tokenizer, perplexity

    text = "the quick brown fox jumps over the lazy dog. " * 30
    folder = _folder(tmp_path, "llama")
    _char_tokenizer(folder, text)
    path = export_causal_lm(folder, tmp_path / "fp32")
    session, tokenizer = load_session_and_tokenizer(path, folder)
    prompt = np.asarray([tokenizer("the quick", add_special_tokens=False)["input_ids"]], dtype=np.int64)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference.generate(torch.from_numpy(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert generate(session, prompt, 12) == expected
    window = np.asarray([tokenizer(text[:200], add_special_tokens=False)["input_ids"]], dtype=np.int64)
    with torch.no_grad():
        loss = reference(torch.from_numpy(window), labels=torch.from_numpy(window)).loss.item()
    assert perplexity(session, [window]) == pytest.approx(np.exp(loss), rel=1e-4)

    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "out"
    assert main(["compile", str(folder), "--recipe", "llm-int4", "--calib", str(tmp_path / "text.txt"), "-o", f"{out}/", "-q",
                 "--no-latency"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the quick")
    assert main(["perplexity", str(out), "--text", str(tmp_path / "text.txt"), "--windows", "2", "--window", "100",
                 "--reference", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity " in printed and "KL divergence" in printed and "top-1 agreement" in printed
    from qcompile.analysis.language_model import next_token_agreement

    itself = next_token_agreement(session, session, [window])
    assert itself["kl_divergence"] == pytest.approx(0, abs=1e-9) and itself["top1_agreement"] == 1.0
    compiled = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    agreement = next_token_agreement(compiled, session, [window])
    assert 0 < agreement["kl_divergence"] < 1 and 0.5 < agreement["top1_agreement"] <= 1


def _permute_for_llama_cpp(weights, heads):
    """llama.cpp's convert_hf_to_gguf row order for LLaMA's q/k projections (its rotary layout)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _random_k_blocks(gguf, kind: str, rows: int, columns: int, rng) -> np.ndarray:
    """``rows`` x ``columns`` weights as random K-quant super-blocks (the gguf package dequantizes
    them but cannot quantize to them): random bytes, with the float16 super-block scales set to
    small positive values so that the weights stay in a trained model's range."""
    _, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)]
    raw = rng.integers(0, 256, (rows, columns // 256, size), dtype=np.uint8)
    for offset in ((0, 2) if kind in ("Q4_K", "Q5_K") else (208,)):
        raw[..., offset:offset + 2] = rng.uniform(1e-4, 4e-4, (rows, columns // 256, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _tiny_gguf(tmp_path, kind: str, kinds: dict | None = None):
    """A tiny LLaMA written as llama.cpp would: projections in ``kind`` blocks (q/k rows permuted;
    ``kinds`` maps a projection's GGUF name, e.g. "ffn_down", to another type), the embedding Q8_0
    (the head tied to it), norms F32. K-quant super-blocks span 256 input channels: with one in
    ``kind`` or ``kinds`` the model is 256 wide, its K-quant weights random super-blocks."""
    gguf = pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install -e '.[llm]'")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files with accelerate: pip install -e '.[llm]'")
    torch.manual_seed(0)
    kinds = kinds or {}
    k_quants = any(k.endswith("_K") for k in (kind, *kinds.values()))
    shape = dict(SMALL, **(dict(hidden_size=256, intermediate_size=512) if k_quants else {}))
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=True)
    state = {k: v.detach().numpy() for k, v in transformers.LlamaForCausalLM(config).eval().state_dict().items()}
    path = tmp_path / f"tiny-{kind}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_block_count(2)
    writer.add_embedding_length(shape["hidden_size"])
    writer.add_feed_forward_length(shape["intermediate_size"])
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(shape["hidden_size"] // 4)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(96)
    rng = np.random.default_rng(0)

    def add(name, array, qtype=None):
        if qtype is None:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
            return
        qtype = getattr(gguf.GGMLQuantizationType, kinds.get(name.split(".")[2], qtype) if name.startswith("blk.") else qtype)
        if qtype.name.endswith("_K"):
            writer.add_tensor(name, _random_k_blocks(gguf, qtype.name, *array.shape, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), raw_dtype=qtype)

    add("token_embd.weight", state["model.embed_tokens.weight"], "Q8_0")
    add("output_norm.weight", state["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute_for_llama_cpp(state[p + "self_attn.q_proj.weight"], 4), kind)
        add(f"blk.{i}.attn_k.weight", _permute_for_llama_cpp(state[p + "self_attn.k_proj.weight"], 2), kind)
        for gguf_name, hf in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                              ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            add(f"blk.{i}.{gguf_name}.weight", state[p + hf + ".weight"], kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# The last: llama.cpp's Q4_K_M mix (Q4_K, with Q5_K and Q6_K for some projections).
@pytest.mark.parametrize("kind, kinds", [("Q4_0", None), ("Q4_1", None), ("Q8_0", None),
                                         ("Q4_K", {"attn_v": "Q5_K", "ffn_down": "Q6_K"})])
def test_a_gguf_file_keeps_its_own_grid(tmp_path, kind, kinds):
    """--recipe llm-gguf: every projection, the tied head and the embedding come from the file's
    blocks (q/k rows put back in transformers' order), within float rounding of what transformers
    dequantized; the model computes what the float export computes."""
    from qcompile.analysis.language_model import feeds
    from qcompile.api import compile as compile_model

    path = export_causal_lm(_tiny_gguf(tmp_path, kind, kinds), tmp_path / "fp32")
    result = compile_model(str(path), None, config={"recipe": "llm-gguf", "measure_latency": False})
    tensors = result.report.transformations["gguf-weights"]["tensors"]
    assert len(tensors) == 2 * 7 + 2 and all("onnx_form" in t for t in tensors.values())
    assert max(t["relative_deviation"] for t in tensors.values()) < 1e-6
    assert {t["gguf_type"] for t in tensors.values()} == {kind, "Q8_0", *(kinds or {}).values()}
    model = result.to_proto()
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 15 and not any(n.op_type == "MatMul" and
                                                                                        n.input[1].endswith("weight") for n in model.graph.node)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    native = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 96, (1, 12)).astype(np.int64)
    expected, got = reference.run(["logits"], feeds(reference, ids))[0], native.run(["logits"], feeds(native, ids))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
