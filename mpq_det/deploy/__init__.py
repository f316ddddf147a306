"""Deployment: conversions of a quantized export (float checkpoint, common-operands
model, float ONNX) and the int8 QDQ ONNX graph for onnxruntime."""
