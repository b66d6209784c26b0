"""Building a deployable model: the ``edgekit convert`` pipeline, ONNX export, graph passes, int8 quantization and
its search, per-layer error, validation against the original, and the TFLite writer (``tflite/``).

Imports: models/, edgekit.errors, edgekit.progress, device_agent. Nothing from bundle/, fleet/, local/ or cli/.
"""
