"""The models and data the benchmarks share: ResNet-18- and MobileNetV2-shaped CNNs, seeded random images.

torchvision is not a dependency, so the architecture is written out here: the ResNet-18 layout
(7x7 stem, max pool, four stages of two basic blocks at 64/128/256/512 channels, global average
pool, 1000-way linear) with random weights from a fixed seed. BatchNorm is randomised too (and
put in eval mode) so that folding it is real work, and left in the exported graph: folding it is
the quantizer's job. ``width`` scales every channel count, for the smaller --quick variants.
MobileNetV2 is written out the same way (inverted residual blocks: 1x1 expand, 3x3 depthwise,
1x1 project, ReLU6), with ``width`` as its width multiplier in percent.
"""

from __future__ import annotations

__all__ = ["ResNet18", "MobileNetV2", "export_resnet18", "export_mobilenetv2", "random_images"]

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


def _mobilenetv2_class():
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, relu6: bool = True):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU6()) if relu6 else nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int):
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn(cin, hidden, 1, 1)] if expand != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, 1, relu6=False)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class MobileNetV2(nn.Module):
        # (expansion, channels, repeats, first stride), as in the paper's Table 2.
        SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

        def __init__(self, width_percent: int = 100, num_classes: int = 1000):
            super().__init__()

            def scaled(channels: int) -> int:
                return max(8, int(channels * width_percent / 100 + 4) // 8 * 8)

            cin = scaled(32)
            layers = [conv_bn(3, cin, 3, 2)]
            for expand, channels, repeats, stride in self.SETTINGS:
                for index in range(repeats):
                    layers.append(InvertedResidual(cin, scaled(channels), stride if index == 0 else 1, expand))
                    cin = scaled(channels)
            last = max(1280, scaled(1280))
            layers.append(conv_bn(cin, last, 1, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(last, num_classes)

        def forward(self, x):
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    return MobileNetV2


def _randomise_batchnorm(model):
    """BatchNorm with random affine parameters and statistics, so that folding it is real work."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def ResNet18(width: int = 64, seed: int = 0):
    """A ResNet-18-shaped torch model with seeded random weights and BatchNorm statistics, in eval mode."""
    import torch

    torch.manual_seed(seed)
    return _randomise_batchnorm(_resnet18_class()(width))


def MobileNetV2(width: int = 100, seed: int = 0):
    """A MobileNetV2-shaped torch model (width multiplier ``width``%) with seeded random weights, in eval mode."""
    import torch

    torch.manual_seed(seed)
    return _randomise_batchnorm(_mobilenetv2_class()(width))


def _export(model, path: Path, size: int, seed: int) -> Path:
    """Export at 1x3xSIZExSIZE with a dynamic batch axis (dynamo exporter)."""
    import torch

    example = torch.from_numpy(next(random_images(seed, 1, size)))
    logger.info("exporting %s at %dx%d to %s", type(model).__name__, size, size, path)
    torch.onnx.export(
        model, (example,), str(path), dynamo=True, external_data=False,
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
    )
    return path


def export_resnet18(path: Path, *, size: int, width: int = 64, seed: int = 0) -> Path:
    """The ResNet-18-shaped model as ONNX at ``path`` (exported once per path)."""
    return path if path.exists() else _export(ResNet18(width, seed), path, size, seed)


def export_mobilenetv2(path: Path, *, size: int, width: int = 100, seed: int = 0) -> Path:
    """The MobileNetV2-shaped model as ONNX at ``path`` (exported once per path)."""
    return path if path.exists() else _export(MobileNetV2(width, seed), path, size, seed)
