"""ONNX -> TFLite (LiteRT) without TensorFlow: the flatbuffer is written directly with the schema
ai-edge-litert ships. See ``plan`` (what graphs convert) and ``writer`` (float32 and full int8)."""
