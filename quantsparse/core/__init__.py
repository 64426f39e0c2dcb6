"""Numerics and I/O shared by every other part: config, quantizer, quantized Linear, fake quantization, metrics, safetensors and atomic files, paths, errors, version."""
