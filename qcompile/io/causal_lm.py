"""Front end for causal language models from the files people have: a Hugging Face folder
(``config.json``, safetensors or ``.bin`` weights, tokenizer) or a GGUF file, exported offline
to ONNX with ``torch.onnx.export(dynamo=True)``.

The exported graph takes ``input_ids``, ``attention_mask`` ([batch, past + sequence]),
``position_ids`` and ``past_key_values.{layer}.key/value`` ([batch, kv_heads, past, head_dim]) and
returns ``logits`` and ``present.{layer}.key/value``; batch, sequence and past length are dynamic
(a first call passes a past of length 0). Attention is exported eagerly (plain MatMul/Softmax) so
that the quantizer sees every MatMul; grouped-query attention and tied embeddings come out as the
model defines them (a tied head reads the embedding table: one weight in the file). Each export
is checked against PyTorch on a sequence fed in two calls through the cache before it is used.

Needs torch and transformers (``pip install -e ".[llm]"``); a GGUF file also needs ``gguf`` and
``accelerate`` (transformers dequantizes its blocks to float32 on loading). Nothing is fetched
from a hub: the folder or file must hold everything (``local_files_only``).
"""

from __future__ import annotations

__all__ = [
    "is_causal_lm_source", "export_causal_lm", "export_folder", "fill_inputs", "name_after_modules", "text_batches", "tokenizer_files", "past_names",
    "TOKENIZER_FILES",
]

import ast
import atexit
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.errors import CalibrationDataError, ModelError, detail

logger = logging.getLogger(__name__)

# Largest |ONNX - PyTorch| logit difference an export may show (float32 reassociation only).
MAX_EXPORT_DIFFERENCE = 1e-3
# Files a runtime needs beside the model to tokenize and generate: copied next to the output.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "config.json",
)
PROTOBUF_LIMIT = 2**31 - 2**24  # weights past this go to an external data file


def is_causal_lm_source(path: Path) -> bool:
    """A Hugging Face model folder (it holds ``config.json``) or a ``.gguf`` file."""
    return (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix.lower() == ".gguf")


def export_folder() -> Path:
    """A folder for an export while it compiles (its weights are mapped from there), removed when
    the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="qcompile-export-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """ONNX names of the cache tensors: ``{prefix}.{layer}.key``, ``{prefix}.{layer}.value``."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def _imports():
    try:
        import torch
        import transformers
    except ModuleNotFoundError as error:
        raise ModelError(
            f"Compiling a language model from a Hugging Face folder or a GGUF file needs {error.name}: "
            'pip install -e ".[llm]" (torch pinned to its CPU build, transformers).'
        ) from None
    return torch, transformers


def load_causal_lm(source: Path):
    """The model in float32, eval mode, eager attention, from the folder or GGUF file alone."""
    torch, transformers = _imports()
    transformers.logging.disable_progress_bar()
    options = {"dtype": torch.float32, "attn_implementation": "eager", "local_files_only": True}
    try:
        if source.is_dir():
            model = transformers.AutoModelForCausalLM.from_pretrained(source, **options)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, **options)
    except ImportError as error:  # transformers names the package a GGUF file needs
        raise ModelError(f"{str(source)!r} needs a package to load: {detail(error)} (pip install gguf accelerate).") from None
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(
            f"{str(source)!r} is not a causal language model transformers can load offline: {detail(error)}"
        ) from None
    return model.eval()


def _cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the key/value cache."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim


def _with_past(model, num_layers: int):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present), as a torch module."""
    torch, transformers = _imports()

    class CausalLMWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = transformers.DynamicCache(config=self.model.config)
            for layer in range(num_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=cache, use_cache=True)
            present = []
            for layer in output.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (output.logits, *present)

    return CausalLMWithPast().eval()


def export_causal_lm(source: Path, out_dir: Path) -> Path:
    """Export the model at ``source`` (a Hugging Face folder or a GGUF file) to
    ``out_dir/model.onnx`` with a key/value cache (see the module docstring); return its path.
    Raises ``ModelError`` when the export disagrees with PyTorch."""
    torch, _ = _imports()
    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    model = load_causal_lm(source)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if "sliding_attention" in (getattr(text_config, "layer_types", None) or []):
        # Its cache keeps the last window of a layer's past: torch.export specialises the past and
        # sequence lengths to the traced ones (measured on a tiny Gemma-3 with transformers 5.25).
        raise ModelError(
            f"{str(source)!r} is a {type(model).__name__} with sliding-window attention layers, which do not export "
            "with a dynamic key/value cache yet. Export it yourself (a static cache) and compile the .onnx file."
        )
    num_layers, kv_heads, head_dim = _cache_geometry(model.config)
    module = _with_past(model, num_layers)

    # Traced with a batch of 2, 7 new tokens and 5 past ones, so that no axis is specialised to 1.
    batch, sequence, past_sequence = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    past = [torch.randn(2, kv_heads, 5, head_dim) for _ in range(2 * num_layers)]
    args = (ids, torch.ones(2, 12, dtype=torch.int64), torch.arange(5, 12).repeat(2, 1), *past)
    # The mask's length is past + sequence: torch.export cannot name a sum of two Dims.
    dynamic_shapes = ({0: batch, 1: sequence}, {0: batch, 1: torch.export.Dim.DYNAMIC}, {0: batch, 1: sequence},
                      tuple({0: batch, 2: past_sequence} for _ in past))
    start = time.perf_counter()
    try:
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names(num_layers)],
            output_names=["logits", *past_names(num_layers, "present")],
        )
    except Exception as error:  # noqa: BLE001  (torch.export raises many types; the user needs the reason)
        reason = re.sub(r"\x1b\[[0-9;]*m", "", detail(error))  # the exporter colours its messages
        raise ModelError(f"{str(source)!r}: torch.onnx.export failed for {type(model).__name__}: {reason}") from None
    name_after_modules(program.model)
    if getattr(model.config, "tie_word_embeddings", False):
        _tie_head(program.model)
    mask = program.model.graph.inputs[1]
    mask.shape = ir.Shape([mask.shape[0], "past_sequence + sequence"])
    if not source.is_dir():  # the gguf-weights pass reads the file's own blocks (recipe llm-gguf)
        program.model.metadata_props["qcompile.gguf_file"] = str(source.resolve())
    weight_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(onnx_path), external_data=weight_bytes > PROTOBUF_LIMIT)
    logger.info("exported %s (%s, %d layers) in %.1f s", onnx_path, type(model).__name__, num_layers, time.perf_counter() - start)
    difference = _check_against_pytorch(model, onnx_path, num_layers, vocab)
    if difference > MAX_EXPORT_DIFFERENCE:
        raise ModelError(f"{str(source)!r}: the ONNX export's logits differ from PyTorch's by {difference:.2e} "
                         f"(more than {MAX_EXPORT_DIFFERENCE:g}); this architecture does not export faithfully.")
    return onnx_path


def name_after_modules(model: ir.Model) -> None:
    """Readable names for what the quantizer and its report talk about, from the exporter's record
    of the PyTorch module each node came from: a Linear's MatMul becomes
    ``/model/layers/0/self_attn/q_proj/MatMul`` and its folded weight
    ``model.layers.0.self_attn.q_proj.MatMul.weight``; attention's own MatMuls keep the exporter's names."""
    # The wrapper's ``model.`` prefix goes, so weights read like the Hugging Face state dict; a tied
    # head's table (which the exporter names after the head) is the embedding.
    for value in list(model.graph.initializers.values()):
        if value.name.startswith("model."):
            value.name = value.name.removeprefix("model.")
    tables = model.graph.initializers
    if "lm_head.weight" in tables and "model.embed_tokens.weight" not in tables:
        tables["lm_head.weight"].name = "model.embed_tokens.weight"
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if node.op_type not in ("MatMul", "Gather") or not scopes:
            continue
        *_, module_path, torch_op = ast.literal_eval(scopes)
        if not torch_op.startswith(("linear", "embedding")):
            continue
        module_path = module_path.removeprefix("model.")
        node.name = "/" + module_path.replace(".", "/") + "/" + node.op_type
        weight = node.inputs[1] if node.op_type == "MatMul" else None
        if weight is not None and weight.is_initializer() and weight.name.startswith("val_"):
            weight.name = f"{module_path}.MatMul.weight"


def _tie_head(model: ir.Model) -> None:
    """A tied head reads the embedding table through a Transpose again: the exporter folds that
    Transpose into a second, transposed copy of the table (vocab x hidden floats stored twice)."""
    table = model.graph.initializers.get("model.embed_tokens.weight")
    head = next((n for n in model.graph if n.name == "/lm_head/MatMul"), None)
    if table is None or head is None or not head.inputs[1].is_initializer() or head.inputs[1].const_value is None:
        return
    copy = head.inputs[1]
    if not np.array_equal(copy.const_value.numpy(), table.const_value.numpy().T):
        return
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name="/lm_head/Transpose")
    transpose.outputs[0].name = "lm_head.weight_transposed"
    model.graph.insert_before(head, transpose)
    head.replace_input_with(1, transpose.outputs[0])
    model.graph.initializers.pop(copy.name)


def _check_against_pytorch(model, onnx_path: Path, num_layers: int, vocab: int) -> float:
    """Max |ONNX - PyTorch| of the logits of 34 tokens fed in two calls (11 with an empty past,
    then 23 with the first call's presents), against one PyTorch pass over all 34: checks the
    dynamic axes, a zero-length past, positions and that the cache is carried."""
    import onnxruntime as ort

    torch, _ = _imports()
    ids = torch.randint(0, vocab, (1, 34), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ids = ids.numpy()
    empty = {i.name: np.zeros([1 if d == "batch" else 0 if not isinstance(d, int) else d for d in i.shape], np.float32)
             for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    first = session.run(None, {"input_ids": ids[:, :11], "attention_mask": np.ones_like(ids[:, :11]),
                               "position_ids": np.arange(11)[None]} | empty)
    past = dict(zip(past_names(num_layers), first[1:], strict=True))
    second = session.run(None, {"input_ids": ids[:, 11:], "attention_mask": np.ones_like(ids),
                                "position_ids": np.arange(11, 34)[None]} | past)
    difference = float(np.abs(np.concatenate([first[0], second[0]], axis=1) - expected).max())
    logger.info("max |ONNX - PyTorch| of the logits = %.2e (34 tokens, two calls through the cache)", difference)
    return difference


# Calibration from a text file: this many windows of this many tokens, one window a batch (4,096
# tokens: GPTQ's Hessians of a 576-wide model from 7x as many rows as columns).
TEXT_WINDOWS, TEXT_WINDOW_TOKENS = 16, 256


def load_tokenizer(source: Path):
    """The model's own tokenizer: from its folder, or from inside its GGUF file."""
    _, transformers = _imports()
    try:
        if source.is_dir():
            return transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{str(source)!r} has no tokenizer transformers can load offline ({detail(error)}): "
                         "pass calibration batches of input_ids (.npz) instead of text.") from None


def text_batches(source: Path, text_file: Path, *, windows: int = TEXT_WINDOWS, tokens: int = TEXT_WINDOW_TOKENS) -> list[dict]:
    """Calibration batches from a text file: the text tokenized by the model's tokenizer (no
    special tokens), cut into consecutive windows of ``tokens`` tokens, the first ``windows`` of
    them, each a batch ``{"input_ids": int64 [1, tokens]}`` (``fill_inputs`` adds the rest). A
    text too short for one window gives one batch of all its tokens."""
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationDataError(f"Cannot read the calibration text {str(text_file)!r}: {detail(error)}") from None
    ids = np.asarray(load_tokenizer(Path(source))(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    if ids.size == 0:
        raise CalibrationDataError(f"The calibration text {str(text_file)!r} has no tokens.")
    count = max(1, min(windows, len(ids) // tokens))
    length = tokens if len(ids) >= tokens else len(ids)
    return [{"input_ids": ids[i * length:(i + 1) * length].reshape(1, length)} for i in range(count)]


def fill_inputs(batch: Mapping, specs) -> Mapping:
    """A batch for a model with this module's interface, completed from its ``input_ids`` (and
    ``attention_mask``): a mask of ones, positions counted along the mask (right padding), and an
    empty past (length 0) for every ``past_key_values.*`` input, as a first call passes. Any other
    batch, or one that names every input, is returned as it is."""
    names = {spec.name for spec in specs}
    missing = names - set(batch)
    lm_interface = "position_ids" in names and any(name.startswith("past_key_values.") for name in names)
    if not missing or not lm_interface or "input_ids" not in batch:
        return batch
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        return batch  # validation names the problem
    filled = dict(batch)
    if "attention_mask" in missing:
        filled["attention_mask"] = np.ones(ids.shape, np.int64)
    if "position_ids" in missing:
        mask = np.asarray(filled["attention_mask"]).astype(np.int64)
        filled["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:]
    for spec in specs:
        if spec.name in missing and spec.name.startswith("past_key_values.") and spec.shape is not None and len(spec.shape) == 4:
            kv_heads, head_dim = spec.shape[1], spec.shape[3]
            if isinstance(kv_heads, int) and isinstance(head_dim, int):
                filled[spec.name] = np.zeros((ids.shape[0], kv_heads, 0, head_dim), spec.dtype)
    return filled


def tokenizer_files(source: Path) -> list[str]:
    """The names of the tokenizer and generation files of a model folder ``source`` (none for a
    GGUF file: it carries its tokenizer inside), for the command line to copy beside the output."""
    if not source.is_dir():
        return []
    return [name for name in TOKENIZER_FILES if (source / name).is_file()]
