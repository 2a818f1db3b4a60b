"""Deployment: export (ONNX), compression (quantization, pruning), serving and monitoring."""
