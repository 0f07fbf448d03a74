"""ONNX Runtime's own static quantization flow, as the point of comparison the examples print with --ort-baseline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime import quantization as ort_quantization


class NpzDirectoryReader(ort_quantization.CalibrationDataReader):
    """Feeds a directory of .npz batches to onnxruntime's quantize_static, in file-name order."""

    def __init__(self, calib_dir: Path) -> None:
        self._files = iter(sorted(calib_dir.glob("*.npz")))

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self._files, None)
        if path is None:
            return None
        with np.load(path) as arrays:
            return {name: arrays[name] for name in arrays.files}


def quantize_with_ort(onnx_path: Path, calib_dir: Path, output_path: Path) -> None:
    """onnxruntime's recommended static flow: quant_pre_process, then quantize_static (QDQ)."""
    with tempfile.TemporaryDirectory() as scratch:
        preprocessed_path = Path(scratch) / "preprocessed.onnx"
        ort_quantization.quant_pre_process(
            str(onnx_path), str(preprocessed_path), skip_symbolic_shape=True
        )
        ort_quantization.quantize_static(
            str(preprocessed_path),
            str(output_path),
            NpzDirectoryReader(calib_dir),
            quant_format=ort_quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=ort_quantization.QuantType.QUInt8,
            weight_type=ort_quantization.QuantType.QInt8,
        )
