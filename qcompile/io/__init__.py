"""Models and data in and out, and running them: front ends, weights on disk, calibration batches, output files, ONNX Runtime sessions and execution providers."""
