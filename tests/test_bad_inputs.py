"""Every bad input is a specific QcompileError that names the problem, and leaves no trace.

The corpus is one table, ``CASES``: each row builds one bad input in a fresh folder and names the
error class it must raise and a fragment of the message that names the problem. Every row runs
through the Python API and through ``qcompile compile`` (unless it can only be written one way),
and each run checks:

* the exact error class, and the message fragment;
* from the command line: exit code 2, ``qcompile: error:`` and no traceback on stderr;
* the input model file byte-identical afterwards (same SHA-256);
* no new file anywhere in the folder: no output model, no report, no half-written temp file.

Inputs that look bad but are legitimate (control flow, bool and string tensors, a zero-size
weight, opset 1, no graph inputs) compile: they are in ``ACCEPTED`` at the end, each with what it checks.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile
import qcompile.api
import qcompile.io.outputs
from qcompile.cli import main
from qcompile.errors import (
    AccuracyGateError,
    CalibrationDataError,
    ConfigError,
    ModelError,
    OutputError,
    PipelineError,
    QcompileError,
)
from qcompile.io.loader import load_model

# --- tiny models, built here so each case shows what is wrong with it -------------------------

OPSET = 17
WEIGHT = np.random.default_rng(0).normal(0, 0.5, (4, 4)).astype(np.float32)


def tensor(name: str, elem_type: int = TensorProto.FLOAT, shape=("N", 4)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def graph_model(nodes, inputs, outputs, initializers=(), *, opset: int | None = OPSET, domains=()) -> onnx.ModelProto:
    """A model exactly as given: no checker, so it can be as broken as a case needs."""
    graph = helper.make_graph(nodes, "case", inputs, outputs, list(initializers))
    opsets = ([helper.make_opsetid("", opset)] if opset is not None else []) + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def mlp(opset: int | None = OPSET, batch: int | str = "N") -> onnx.ModelProto:
    """x [N, 4] -> MatMul(w) -> Relu -> z: the good model most cases break one thing of."""
    return graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"], name="relu")],
        [tensor("x", shape=(batch, 4))],
        [tensor("z", shape=(batch, 4))],
        [numpy_helper.from_array(WEIGHT, "w")],
        opset=opset,
    )


def batches(count: int = 3, shape=(2, 4), dtype=np.float32, name: str = "x") -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{name: rng.normal(0, 1, shape).astype(dtype)} for _ in range(count)]


def with_value(position: int, value: float) -> list[dict[str, np.ndarray]]:
    data = batches()
    data[position]["x"][0, 0] = value
    return data


def npz_bytes(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# --- what a case builds, and how it is run ----------------------------------------------------


@dataclasses.dataclass
class Setup:
    """One bad input, built in ``folder``: the model, the data, and the extra arguments of each front end."""

    folder: Path
    model: Path
    data: Any = None  # calibration data: a folder (also --calib), or batches (written as .npz files for --calib)
    api: dict = dataclasses.field(default_factory=dict)  # extra keyword arguments of qcompile.compile
    cli: list[str] = dataclasses.field(default_factory=list)  # extra command-line arguments
    out: Path | None = None  # the output model (default: FOLDER/out.onnx)
    report: Path | None = None  # the report (default: the CLI's, FOLDER/out.report.json beside out.onnx)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # e.g. a full disk

    def __post_init__(self):
        self.out = self.out or self.folder / "out.onnx"
        self.report = self.report or qcompile.io.outputs.report_path_for(self.out)


Builder = Callable[[Path], Setup]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: Builder
    error: type[QcompileError]
    fragment: str  # a phrase of the message that names the problem
    via: str = "both"  # "api", "cli" or "both": where the bad input can be written


def good_model(folder: Path, proto: onnx.ModelProto | None = None) -> Path:
    path = folder / "model.onnx"
    path.write_bytes((proto or mlp()).SerializeToString())
    return path


def model_case(content: onnx.ModelProto | bytes | Callable[[Path], Path], **setup) -> Builder:
    """A bad model (a proto, raw bytes, or a function that makes the path) with good data."""

    def build(folder: Path) -> Setup:
        if callable(content):
            path = content(folder)
        else:
            path = folder / "model.onnx"
            path.write_bytes(content if isinstance(content, bytes) else content.SerializeToString())
        options = {"data": batches(), **setup}
        return Setup(folder, path, **options)

    return build


def data_case(data: Any) -> Builder:
    """The good model with bad calibration data: batches, or a function that makes a folder."""

    def build(folder: Path) -> Setup:
        return Setup(folder, good_model(folder), data=data(folder) if callable(data) else data)

    return build


def options_case(api: dict | Callable[[Path], dict] | None = None, cli: list[str] | Callable[[Path], list[str]] = ()) -> Builder:
    """The good model and data with bad options (API keyword arguments, command-line flags)."""

    def build(folder: Path) -> Setup:
        return Setup(
            folder, good_model(folder), data=batches(),
            api=(api(folder) if callable(api) else dict(api or {})),
            cli=list(cli(folder) if callable(cli) else cli),
        )

    return build


def output_case(**paths: Callable[[Path], Any]) -> Builder:
    """Good model, data and options; a bad destination (out, report, patch made from the folder)."""

    def build(folder: Path) -> Setup:
        return Setup(folder, good_model(folder), data=batches(), **{k: make(folder) for k, make in paths.items()})

    return build


def directory(name: str, files: dict[str, bytes] | None = None) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.mkdir()
        for file, content in (files or {}).items():
            (path / file).write_bytes(content)
        return path

    return make


def text_file(name: str, text: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_text(text)
        return folder / name

    return make


# --- the broken models ------------------------------------------------------------------------


def _truncated(folder: Path) -> Path:
    data = mlp().SerializeToString()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    return folder / "model.onnx"


def _missing_external_data(folder: Path) -> Path:
    path = folder / "model.onnx"
    onnx.save(mlp(), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    (folder / "model.onnx.data").unlink()
    return path


def _custom_op() -> onnx.ModelProto:
    return graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
         helper.make_node("FancyOp", ["y"], ["z"], name="fancy", domain="com.acme")],
        [tensor("x")], [tensor("z")], [numpy_helper.from_array(WEIGHT, "w")], domains=["com.acme"],
    )


def _model_with(*nodes, inputs=None, outputs=None, initializers=None, **kwargs) -> onnx.ModelProto:
    return graph_model(
        list(nodes),
        [tensor("x")] if inputs is None else inputs,
        [tensor("z")] if outputs is None else outputs,
        [numpy_helper.from_array(WEIGHT, "w")] if initializers is None else initializers,
        **kwargs,
    )


MM = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
RELU = helper.make_node("Relu", ["y"], ["z"], name="relu")


def _already_quantized(kind: str) -> onnx.ModelProto:
    """mlp() as a quantizer would have left it: QDQ around the MatMul, ORT's integer MatMul, or
    4-bit MatMulNBits weights."""
    if kind == "qdq":
        scale, zero = numpy_helper.from_array(np.array(0.01, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "zp")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
                 helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
                 helper.make_node("MatMul", ["xd", "w"], ["z"], name="mm")]
        return graph_model(nodes, [tensor("x")], [tensor("z")], [numpy_helper.from_array(WEIGHT, "w"), scale, zero])
    if kind == "integer":
        weight = numpy_helper.from_array(np.ones((4, 4), np.int8), "wq")
        nodes = [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT8, name="cast"),
                 helper.make_node("MatMulInteger", ["xi", "wq"], ["zi"], name="mmi"),
                 helper.make_node("Cast", ["zi"], ["z"], to=TensorProto.FLOAT, name="back")]
        return graph_model(nodes, [tensor("x")], [tensor("z")], [weight])
    packed = numpy_helper.from_array(np.zeros((4, 1, 16), np.uint8), "wq")
    scales = numpy_helper.from_array(np.ones((4,), np.float32), "ws")
    node = helper.make_node("MatMulNBits", ["x", "wq", "ws"], ["z"], domain="com.microsoft", name="nbits",
                            K=4, N=4, bits=4, block_size=32)
    return graph_model([node], [tensor("x")], [tensor("z")], [packed, scales], domains=("com.microsoft",))


def _ir_version(version: int) -> onnx.ModelProto:
    model = mlp()
    model.ir_version = version
    return model


def _weight_with(value: float) -> onnx.ModelProto:
    weight = WEIGHT.copy()
    weight[1, 2] = value
    return _model_with(MM, RELU, initializers=[numpy_helper.from_array(weight, "w")])


def _external_data_entry(key: str, value: str) -> Callable[[Path], Path]:
    """mlp() with its weight in model.onnx.data, and one external-data entry of the weight set to ``value``."""

    def make(folder: Path) -> Path:
        path = folder / "model.onnx"
        onnx.save(mlp(), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
        proto = onnx.load(str(path), load_external_data=False)
        entries = proto.graph.initializer[0].external_data
        for entry in entries:
            if entry.key == key:
                entry.value = value
                break
        else:
            entries.add(key=key, value=value)
        path.write_bytes(proto.SerializeToString())
        return path

    return make


MODEL_CASES = [
    Case("already-quantized-qdq", model_case(_already_quantized("qdq")), ModelError,
         "already quantized: it contains QuantizeLinear x1 (e.g. node 'q'), DequantizeLinear x1"),
    Case("already-quantized-integer", model_case(_already_quantized("integer")), ModelError,
         "already quantized: it contains MatMulInteger"),
    Case("already-quantized-nbits", model_case(_already_quantized("nbits")), ModelError,
         "already quantized: it contains MatMulNBits"),
    Case("model-missing", model_case(lambda folder: folder / "no_such_model.onnx"), ModelError, "does not exist"),
    Case("model-is-a-directory", model_case(directory("model.onnx")), ModelError, "is a directory"),
    Case("model-empty-file", model_case(b""), ModelError, "is empty (0 bytes)"),
    Case("model-truncated", model_case(_truncated), ModelError, "not a readable ONNX model"),
    Case("model-random-bytes", model_case(np.random.default_rng(0).bytes(4096)), ModelError, "not a readable ONNX model"),
    Case("model-is-text", model_case(b"name,value\nx,1\n"), ModelError, "It is a text file"),
    Case("model-is-a-zip", model_case(npz_bytes(x=np.zeros(3))), ModelError, "It is a zip archive"),
    Case("model-has-no-graph", model_case(b"\x08\x07"), ModelError, "has no graph"),
    Case("model-empty-graph", model_case(graph_model([], [tensor("x")], [tensor("x")])), ModelError, "has an empty graph"),
    Case("model-missing-external-data", model_case(_missing_external_data), ModelError, "model.onnx.data"),
    Case("ir-version-too-new", model_case(_ir_version(99)), ModelError, "ir_version 99 is higher"),
    Case("ir-version-missing", model_case(_ir_version(0)), ModelError, "does not have an ir_version"),
    Case("opset-too-new", model_case(mlp(opset=99)), ModelError, "opset 99 of ai.onnx, newer than"),
    Case("opset-import-missing", model_case(mlp(opset=None)), ModelError, "must specify opset_import"),
    Case("op-unknown", model_case(_model_with(helper.make_node("Fancy", ["x"], ["z"], name="fancy"), initializers=[])),
         ModelError, "No Op registered for Fancy"),
    Case("op-custom-domain", model_case(_custom_op()), ModelError, "com.acme::FancyOp (node 'fancy')"),
    Case("dynamic-shape-for-static-target", model_case(mlp(), data=None, api={"target": "qnn-htp"}, cli=["--target", "qnn-htp"]),
         ConfigError, "needs static shapes, but input 'x' has shape ['N', 4]"),
    Case("no-outputs", model_case(_model_with(MM, RELU, outputs=[])), ModelError, "has no graph outputs"),
    Case("duplicate-value-names", model_case(_model_with(MM, helper.make_node("Relu", ["x"], ["y"], name="relu"), outputs=[tensor("y")])),
         ModelError, "'y' has been used as output names multiple times"),
    Case("duplicate-initializers", model_case(_model_with(MM, RELU, initializers=[numpy_helper.from_array(WEIGHT, "w")] * 2)),
         ModelError, "initializer name is not unique"),
    Case("duplicate-node-names", model_case(_model_with(MM, helper.make_node("Relu", ["y"], ["z"], name="mm"))),
         ModelError, "more than one node named 'mm'"),
    Case("dangling-input", model_case(_model_with(helper.make_node("MatMul", ["x", "ghost"], ["y"], name="mm"), RELU)),
         ModelError, "input 'ghost' of node: name: mm"),
    Case("dangling-output", model_case(_model_with(MM, RELU, outputs=[tensor("nowhere")])),
         ModelError, "'nowhere' is not an output of any node"),
    Case("cycle", model_case(_model_with(helper.make_node("Add", ["x", "z"], ["y"], name="add"), RELU, initializers=[])),
         ModelError, "must be topologically sorted"),
    Case("weight-nan", model_case(_weight_with(np.nan)), ModelError,
         "weights that are not finite: 'w' of MatMul 'mm' (1 NaN, 0 Inf of 16)"),
    Case("weight-inf", model_case(_weight_with(-np.inf)), ModelError,
         "weights that are not finite: 'w' of MatMul 'mm' (0 NaN, 1 Inf of 16)"),
    Case("external-data-offset-not-a-number", model_case(_external_data_entry("offset", "abc")), ModelError,
         "has external data offset 'abc'"),
    Case("external-data-offset-negative", model_case(_external_data_entry("offset", "-64")), ModelError,
         "neither can be negative"),
]

# --- bad calibration data ---------------------------------------------------------------------

def _huge_header_npz(folder: Path) -> Path:
    """An .npz whose x.npy header declares 16 TB of float32 and holds 64 bytes (hashing it raised MemoryError)."""
    import io
    import zipfile

    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f4", "fortran_order": False, "shape": (1000000, 4000000)})
    npy.write(bytes(64))
    calib = folder / "calib"
    calib.mkdir()
    with zipfile.ZipFile(calib / "batch.npz", "w") as archive:
        archive.writestr("x.npy", npy.getvalue())
    return calib


def _zip_bomb_npz(folder: Path) -> Path:
    """128 MB of zeros of the wrong rank deflated to 130 kB: refused from its header, before any of
    it is decompressed (it was read whole, then checked)."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (8388608, 4, 1)})
    calib = folder / "calib"
    calib.mkdir()
    with zipfile.ZipFile(calib / "batch.npz", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            zeros = bytes(1 << 22)
            for _ in range(32):
                member.write(zeros)
    return calib


DATA_CASES = [
    Case("calib-missing", data_case(lambda folder: folder / "no_such_calib"), CalibrationDataError, "no_such_calib' is not a directory"),
    Case("calib-is-a-file", data_case(text_file("batch.npz", "")), CalibrationDataError, "is a file, not a directory"),
    Case("calib-empty-folder", data_case(directory("calib")), CalibrationDataError, "has no .npz files (it is empty)"),
    Case("calib-no-npz-files", data_case(directory("calib", {"batch.npy": b"", "notes.txt": b""})), CalibrationDataError,
         "has no .npz files (it has 2 other entries: batch.npy, notes.txt)"),
    Case("calib-corrupt-npz", data_case(directory("calib", {"batch.npz": b"PK\x03\x04 not a zip archive"})), CalibrationDataError,
         "Cannot read calibration file"),
    Case("calib-pickled-npz", data_case(directory("calib", {"batch.npz": npz_bytes(x=np.array([{"a": 1}], dtype=object))})),
         CalibrationDataError, "dtype=str"),
    Case("calib-missing-input", data_case([{}]), CalibrationDataError, "missing input(s) ['x']"),
    Case("calib-wrong-input-name", data_case(batches(name="input")), CalibrationDataError,
         "missing input(s) ['x'] and unknown name(s) ['input']"),
    Case("calib-extra-key", data_case([{**b, "extra": np.zeros(2, np.float32)} for b in batches()]), CalibrationDataError,
         "unknown name(s) ['extra']"),
    Case("calib-float64", data_case(batches(dtype=np.float64)), CalibrationDataError, "has dtype float64 but the model expects float32"),
    Case("calib-int32", data_case(batches(dtype=np.int32)), CalibrationDataError, "has dtype int32 but the model expects float32"),
    Case("calib-wrong-rank", data_case(batches(shape=(2, 4, 1))), CalibrationDataError, "has rank 3"),
    Case("calib-wrong-shape", data_case(batches(shape=(2, 5))), CalibrationDataError, "(axis 1 must be 4)"),
    Case("calib-zero-size-batch", data_case(batches(shape=(0, 4))), CalibrationDataError, "input 'x' is empty"),
    Case("calib-nan", data_case(with_value(1, np.nan)), CalibrationDataError, "contains 1 NaN/Inf value(s)"),
    Case("calib-inf", data_case(with_value(2, -np.inf)), CalibrationDataError, "contains 1 NaN/Inf value(s)"),
    Case("calib-no-batches", data_case([]), CalibrationDataError, "has no batches", via="api"),
    Case("calib-single-dict", data_case(batches()[0]), CalibrationDataError, "is a single mapping", via="api"),
    Case("calib-batch-not-a-dict", data_case([np.zeros((2, 4), np.float32)]), CalibrationDataError, "not a mapping", via="api"),
    Case("calib-ragged-lists", data_case([{"x": [[1.0, 2.0], [3.0]]}]), CalibrationDataError, "not an array numpy can build", via="api"),
    Case("calib-not-iterable", data_case(42), CalibrationDataError, "must be a directory of .npz files or an iterable", via="api"),
    Case("calib-not-given", data_case(None), CalibrationDataError, "needs calibration data"),
    Case("eval-missing", options_case(api=lambda folder: {"eval_data": folder / "no_such_eval"},
                                      cli=lambda folder: ["--eval", str(folder / "no_such_eval")]),
         CalibrationDataError, "evaluation data: "),
    Case("calib-npy-header-declares-terabytes", data_case(_huge_header_npz), CalibrationDataError,
         "declares shape [1000000, 4000000] float32 (16,000,000,000,000 bytes) but its member holds 64 bytes"),
    Case("calib-zip-bomb", data_case(_zip_bomb_npz), CalibrationDataError,
         "input 'x' has rank 3 (shape [8388608, 4, 1])"),
]

# --- bad options: target, pipeline, configuration ---------------------------------------------


def _config_file(text: str) -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        (folder / "qcompile.toml").write_text(text)
        return {"config": folder / "qcompile.toml"}

    return make


def _config_flag(text: str) -> Callable[[Path], list[str]]:
    return lambda folder: ["--config", str(_config_file(text)(folder)["config"])]


def _both(key: str, value: Any, *flag: str) -> dict:
    """The same bad option as a config key for the API and as flags for the command line."""
    return {"api": {"config": {key: value}}, "cli": list(flag)}


def _deep_toml() -> str:
    return "pipeline = " + "[" * 5000 + "]" * 5000 + "\n"


OPTION_CASES = [
    Case("target-unknown", options_case(api={"target": "tpu"}, cli=["--target", "tpu"]), ConfigError, "Unknown target 'tpu'"),
    Case("pass-unknown", options_case(**_both("pipeline", ["fix-names,calibrat"], "--pipeline", "fix-names,calibrat")),
         PipelineError, "Unknown pass 'calibrat'. Did you mean 'calibrate'"),
    Case("pass-option-unknown", options_case(**_both("pipeline", ["calibrate(methd=mse)"], "--pipeline", "calibrate(methd=mse)")),
         PipelineError, "has no option(s) methd"),
    Case("pass-option-bad-value", options_case(**_both("pipeline", ["calibrate(method=median)"], "--pipeline", "calibrate(method=median)")),
         ConfigError, "calibration_method = 'median' is not a known method"),
    Case("pipeline-syntax", options_case(**_both("pipeline", ["calibrate(method=mse"], "--pipeline", "calibrate(method=mse")),
         PipelineError, "Cannot parse pipeline element 'calibrate(method=mse'"),
    Case("pipeline-order", options_case(**_both("pipeline", ["plan-quantization,insert-qdq"], "--pipeline", "plan-quantization,insert-qdq")),
         PipelineError, "Put 'calibrate' between 'plan-quantization' and 'insert-qdq'"),
    Case("recipe-unknown", options_case(**_both("recipe", "llm-int3", "--recipe", "llm-int3")), ConfigError, "Unknown recipe 'llm-int3'"),
    Case("activation-type-unknown", options_case(**_both("activation_type", "int4", "--activation-type", "int4")),
         ConfigError, "activation_type = 'int4' is not a known type"),
    Case("activation-type-not-on-target", options_case(
        api={"target": "qnn-htp", "config": {"activation_type": "int16", "input_shapes": {"x": [2, 4]}}},
        cli=["--target", "qnn-htp", "--activation-type", "int16", "--shape", "x=2x4"]),
         ConfigError, "does not accelerate int16 activations"),
    Case("exclude-regex-invalid", options_case(**_both("exclude_regex", ["mm["], "--exclude-regex", "mm[")),
         ConfigError, "exclude_regex has an invalid regular expression"),
    Case("threads-negative", options_case(**_both("threads", -3, "--threads", "-3")), ConfigError, "threads = -3 must be >= 0"),
    Case("percentile-out-of-range", options_case(**_both("percentile", 40.0, "--percentile", "40")), ConfigError, "must be in (50, 100]"),
    Case("shape-flag-malformed", options_case(cli=["--shape", "x=2x4x"]), ConfigError, "--shape 'x=2x4x' must be NAME=DIMxDIM", via="cli"),
    Case("config-unknown-key", options_case(_config_file('calibraton_method = "minmax"\n'), _config_flag('calibraton_method = "minmax"\n')),
         ConfigError, "Unknown key 'calibraton_method'"),
    Case("config-toml-syntax", options_case(_config_file('calibration_method = "mse\n'), _config_flag('calibration_method = "mse\n')),
         ConfigError, "is not valid TOML"),
    Case("config-wrong-type", options_case(_config_file('threads = "four"\n'), _config_flag('threads = "four"\n')),
         ConfigError, "threads in"),
    Case("config-file-missing", options_case(lambda folder: {"config": folder / "missing.toml"},
                                             lambda folder: ["--config", str(folder / "missing.toml")]),
         ConfigError, "missing.toml' does not exist"),
    Case("config-file-is-a-directory", options_case(lambda folder: {"config": directory("conf.d")(folder)},
                                                    lambda folder: ["--config", str(folder / "conf.d")]),
         ConfigError, "conf.d' is a directory"),
    Case("threads-beyond-the-machine", options_case(**_both("threads", 99999, "--threads", "99999")), ConfigError,
         "threads = 99999 is more ONNX Runtime threads than this machine can run"),
    Case("workers-beyond-the-machine", options_case(api={"config": {"executor": "local", "workers": 10**12}},
                                                    cli=["--executor", "local", "--workers", str(10**12)]),
         ConfigError, f"workers = {10**12} is more worker processes than this machine can run"),
    Case("config-workers-1e12", options_case(_config_file("workers = 1e12\n"), _config_flag("workers = 1e12\n")),
         ConfigError, "workers in"),
    Case("config-nested-5000-deep", options_case(_config_file(_deep_toml()), _config_flag(_deep_toml())),
         ConfigError, "nests arrays or tables too deeply to read"),
    Case("min-sqnr-nan", options_case(**_both("min_sqnr", float("nan"), "--min-sqnr", "nan")), ConfigError,
         "min_sqnr = nan is not a number"),
    Case("eval-batches-zero", options_case(**_both("eval_batches", 0, "--eval-batches", "0")), ConfigError,
         "eval_batches = 0 must be >= 1"),
]

# --- bad destinations -------------------------------------------------------------------------


def _hard_link_to_model(folder: Path) -> Path:
    os.link(folder / "model.onnx", folder / "alias.onnx")
    return folder / "alias.onnx"


def _read_only_folder(folder: Path) -> Path:
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "out.onnx"


def _unwritable(folder: Path) -> Callable[[pytest.MonkeyPatch], None]:
    """A read-only folder refuses new files; root ignores the mode bits, so mkstemp is made to refuse too."""
    real = qcompile.api.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real(*args, dir=dir, **kwargs)

    return lambda monkeypatch: monkeypatch.setattr(qcompile.api.tempfile, "mkstemp", mkstemp)


def _disk_full(folder: Path) -> Callable[[pytest.MonkeyPatch], None]:
    """Writing the model's bytes fails with ENOSPC, as on a full disk (after the temp file exists)."""

    class FullDisk:
        def __init__(self, path, mode="r", *args, **kwargs):
            self.file = open(path, mode, *args, **kwargs)  # noqa: SIM115

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    return lambda monkeypatch: monkeypatch.setattr(qcompile.api, "open", FullDisk, raising=False)


def _symlink_to_model(folder: Path) -> Path:
    (folder / "alias.onnx").symlink_to(folder / "model.onnx")
    return folder / "alias.onnx"


def _fifo(name: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        os.mkfifo(folder / name)
        return folder / name

    return make


def _calib_dir(folder: Path, name: str = "calib") -> Path:
    path = folder / name
    path.mkdir()
    for i, batch in enumerate(batches()):
        np.savez(path / f"batch_{i:02d}.npz", **batch)
    return path


def _external_data_destination(which: str) -> Builder:
    """The model keeps its weight in model.onnx.data; -o (or --report) names that file."""

    def build(folder: Path) -> Setup:
        path = folder / "model.onnx"
        onnx.save(mlp(), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
        return Setup(folder, path, data=batches(), **{which: folder / "model.onnx.data"})

    return build


def _calibration_file_destination(which: str) -> Builder:
    """-o calib/batch_00.npz (or --report): the calibration file would be replaced."""

    def build(folder: Path) -> Setup:
        calib = _calib_dir(folder)
        return Setup(folder, good_model(folder), data=calib, **{which: calib / "batch_00.npz"})

    return build


def _evaluation_file_destination(folder: Path) -> Setup:
    evaluation = _calib_dir(folder, "eval")
    return Setup(folder, good_model(folder), data=batches(), out=evaluation / "batch_01.npz",
                 api={"eval_data": evaluation}, cli=["--eval", str(evaluation)])


def _config_file_destination(which: str) -> Builder:
    def build(folder: Path) -> Setup:
        config = folder / "qcompile.toml"
        config.write_text('calibration_method = "minmax"\n')
        return Setup(folder, good_model(folder), data=batches(), api={"config": config}, cli=["--config", str(config)],
                     **{which: config})

    return build


def _config_named(name: str) -> Builder:
    """A config file where the report's default name puts the report (no --report given)."""
    def build(folder: Path) -> Setup:
        config = folder / name
        config.write_text('calibration_method = "minmax"\n')
        return Setup(folder, good_model(folder), data=batches(), api={"config": config}, cli=["--config", str(config)])

    return build


def _full_disk_dump(folder: Path) -> Setup:
    """--dump-after on a full disk: the dump's bytes stop short with ENOSPC (a 0-byte dump stayed)."""
    import qcompile.core.pipeline

    def save(model, path, *args, **kwargs):
        Path(path).write_bytes(b"\x08")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    dumps = folder / "dumps"
    return Setup(folder, good_model(folder), data=batches(),
                 api={"dump_after": ["calibrate"], "dump_dir": dumps},
                 cli=["--dump-after", "calibrate", "--dump-dir", str(dumps)],
                 patch=lambda monkeypatch: monkeypatch.setattr(qcompile.core.pipeline.ir, "save", save))


OUTPUT_CASES = [
    Case("output-folder-missing", output_case(out=lambda folder: folder / "no_such_dir" / "out.onnx"),
         OutputError, "folder '"),
    Case("output-is-a-directory", output_case(out=directory("out.onnx")), OutputError, "out.onnx': it is a directory"),
    Case("output-is-the-input", output_case(out=lambda folder: folder / "model.onnx"), OutputError,
         "would overwrite the input model"),
    Case("output-is-a-link-to-the-input", output_case(out=_hard_link_to_model), OutputError,
         "would overwrite the input model"),
    Case("output-is-a-symlink-to-the-input", output_case(out=_symlink_to_model), OutputError,
         "would overwrite the input model"),
    Case("report-is-the-input", output_case(report=lambda folder: folder / "model.onnx"), OutputError,
         "would overwrite the input model; choose another"),
    Case("output-is-the-external-data", _external_data_destination("out"), OutputError,
         "would overwrite the model's external data file"),
    Case("report-is-the-external-data", _external_data_destination("report"), OutputError,
         "would overwrite the model's external data file"),
    Case("output-is-a-calibration-file", _calibration_file_destination("out"), OutputError,
         "would overwrite the calibration file"),
    Case("report-is-a-calibration-file", _calibration_file_destination("report"), OutputError,
         "would overwrite the calibration file"),
    Case("output-is-an-evaluation-file", _evaluation_file_destination, OutputError,
         "would overwrite the evaluation file"),
    Case("output-is-the-config-file", _config_file_destination("out"), OutputError, "would overwrite the config file"),
    Case("report-is-the-config-file", _config_file_destination("report"), OutputError, "would overwrite the config file"),
    Case("output-is-a-fifo", output_case(out=_fifo("out.onnx")), OutputError, "it is a FIFO (named pipe), not a regular file"),
    # The report's default name (out.onnx -> out.report.json) is what these cases occupy.
    Case("report-is-a-fifo", output_case(report=_fifo("out.report.json")), OutputError, "it is a FIFO (named pipe)"),
    Case("report-is-a-directory", output_case(report=directory("out.report.json")), OutputError, "it is a directory"),
    Case("default-report-is-the-config-file", _config_named("out.report.json"), OutputError,
         "would overwrite the config file"),
    Case("default-report-name-too-long", output_case(out=lambda folder: folder / ("m" * 245 + ".onnx")), OutputError,
         "its file name is 257 bytes, longer than the 255"),
    Case("output-folder-read-only", output_case(out=_read_only_folder, patch=_unwritable), OutputError, "Permission denied"),
    Case("disk-full", output_case(patch=_disk_full), OutputError, "No space left on device"),
    Case("dump-on-a-full-disk", _full_disk_dump, OutputError, "Cannot write the dump"),
    Case("dump-folder-unwritable", options_case(
        api=lambda folder: {"dump_after": ["calibrate"], "dump_dir": folder / "model.onnx" / "dumps"},
        cli=lambda folder: ["--dump-after", "calibrate", "--dump-dir", str(folder / "model.onnx" / "dumps")]),
         OutputError, "Cannot write the dump"),
    Case("output-name-too-long", output_case(out=lambda folder: folder / ("m" * 300 + ".onnx")), OutputError,
         "its file name is 305 bytes, longer than the 255"),
    Case("report-name-too-long", output_case(report=lambda folder: folder / ("r" * 300 + ".json")), OutputError,
         "its file name is 305 bytes, longer than the 255"),
]

CASES = MODEL_CASES + DATA_CASES + OPTION_CASES + OUTPUT_CASES


def test_the_corpus_is_large_and_ids_are_unique():
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


# --- the checks, the same for every case -----------------------------------------------------


def _snapshot(setup: Setup) -> tuple[list[Path], str | None, dict[Path, str]]:
    """Every path under the folder, the model's SHA-256 (None when it is not a file), and every
    file's SHA-256 (the data, the config, external data: nothing the run reads may change)."""
    digest = hashlib.sha256(setup.model.read_bytes()).hexdigest() if setup.model.is_file() else None
    paths = sorted(setup.folder.rglob("*"))
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file() and not p.is_symlink()}
    return paths, digest, files


def _built(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    setup = case.build(tmp_path)
    if setup.patch is not None:
        setup.patch(monkeypatch)
    return setup


@pytest.mark.parametrize("case", [c for c in CASES if c.via in ("api", "both")], ids=lambda c: c.id)
def test_api_rejects(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """qcompile.compile (and CompileResult.save) raise exactly case.error, naming the problem, writing nothing."""
    setup = _built(case, tmp_path, monkeypatch)
    before = _snapshot(setup)
    kwargs = {"config": {"measure_latency": False}, **setup.api}
    with pytest.raises(QcompileError) as info:
        result = qcompile.compile(str(setup.model), setup.data, **kwargs)
        result.save(setup.out, report_path=setup.report)
    message = str(info.value)
    assert type(info.value) is case.error, f"expected {case.error.__name__}, got {type(info.value).__name__}: {message}"
    assert case.fragment in message
    assert _snapshot(setup) == before, "the model changed, or a file was left behind"


def _calib_folder(setup: Setup) -> Path | None:
    if setup.data is None:
        return None
    if isinstance(setup.data, Path):
        return setup.data
    folder = setup.folder / "calib"
    folder.mkdir()
    for i, batch in enumerate(setup.data):
        np.savez(folder / f"batch_{i:02d}.npz", **batch)
    return folder


@pytest.mark.parametrize("case", [c for c in CASES if c.via in ("cli", "both")], ids=lambda c: c.id)
def test_cli_rejects(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """`qcompile compile` exits 2 with one 'qcompile: error:' naming the problem, no traceback, nothing written."""
    setup = _built(case, tmp_path, monkeypatch)
    calib = _calib_folder(setup)
    before = _snapshot(setup)
    # --report only when the case names another path: the default name is then the one the CLI derives.
    report = [] if setup.report == qcompile.io.outputs.report_path_for(setup.out) else ["--report", str(setup.report)]
    argv = ["compile", str(setup.model), "-o", str(setup.out), *report, "--no-latency", *setup.cli]
    code = main(argv + (["--calib", str(calib)] if calib is not None else []))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "qcompile: error:" in captured.err
    assert case.fragment in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(setup) == before, "the model changed, or a file was left behind"


@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c.error is ModelError], ids=lambda c: c.id)
def test_inspect_rejects_the_same_models(case: Case, tmp_path: Path, capsys):
    """`qcompile inspect` reads models through the same loader: the same error, exit code 2."""
    setup = case.build(tmp_path)
    before = _snapshot(setup)
    assert main(["inspect", str(setup.model)]) == 2
    err = capsys.readouterr().err
    assert case.fragment in err and "Traceback" not in err
    assert _snapshot(setup) == before


# --- the accuracy gate: exit code 3, the report written, not the model -----------------------


def test_accuracy_gate_failure(tmp_path):
    """min_sqnr=200 dB cannot be met: AccuracyGateError, with the result and its failing report attached."""
    path = good_model(tmp_path)
    before = path.read_bytes()
    with pytest.raises(QcompileError) as info:
        qcompile.compile(str(path), batches(), config={"min_sqnr": 200.0, "measure_latency": False})
    error = info.value
    assert type(error) is AccuracyGateError
    assert error.exit_code == 3
    assert "z" in str(error) and "200" in str(error)
    gate = error.result.report.accuracy_gate
    assert gate["passed"] is False and gate["min_sqnr"] == 200.0
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final files must not stay owner-only."""
    result = qcompile.compile(mlp(), batches(), config={"measure_latency": False})
    umask = os.umask(0)
    os.umask(umask)
    result.save(tmp_path / "m.onnx", report_path=tmp_path / "report.json")
    for name in ("m.onnx", "report.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_legal_250_character_name_is_written(tmp_path):
    """The temp file's name is short: it does not push a legal 250-byte name past 255."""
    result = qcompile.compile(mlp(), batches(), config={"measure_latency": False})
    out = tmp_path / ("m" * 245 + ".onnx")
    result.save(out, report_path=tmp_path / ("r" * 245 + ".json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "r" * 245 + ".json"])


def test_save_onto_a_file_the_compile_read_is_refused_for_every_read(tmp_path):
    """CompileResult.save knows what its compile read: the model, its external data, the data files, the config."""
    model = tmp_path / "model.onnx"
    onnx.save(mlp(), str(model), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    calib, evaluation = _calib_dir(tmp_path), _calib_dir(tmp_path, "eval")
    config = tmp_path / "qcompile.toml"
    config.write_text("measure_latency = false\n")
    result = qcompile.compile(str(model), calib, eval_data=evaluation, config=config)
    before = _snapshot(Setup(tmp_path, model))
    for target in (model, tmp_path / "model.onnx.data", calib / "batch_01.npz", evaluation / "batch_00.npz", config):
        for kwargs in ({"path": target}, {"path": tmp_path / "out.onnx", "report_path": target}):
            with pytest.raises(OutputError, match="would overwrite"):
                result.save(**kwargs)
    assert _snapshot(Setup(tmp_path, model)) == before


def test_inspect_json_into_a_closed_pipe_ends_quietly(tmp_path):
    """`qcompile inspect --json | head -c 1`: no BrokenPipeError traceback, exit 0."""
    import subprocess
    import sys

    path = good_model(tmp_path)
    script = f"import sys; from qcompile.cli import main; sys.exit(main(['inspect', {str(path)!r}, '--json', '-q']))"
    run = subprocess.run(f"{sys.executable} -c \"{script}\" | head -c 1", shell=True, capture_output=True, text=True,
                         timeout=120)
    assert run.stdout == "{"
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


def test_debug_reports_never_replace_what_the_analysis_reads(tmp_path, capsys):
    """`qcompile debug --out/--json` onto its float model, quantized model or a data file: exit 2, before the analysis."""
    model, calib = good_model(tmp_path), _calib_dir(tmp_path)
    quantized = tmp_path / "q.onnx"
    quantized.write_bytes(b"not read: the destination is refused first")
    before = _snapshot(Setup(tmp_path, model))
    for flag, target in (("--out", quantized), ("--json", model), ("--out", calib / "batch_00.npz")):
        assert main(["debug", str(model), str(quantized), "--data", str(calib), flag, str(target)]) == 2
        assert "would overwrite" in capsys.readouterr().err
    assert _snapshot(Setup(tmp_path, model)) == before


def test_every_npz_reader_refuses_pickled_arrays_and_says_why(tmp_path, capsys):
    """`qcompile debug --data` and `qcompile run --inputs` read .npz files with calibration's reader
    (each had its own copy), and its errors name the file for what it is to that command (they
    called every such file a "calibration file"): object arrays refused with the reason, a file
    numpy.savez did not write refused with its path; exit 2, no traceback."""
    model = good_model(tmp_path)
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(npz_bytes(x=np.array([{"a": 1}], dtype=object)))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not a zip archive")
    for argv, what in ((["debug", str(model), str(model), "--data"], "debug data file"),
                       (["run", str(model), "--inputs"], "--inputs file")):
        assert main([*argv, str(pickled)]) == 2
        err = capsys.readouterr().err
        assert f"Cannot read {what} {str(pickled)!r}" in err and "never unpickles" in err, err
        assert main([*argv, str(corrupt)]) == 2
        err = capsys.readouterr().err
        assert f"Cannot read {what} {str(corrupt)!r}" in err and "Traceback" not in err, err


# --- interrupted writes: a complete pair or nothing, and the next run sweeps what a kill left ---

_INTERRUPT = """
import os, signal, sys
import qcompile.api, qcompile.io.outputs
from qcompile.cli import main
# A shell runs background jobs with SIGINT ignored, and the child inherits that: give it what an
# interactive run has, or SIGINT would be (rightly) ignored when the suite runs as `... &`.
signal.signal(signal.SIGINT, signal.default_int_handler)
when, sig = sys.argv[1], getattr(signal, sys.argv[2])
if when == "rename":  # the signal arrives between the model's rename and the report's
    real = qcompile.io.outputs.os.replace
    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith("out.onnx"):
            os.kill(os.getpid(), sig)
    qcompile.io.outputs.os.replace = replace
else:  # the signal arrives while the report's temp file is written, the model's temp complete
    def write(tmp, data, destination):
        os.kill(os.getpid(), sig)
    qcompile.api._write_bytes = write
sys.exit(main(sys.argv[3:]))
"""


def _compile_interrupted(tmp_path: Path, when: str, sig: str):
    import subprocess
    import sys

    model = good_model(tmp_path)
    calib = _calib_dir(tmp_path)
    argv = ["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "out.onnx"), "--no-latency",
            "--no-cache", "--no-recover", "-q"]
    return subprocess.run([sys.executable, "-c", _INTERRUPT, when, sig, *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def _written(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("model.onnx", "calib"))


@pytest.mark.parametrize("sig, code, message", [("SIGTERM", 143, "qcompile: interrupted (SIGTERM)"),
                                                ("SIGINT", 130, "qcompile: interrupted")])
def test_a_signal_during_the_final_renames_leaves_the_complete_pair(tmp_path, sig, code, message):
    """SIGINT and SIGTERM are held while the model and its report are renamed into place: both are there."""
    run = _compile_interrupted(tmp_path, "rename", sig)
    assert run.returncode == code, run.stderr
    assert run.stderr.strip().endswith(message) and "Traceback" not in run.stderr
    assert _written(tmp_path) == ["out.onnx", "out.report.json"]
    onnx.checker.check_model(str(tmp_path / "out.onnx"))
    assert json.loads((tmp_path / "out.report.json").read_text())["hashes"]["output_model"]


def test_sigterm_while_writing_leaves_nothing(tmp_path):
    """SIGTERM before the renames: the temp files are removed, no model, no report, one clean line."""
    run = _compile_interrupted(tmp_path, "write", "SIGTERM")
    # The tiny model's size warning may come before; the interruption is the one last line.
    assert run.returncode == 143 and run.stderr.strip().splitlines()[-1] == "qcompile: interrupted (SIGTERM)", run.stderr
    assert "Traceback" not in run.stderr
    assert _written(tmp_path) == []


def test_the_next_run_removes_the_temp_files_a_killed_run_left(tmp_path):
    """SIGKILL while writing leaves the temps (nothing can remove them then); the next run into the
    folder removes them, and a temp of a live process (this one) is kept."""
    run = _compile_interrupted(tmp_path, "write", "SIGKILL")
    assert run.returncode == -9
    left = _written(tmp_path)
    assert len(left) == 2 and all(name.startswith(".qcompile-") and name.endswith(".tmp") for name in left), left
    live = qcompile.io.outputs.temp_beside(tmp_path / "other.onnx")  # this process's: alive
    qcompile.io.outputs._swept.clear()
    result = qcompile.compile(mlp(), batches(), config={"measure_latency": False})
    result.save(tmp_path / "out.onnx", report_path=tmp_path / "out.report.json")
    assert _written(tmp_path) == sorted([live.name, "out.onnx", "out.report.json"])


# --- inputs that look bad but are legitimate: they compile -----------------------------------


def _if_model() -> tuple[onnx.ModelProto, list[dict]]:
    """The MatMul's output goes through If(cond): the then-branch has its own MatMul, the else-branch a Relu."""
    then_branch = helper.make_graph([helper.make_node("MatMul", ["y", "w"], ["t"], name="then_mm")], "then", [], [tensor("t")])
    else_branch = helper.make_graph([helper.make_node("Relu", ["y"], ["e"], name="else_relu")], "else", [], [tensor("e")])
    model = _model_with(
        MM, helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_branch, else_branch=else_branch),
        inputs=[tensor("x"), tensor("cond", TensorProto.BOOL, [])],
    )
    return model, [{**b, "cond": np.array(i % 2 == 0)} for i, b in enumerate(batches(4))]


def _loop_model() -> tuple[onnx.ModelProto, list[dict]]:
    """Three iterations of v = v @ w inside a Loop body, after a MatMul in the main graph."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["v_in", "w"], ["v_out"], name="body_mm")],
        "body",
        [tensor("i", TensorProto.INT64, []), tensor("cond_in", TensorProto.BOOL, []), tensor("v_in")],
        [tensor("cond_out", TensorProto.BOOL, []), tensor("v_out")],
    )
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    model = _model_with(MM, helper.make_node("Loop", ["trip", "", "y"], ["z"], name="loop", body=body),
                        initializers=[numpy_helper.from_array(WEIGHT, "w"), trip])
    return model, batches()


def _scan_model() -> tuple[onnx.ModelProto, list[dict]]:
    """A running sum over the rows of a MatMul's output, with Scan."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "row"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["running"])],
        "body", [tensor("s_in", shape=[4]), tensor("row", shape=[4])], [tensor("s_out", shape=[4]), tensor("running", shape=[4])],
    )
    model = _model_with(
        MM, helper.make_node("Scan", ["s0", "y"], ["total", "z"], name="scan", body=body, num_scan_inputs=1),
        outputs=[tensor("z"), tensor("total", shape=[4])],
        initializers=[numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(np.zeros(4, np.float32), "s0")],
    )
    return model, batches()


def _if_returning_outer_value_model() -> tuple[onnx.ModelProto, list[dict]]:
    """An If whose then-branch returns the outer MatMul's output through an Identity (as silero-vad
    does): removing that Identity makes an outer-scope value a subgraph output, which ONNX Runtime
    refuses. The else-branch holds a nested If whose branches do the same one level deeper."""
    inner_then = helper.make_graph([helper.make_node("Identity", ["y"], ["it"])], "inner_then", [], [tensor("it")])
    inner_else = helper.make_graph([helper.make_node("Identity", ["x"], ["ie"])], "inner_else", [], [tensor("ie")])
    then_branch = helper.make_graph([helper.make_node("Identity", ["y"], ["t"])], "then", [], [tensor("t")])
    else_branch = helper.make_graph(
        [helper.make_node("If", ["cond"], ["e"], name="inner_if", then_branch=inner_then, else_branch=inner_else)],
        "else", [], [tensor("e")])
    model = _model_with(
        MM, helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then_branch, else_branch=else_branch),
        inputs=[tensor("x"), tensor("cond", TensorProto.BOOL, [])],
    )
    return model, [{**b, "cond": np.array(i % 2 == 0)} for i, b in enumerate(batches(4))]


def _loop_reading_outer_values_model() -> tuple[onnx.ModelProto, list[dict]]:
    """A Loop body that returns a loop-carried input and an outer value through Identities beside
    its own MatMul on an outer weight."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v_in", "w"], ["v_out"], name="body_mm"),
         helper.make_node("Identity", ["y"], ["scan_y"])],
        "body",
        [tensor("i", TensorProto.INT64, []), tensor("cond_in", TensorProto.BOOL, []), tensor("v_in")],
        [tensor("cond_out", TensorProto.BOOL, []), tensor("v_out"), tensor("scan_y")],
    )
    trip = numpy_helper.from_array(np.array(2, np.int64), "trip")
    model = _model_with(MM, helper.make_node("Loop", ["trip", "", "y"], ["z", "ys"], name="loop", body=body),
                        outputs=[tensor("z"), tensor("ys", shape=[2, "N", 4])],
                        initializers=[numpy_helper.from_array(WEIGHT, "w"), trip])
    return model, batches()


def _declared_dim_model(dim: int) -> tuple[onnx.ModelProto, list[dict]]:
    """An input whose batch axis is declared as ``dim_value: dim`` (-1 or 0), which some exporters
    write for "dynamic"."""
    return mlp(batch=dim), batches()


def _bool_model() -> tuple[onnx.ModelProto, list[dict]]:
    """A bool input selects between the MatMul's output and a bool-masked copy of x."""
    mask = numpy_helper.from_array(np.array([True, False, True, False]), "column_mask")
    model = _model_with(
        MM, helper.make_node("Where", ["keep", "y", "x"], ["chosen"], name="where_input"),
        helper.make_node("Where", ["column_mask", "chosen", "x"], ["z"], name="where_initializer"),
        inputs=[tensor("x"), tensor("keep", TensorProto.BOOL)],
        initializers=[numpy_helper.from_array(WEIGHT, "w"), mask],
    )
    return model, [{**b, "keep": b["x"] > 0} for b in batches()]


def _string_model() -> tuple[onnx.ModelProto, list[dict]]:
    """A string input and a string initializer, passed through beside the quantized MatMul."""
    labels = helper.make_tensor("labels", TensorProto.STRING, [2], [b"cat", b"dog"])
    model = _model_with(
        MM, RELU, helper.make_node("Identity", ["names"], ["names_out"], name="names_id"),
        helper.make_node("Identity", ["labels"], ["labels_out"], name="labels_id"),
        inputs=[tensor("x"), tensor("names", TensorProto.STRING, ["N"])],
        outputs=[tensor("z"), tensor("names_out", TensorProto.STRING, ["N"]), tensor("labels_out", TensorProto.STRING, [2])],
        initializers=[numpy_helper.from_array(WEIGHT, "w"), labels],
    )
    return model, [{**b, "names": np.array(["a", "b"])} for b in batches()]


def _zero_size_weight_model() -> tuple[onnx.ModelProto, list[dict]]:
    """A [4, 0] weight beside a real one: the empty MatMul has nothing to quantize and stays float."""
    model = _model_with(
        MM, RELU, helper.make_node("MatMul", ["x", "empty"], ["nothing"], name="empty_mm"),
        outputs=[tensor("z"), tensor("nothing", shape=["N", 0])],
        initializers=[numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(np.zeros((4, 0), np.float32), "empty")],
    )
    return model, batches()


def _no_inputs_model() -> tuple[onnx.ModelProto, list[dict]]:
    """No graph inputs: the model computes a constant; one empty batch calibrates it."""
    return _model_with(helper.make_node("MatMul", ["w", "w"], ["z"], name="mm"), inputs=[], outputs=[tensor("z", shape=[4, 4])]), [{}]


ACCEPTED = {
    # name: (model and data, op types that must survive, SQNR floor in dB of the first output)
    "if-subgraph": (_if_model, {"If"}, 30.0),
    "loop-subgraph": (_loop_model, {"Loop"}, 20.0),
    "scan-subgraph": (_scan_model, {"Scan"}, 30.0),
    "if-returning-outer-values": (_if_returning_outer_value_model, {"If"}, 30.0),
    "loop-returning-outer-values": (_loop_reading_outer_values_model, {"Loop"}, 20.0),
    "declared-dim-minus-one": (lambda: _declared_dim_model(-1), set(), 30.0),
    "declared-dim-zero": (lambda: _declared_dim_model(0), set(), 30.0),
    "bool-input-and-initializer": (_bool_model, {"Where"}, 30.0),
    "string-input-and-initializer": (_string_model, set(), 30.0),
    "zero-size-weight": (_zero_size_weight_model, set(), 30.0),
    # Older than ONNX Runtime runs (7): the loader converts it with onnx's version converter.
    "opset-1": (lambda: (mlp(opset=1), batches()), set(), 30.0),
    "no-inputs": (_no_inputs_model, set(), 30.0),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_legitimate_inputs_compile(name: str, tmp_path: Path):
    """What users expect to work does: the compiled model runs in ONNX Runtime and matches the float one."""
    build, kept_ops, floor = ACCEPTED[name]
    proto, data = build()
    onnx.checker.check_model(proto)
    path = good_model(tmp_path, proto)
    before = path.read_bytes()
    result = qcompile.compile(str(path), data, config={"measure_latency": False})
    result.save(tmp_path / "out.onnx")
    assert path.read_bytes() == before
    compiled = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(compiled)
    assert kept_ops <= {node.op_type for node in compiled.graph.node}
    feed = data[0]
    # The float model as qcompile reads it (an opset-1 model converted to opset 7, which ORT runs).
    float_model = ir.serde.serialize_model(load_model(str(path))).SerializeToString()
    expected = ort.InferenceSession(float_model, providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    for want, have in zip(expected, got):
        assert have.shape == want.shape and have.dtype == want.dtype
        if want.dtype.kind in "OUS":
            assert (have == want).all()
    first = result.report.evaluation["outputs"][proto.graph.output[0].name]
    assert first["sqnr_db"] > floor, result.report.evaluation
