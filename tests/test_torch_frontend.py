"""The PyTorch front end: an nn.Module with example inputs, exported with dynamo, dynamic batch."""

import numpy as np
import pytest

import qcompile

torch = pytest.importorskip("torch", reason="the PyTorch front end needs the [torch] extra")


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def test_compile_a_module_with_a_dynamic_batch():
    torch.manual_seed(0)
    net = SmallNet().eval()
    example = (torch.randn(2, 3, 8, 8),)
    batch = torch.export.Dim("batch", min=1, max=64)
    rng = np.random.default_rng(0)
    data = [{"x": rng.normal(size=(n, 3, 8, 8)).astype(np.float32)} for n in (1, 3, 5, 2, 4) * 3]
    result = qcompile.compile(net, data, example_inputs=example, dynamic_shapes={"x": {0: batch}},
                              config={"measure_latency": False})
    assert result.report.evaluation["outputs"]
    assert all(m["sqnr_db"] > 25 for m in result.report.evaluation["outputs"].values())
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph)
    assert result.report.fusion["integer_kernels"].get("QLinearConv") == 1


def test_module_without_example_inputs_is_a_clear_error():
    with pytest.raises(qcompile.ModelError, match="example_inputs"):
        qcompile.compile(SmallNet(), [{"x": np.zeros((1, 3, 8, 8), np.float32)}])
