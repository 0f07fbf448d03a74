"""Batches as qcompile reads them: a directory of ``.npz`` files, one batch per file, keyed by the
model's input names. Shared by the examples that write calibration data."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_npz_batches(batches: list[dict[str, np.ndarray]], directory: Path) -> None:
    """One ``batch_NNN.npz`` per batch in ``directory``; .npz files already there are removed first."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.npz"):
        stale.unlink()
    for index, batch in enumerate(batches):
        np.savez(directory / f"batch_{index:03d}.npz", **batch)
