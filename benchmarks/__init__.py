"""Benchmarks for qcompile, run as ``python -m benchmarks [--quick] [--out DIR] [--case NAME]``.

Each case measures qcompile and onnxruntime's own ``quantize_static`` side by side, in the same
run, and reports their ratios as well as the raw numbers: benchmark machines are noisy and
shared, so an absolute millisecond or megabyte figure says little on its own, while a ratio of two
things measured together, alternating, on the same machine, holds up.

Cases (each a module here with a ``run(quick, workdir) -> CaseResult``):

- ``calibration_memory``: peak RSS of calibration at a small and a large number of samples; it
  must not grow with the number of samples (qcompile streams into fixed-size histograms).
- ``resnet18_cnn``: a ResNet-18-shaped CNN, quantized by qcompile and by ORT: output SQNR, CPU
  latency at batch 1 and 8, compile time and file sizes.

The table goes to stdout; ``<out>/{quick,full}.json`` and ``.md`` get the same table plus details.
"""
