"""Quantize a small CNN trained on scikit-learn's 8x8 digits, and compare float vs INT8 accuracy.

What it shows, end to end:

1. train a small convolutional network in PyTorch on ``sklearn.datasets.load_digits``
   (deterministic: fixed seed and a fixed 1437/360 train/test split; a few seconds on a CPU);
2. export it to ONNX with the dynamo exporter and a dynamic batch axis. BatchNormalization is
   left in the graph on purpose: folding it into the convolutions is the compiler's job;
3. write calibration data the way the compiler reads it: a directory of ``.npz`` files, one
   batch per file, keyed by the ONNX model's input name (taken from training images only);
4. compile with ``qcompile.compile(..., target="cpu")`` and save the INT8 model;
5. measure top-1 accuracy of both models on the test set with onnxruntime, and their file sizes.

Run it from the repository root::

    python examples/digits_cnn.py [--out DIR] [--ort-baseline]

``--ort-baseline`` also quantizes the float model with onnxruntime's own ``quantize_static``
(QDQ, per-channel, QUInt8 activations / QInt8 weights) on the same calibration files, as a
point of comparison.

Other code (tests, benchmarks) can reuse the model and data through
``build_digits_model(out_dir) -> (onnx_path, calib_dir, (x_test, y_test))``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import qcompile
from qcompile.io.outputs import report_path_for
from ort_baseline import quantize_with_ort

logger = logging.getLogger("digits_cnn")

SEED = 0
TEST_SIZE = 360
EPOCHS = 30
TRAIN_BATCH_SIZE = 64
LEARNING_RATE = 3e-3
CALIBRATION_BATCH_SIZE = 32
CALIBRATION_BATCHES = 8


class DigitsCNN(nn.Module):
    """Three conv blocks (conv + batch norm + ReLU), one max pool, global average pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            )

        self.features = nn.Sequential(
            conv_block(1, 16),
            conv_block(16, 32),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            conv_block(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test); images are float32 [N, 1, 8, 8] in [0, 1]."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, random_state=SEED, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def train(x_train: np.ndarray, y_train: np.ndarray) -> DigitsCNN:
    """Train a DigitsCNN with Adam; deterministic for a given seed. Returns it in eval mode."""
    torch.manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    shuffle_generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(images), generator=shuffle_generator)
        total_loss = 0.0
        for start in range(0, len(images), TRAIN_BATCH_SIZE):
            batch = order[start : start + TRAIN_BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
        logger.debug("epoch %d: mean loss %.4f", epoch + 1, total_loss / len(images))
    return model.eval()


def export_onnx(model: DigitsCNN, path: Path) -> None:
    """Export with the dynamo exporter; input "pixels" [batch, 1, 8, 8], output "logits".

    ``optimize=False`` keeps the exporter's raw graph: its default optimizer would fold the
    BatchNormalization nodes into the convolutions, which is the compiler's job here.
    """
    example = torch.zeros(2, 1, 8, 8)
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        dynamic_shapes={"x": {0: batch}},
        input_names=["pixels"],
        output_names=["logits"],
        external_data=False,
        optimize=False,
        verbose=False,
    )


def onnx_input_name(onnx_path: Path) -> str:
    (graph_input,) = onnx.load(str(onnx_path), load_external_data=False).graph.input
    return graph_input.name


def write_calibration_batches(images: np.ndarray, input_name: str, calib_dir: Path) -> None:
    """Write the first CALIBRATION_BATCHES x CALIBRATION_BATCH_SIZE images as .npz batches."""
    calib_dir.mkdir(parents=True, exist_ok=True)
    for stale in calib_dir.glob("*.npz"):
        stale.unlink()
    for index in range(CALIBRATION_BATCHES):
        batch = images[index * CALIBRATION_BATCH_SIZE : (index + 1) * CALIBRATION_BATCH_SIZE]
        np.savez(calib_dir / f"batch_{index:03d}.npz", **{input_name: batch})


def build_digits_model(out_dir: str | Path) -> tuple[Path, Path, tuple[np.ndarray, np.ndarray]]:
    """Train and export the digits CNN and write its calibration data under ``out_dir``.

    Returns ``(onnx_path, calib_dir, (x_test, y_test))``: the float ONNX model, the directory of
    calibration ``.npz`` files (training images only) and the held-out test set.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_split()

    model = train(x_train, y_train)
    with torch.no_grad():
        torch_predictions = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    logger.info("PyTorch test top-1: %.4f", np.mean(torch_predictions == y_test))

    onnx_path = out_dir / "digits_cnn.onnx"
    export_onnx(model, onnx_path)
    calib_dir = out_dir / "calibration"
    # train_test_split has shuffled the training images, so the first few hold every class.
    write_calibration_batches(x_train, onnx_input_name(onnx_path), calib_dir)
    return onnx_path, calib_dir, (x_test, y_test)


def top1_accuracy(onnx_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    (logits,) = session.run(None, {input_name: images})
    return float(np.mean(logits.argmax(axis=1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/digits_cnn"), help="output directory")
    parser.add_argument(
        "--ort-baseline",
        action="store_true",
        help="also quantize with onnxruntime.quantization.quantize_static for comparison",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in (logger.name, "qcompile"):
        logging.getLogger(name).setLevel(logging.INFO)

    onnx_path, calib_dir, (x_test, y_test) = build_digits_model(args.out)
    int8_path = args.out / "digits_cnn.int8.onnx"
    result = qcompile.compile(onnx_path, calib_dir, target="cpu")
    report_path = report_path_for(int8_path)  # out/digits_cnn/digits_cnn.int8.report.json
    result.save(int8_path, report_path=report_path)
    logger.info("compile report:\n%s", result.report)

    rows = [("float", onnx_path), ("qcompile int8", int8_path)]
    if args.ort_baseline:
        ort_int8_path = args.out / "digits_cnn.ort_int8.onnx"
        quantize_with_ort(onnx_path, calib_dir, ort_int8_path)
        rows.append(("onnxruntime int8", ort_int8_path))

    print(f"\nDigits CNN, {len(y_test)} test images (onnxruntime CPU)")
    print(f"{'model':<18} {'top-1':>7} {'size (KiB)':>11}  file")
    for label, path in rows:
        accuracy = top1_accuracy(path, x_test, y_test)
        print(f"{label:<18} {accuracy:>7.4f} {path.stat().st_size / 1024:>11.1f}  {path}")
    print(f"compile report: {report_path}")


if __name__ == "__main__":
    main()
