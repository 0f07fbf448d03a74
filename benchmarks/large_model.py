"""A model that is large on disk but cheap to run: compile it and measure peak memory.

``python -m benchmarks.large_model --gb 3`` writes a chain of ``MatMul -> Relu`` layers whose
float32 weights add up to ``--gb`` gigabytes, in an external data file written one weight at a
time (so the generator itself never holds more than one layer), then compiles it for the cpu
target in a child process and prints that process's peak RSS as a multiple of the weight bytes.
Issue 7's target: under 1.5x.
"""

from __future__ import annotations

__all__ = ["write_large_model"]

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def write_large_model(folder: Path, *, total_bytes: int, width: int = 8192, seed: int = 0) -> Path:
    """Write ``model.onnx`` + ``model.onnx.data`` with about ``total_bytes`` of float32 weights.

    Every layer is ``y = relu(x @ W)`` with ``W`` of shape ``(width, width)``, He-scaled so
    activations keep their magnitude through the chain. Returns the model path.
    """
    layer_bytes = width * width * 4
    layers = max(1, round(total_bytes / layer_bytes))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    initializers, nodes = [], []
    offset = 0
    with open(folder / data_name, "wb") as data:
        for index in range(layers):
            weight = (rng.standard_normal((width, width), dtype=np.float32) * np.sqrt(2.0 / width)).astype(np.float32)
            data.write(weight.tobytes())
            tensor = TensorProto(name=f"w{index}", data_type=TensorProto.FLOAT, dims=[width, width])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(layer_bytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += layer_bytes
            initializers.append(tensor)
            source = "x" if index == 0 else f"relu{index - 1}"
            nodes.append(helper.make_node("MatMul", [source, f"w{index}"], [f"mm{index}"], name=f"matmul{index}"))
            nodes.append(helper.make_node("Relu", [f"mm{index}"], [f"relu{index}"], name=f"relu{index}"))
    graph = helper.make_graph(
        nodes, "large_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(f"relu{layers - 1}", TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def write_calibration(folder: Path, *, width: int = 8192, batches: int = 4, rows: int = 4, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(batches):
        np.savez(folder / f"batch{index:03d}.npz", x=rng.standard_normal((rows, width), dtype=np.float32))
    return folder


_CHILD = """
import json, sys, time, resource
import qcompile
model, calib, out = sys.argv[1:4]
start = time.perf_counter()
result = qcompile.compile(model, calib, target="cpu", config={"measure_latency": False})
result.save(out)
seconds = time.perf_counter() - start
with open("/proc/self/status") as f:
    peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_bytes": peak_kb * 1024,
                  "min_sqnr_db": min(m["sqnr_db"] for m in result.report.evaluation["outputs"].values())}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="weight bytes of the synthetic model, in GB")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qcompile-large-", dir=args.dir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        model = write_large_model(folder / "model", total_bytes=int(args.gb * 1e9), width=args.width)
        calib = write_calibration(folder / "calib", width=args.width)
        weight_bytes = os.path.getsize(folder / "model" / "model.onnx.data")
        print(f"wrote {weight_bytes / 1e9:.2f} GB of weights in {time.perf_counter() - start:.0f} s", flush=True)
        out = folder / "out" / "model.int8.onnx"
        out.parent.mkdir()
        child = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(calib), str(out)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-4000:], file=sys.stderr)
            return child.returncode
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        output_bytes = sum(p.stat().st_size for p in out.parent.iterdir())
        print(f"compile: {measured['seconds']:.0f} s, peak RSS {measured['peak_bytes'] / 1e9:.2f} GB = "
              f"{measured['peak_bytes'] / weight_bytes:.2f}x the weights (target < 1.5x); "
              f"output {output_bytes / 1e9:.2f} GB in {sorted(p.name for p in out.parent.iterdir())}; "
              f"min output SQNR {measured['min_sqnr_db']:.1f} dB")
        if output_bytes and onnx.load_model(str(out), load_external_data=False).graph.node:
            return 0
        return 1


if __name__ == "__main__":
    sys.exit(main())
