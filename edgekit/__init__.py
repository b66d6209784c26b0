"""edgekit: convert, quantize, validate and package models for small devices.

The library is importable without its heavy parts: onnx, skl2onnx and scikit-learn are imported
by the functions that need them, with an install hint when they are missing.
"""

__version__ = "0.1.0"
