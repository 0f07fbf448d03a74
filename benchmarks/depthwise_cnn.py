"""depthwise_cnn: a MobileNet-style CNN with badly scaled depthwise channels, and the PTQ passes
that recover its INT8 accuracy (cross-layer equalization, bias correction, AdaRound).

The model: a 3x3 stem conv and three depthwise-separable blocks (depthwise 3x3, pointwise 1x1,
each with BatchNorm and ReLU), global average pool and a linear head, trained on scikit-learn's
8x8 digits (the split of ``examples/digits_cnn.py``: 1437 training, 360 test images; seeded, a few
seconds on a CPU). After training, every depthwise layer's output channel i is multiplied by a
factor f_i = 10^u, u uniform in [-2, 2] (its BatchNorm's scale and shift times f_i) and the next
pointwise conv's input channel i divided by f_i: the float function is unchanged (ReLU(f x) =
f ReLU(x)), but the channels between them now span four orders of magnitude. That is the classic
failure of MobileNets after BatchNorm folding (Nagel et al. 2019): the activation between the two
convs has one scale for all channels, so the small channels round to zero.

Rows: the float model; plain INT8 (the cpu target's default pipeline: per-channel INT8 weights,
UINT8 activations); then the same with ``cross_layer_equalization``, with it and
``bias_correction``, with it and ``adaround``, and with ``adaround`` alone. Top-1 on the 360 test
images; compile time is ``qcompile.compile``'s wall time in this process (its own evaluation on the
held-out calibration batch included, latency measurement off).
"""

from __future__ import annotations

__all__ = ["VARIANTS", "build_depthwise_model", "compile_variants", "logits", "run"]

import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import examples_module
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

SEED = 0
EPOCHS = 12
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 8, 32
# Row label -> the config switches it turns on (the rest of the config is the target's default).
VARIANTS = {
    "plain int8": {},
    "+CLE": {"cross_layer_equalization": True},
    "+CLE+BC": {"cross_layer_equalization": True, "bias_correction": True},
    "+CLE+AdaRound": {"cross_layer_equalization": True, "adaround": True},
    "+AdaRound": {"adaround": True},
    "per-tensor w: plain int8": {"per_channel": False},
    "per-tensor w: +CLE": {"per_channel": False, "cross_layer_equalization": True},
    "per-tensor w: +CLE+BC": {"per_channel": False, "cross_layer_equalization": True, "bias_correction": True},
    "per-tensor w: +CLE+AdaRound": {"per_channel": False, "cross_layer_equalization": True, "adaround": True},
}


def _network(torch):
    nn = torch.nn

    def separable(cin: int, cout: int, stride: int) -> list:
        return [
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        ]

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        *separable(16, 32, 1), *separable(32, 64, 2), *separable(64, 64, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def _train(torch, x_train: np.ndarray, y_train: np.ndarray, epochs: int):
    torch.manual_seed(SEED)
    model = _network(torch)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss_fn(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


def _imbalance(torch, model, seed: int) -> None:
    """Scale each depthwise layer's output channels by 10^U(-2, 2) (through its BatchNorm) and the
    next pointwise conv's input channels by the inverse: the float function does not change."""
    rng = np.random.default_rng(seed)
    layers = list(model)
    with torch.no_grad():
        for index, layer in enumerate(layers):
            if isinstance(layer, torch.nn.Conv2d) and layer.groups > 1:
                norm, pointwise = layers[index + 1], layers[index + 3]
                factor = torch.from_numpy(10.0 ** rng.uniform(-2.0, 2.0, layer.out_channels)).float()
                norm.weight.mul_(factor)
                norm.bias.mul_(factor)
                pointwise.weight.div_(factor.reshape(1, -1, 1, 1))


def _to_onnx(torch, model):
    """The trained Sequential as ONNX, written node by node (Conv, BatchNormalization, Relu,
    GlobalAveragePool, Flatten, Gemm): what the exporter writes for it, in milliseconds. BatchNorm
    stays a node, so folding it is the compiler's job, as with an exported model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers, value = [], [], "pixels"

    def constant(name: str, tensor) -> str:
        initializers.append(numpy_helper.from_array(tensor.detach().numpy().astype(np.float32), name))
        return name

    for index, layer in enumerate(model):
        name, out = f"layer{index}", f"layer{index}_out"
        if isinstance(layer, torch.nn.Conv2d):
            inputs = [value, constant(f"{name}.weight", layer.weight)]
            if layer.bias is not None:
                inputs.append(constant(f"{name}.bias", layer.bias))
            nodes.append(helper.make_node("Conv", inputs, [out], name=name, group=layer.groups,
                                          kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                                          pads=list(layer.padding) * 2))
        elif isinstance(layer, torch.nn.BatchNorm2d):
            parameters = [constant(f"{name}.{p}", getattr(layer, p)) for p in ("weight", "bias", "running_mean", "running_var")]
            nodes.append(helper.make_node("BatchNormalization", [value, *parameters], [out], name=name, epsilon=layer.eps))
        elif isinstance(layer, torch.nn.ReLU):
            nodes.append(helper.make_node("Relu", [value], [out], name=name))
        elif isinstance(layer, torch.nn.AdaptiveAvgPool2d):
            nodes.append(helper.make_node("GlobalAveragePool", [value], [out], name=name))
        elif isinstance(layer, torch.nn.Flatten):
            nodes.append(helper.make_node("Flatten", [value], [out], name=name))
        elif isinstance(layer, torch.nn.Linear):
            inputs = [value, constant(f"{name}.weight", layer.weight), constant(f"{name}.bias", layer.bias)]
            nodes.append(helper.make_node("Gemm", inputs, [out], name=name, transB=1))
        else:
            raise TypeError(f"no ONNX form for {type(layer).__name__}")
        value = out
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        nodes, "depthwise_cnn", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def build_depthwise_model(out_dir: Path, *, epochs: int = EPOCHS) -> tuple[Path, list[dict], tuple[np.ndarray, np.ndarray]]:
    """Train, unbalance and save the model; return (onnx path, calibration batches, (x_test, y_test)).

    Calibration: the first 8 x 32 training images, as a list (the passes read it more than once).
    """
    import onnx
    import torch

    digits = examples_module("digits_cnn")
    x_train, y_train, x_test, y_test = digits.load_digits_split()
    threads = torch.get_num_threads()
    # One thread: this network's small convolutions train ~15x slower with two on a busy machine.
    torch.set_num_threads(1)
    try:
        model = _train(torch, x_train, y_train, epochs)
    finally:
        torch.set_num_threads(threads)
    _imbalance(torch, model, SEED + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "depthwise_cnn.onnx"
    onnx.save(_to_onnx(torch, model), str(path))
    calibration = [{"pixels": x_train[i * CALIBRATION_BATCH_SIZE : (i + 1) * CALIBRATION_BATCH_SIZE]}
                   for i in range(CALIBRATION_BATCHES)]
    return path, calibration, (x_test, y_test)


def logits(model_bytes_or_path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": x})[0]


def compile_variants(path: Path, calibration: list[dict], variants: dict[str, dict]) -> dict[str, tuple[bytes, float]]:
    """Each variant's compiled model (serialized) and compile seconds."""
    import qcompile

    compiled = {}
    for label, switches in variants.items():
        start = time.perf_counter()
        result = qcompile.compile(path, calibration, config={"measure_latency": False, "cache": False, **switches})
        seconds = time.perf_counter() - start
        compiled[label] = (result.to_proto().SerializeToString(), seconds)
        logger.info("%s: compiled in %.1f s", label, seconds)
    return compiled


def run(quick: bool, workdir: Path) -> CaseResult:
    from benchmarks.harness import sqnr_db

    path, calibration, (x_test, y_test) = build_depthwise_model(workdir / "depthwise")
    reference = logits(str(path), x_test)
    accuracy = {"fp32": float(np.mean(reference.argmax(axis=1) == y_test))}
    rows = [{"model": "fp32", "top-1": round(accuracy["fp32"], 4), "vs fp32 (points)": 0.0,
             "logits SQNR dB": None, "compile s": None}]
    for label, (model, seconds) in compile_variants(path, calibration, VARIANTS).items():
        output = logits(model, x_test)
        accuracy[label] = float(np.mean(output.argmax(axis=1) == y_test))
        rows.append({"model": label, "top-1": round(accuracy[label], 4),
                     "vs fp32 (points)": round(100 * (accuracy[label] - accuracy["fp32"]), 2),
                     "logits SQNR dB": round(sqnr_db(reference, output), 2), "compile s": round(seconds, 2)})
    notes = [(f"{len(y_test)} test images; calibration {CALIBRATION_BATCHES} x {CALIBRATION_BATCH_SIZE} training images "
              "(qcompile holds out every 10th batch for its report); depthwise channels scaled by 10^U(-2, 2), "
              "undone in the next pointwise conv; cpu target defaults (per-channel int8 weights, uint8 activations) "
              "unless 'per-tensor w' (per_channel = false)")]
    return CaseResult(
        name="depthwise_cnn",
        description="MobileNet-style CNN on digits with badly scaled depthwise channels: PTQ accuracy recovery",
        columns=list(rows[0]), rows=rows, notes=notes, details={"accuracy": accuracy},
    )
