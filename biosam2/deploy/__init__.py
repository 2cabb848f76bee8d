"""Deployment: ONNX export and the ONNX Runtime engine."""
