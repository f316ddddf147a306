"""Deployment: conversions of a quantized export (float checkpoint, common-operands
model, float ONNX: ``convert``) and the int8 QDQ ONNX graph for onnxruntime (``qdq``,
built in steps by ``graph``, ``requant``, ``rows`` and ``storage``), run and timed in
onnxruntime by ``ort``; ``tools`` is the glue of tools/deploy.py and
tools/bench_deploy.py."""
