"""cxr-engine: screen whole chest X-ray archives.

Importing the package is cheap: heavy libraries (DALI, ONNX Runtime, TensorRT, torch)
are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
