"""The models and data the benchmarks share: a ResNet-18-shaped CNN and seeded random images.

torchvision is not a dependency, so the architecture is written out here: the ResNet-18 layout
(7x7 stem, max pool, four stages of two basic blocks at 64/128/256/512 channels, global average
pool, 1000-way linear) with random weights from a fixed seed. BatchNorm is randomised too (and
put in eval mode) so that folding it is real work, and left in the exported graph: folding it is
the quantizer's job. ``width`` scales every channel count, for the smaller --quick variants.
"""

from __future__ import annotations

__all__ = ["ResNet18", "export_resnet18", "random_images"]

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def random_images(seed: int, count: int, size: int, batch: int = 1) -> Iterator[np.ndarray]:
    """``count // batch`` float32 batches of standard-normal "images", made one at a time."""
    rng = np.random.default_rng(seed)
    for _ in range(count // batch):
        yield rng.standard_normal((batch, 3, size, size), dtype=np.float32)


def _resnet18_class():
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class ResNet18(nn.Module):
        def __init__(self, width: int = 64, num_classes: int = 1000):
            super().__init__()
            channels = [width, 2 * width, 4 * width, 8 * width]
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
            blocks, cin = [], width
            for index, cout in enumerate(channels):
                stride = 1 if index == 0 else 2
                blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))

    return ResNet18


def ResNet18(width: int = 64, seed: int = 0):
    """A ResNet-18-shaped torch model with seeded random weights and BatchNorm statistics, in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = _resnet18_class()(width)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_resnet18(path: Path, *, size: int, width: int = 64, seed: int = 0) -> Path:
    """Export the model at 1x3xSIZExSIZE with a dynamic batch axis (dynamo exporter), once per path."""
    import torch

    if path.exists():
        return path
    model = ResNet18(width, seed)
    example = torch.from_numpy(next(random_images(seed, 1, size)))
    logger.info("exporting ResNet-18 (width %d) at %dx%d to %s", width, size, size, path)
    torch.onnx.export(
        model, (example,), str(path), dynamo=True, external_data=False,
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
    )
    return path
