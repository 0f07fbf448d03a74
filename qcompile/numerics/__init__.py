"""Numerics: streaming activation statistics, quantization parameters, GPTQ's column sweep."""
