"""cxr-engine: screen whole chest X-ray archives.

Importing the package is cheap: heavy libraries (DALI, ONNX Runtime, TensorRT, torch)
are imported lazily by the modules that need them.
"""

import os

# ONNX Runtime's telemetry (official builds) writes a device id and an event database under
# ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ as soon as it is imported, and uploads events.
# The engine writes nothing outside --out and the models folder, and handles patient images:
# off before any module imports onnxruntime (this variable is read once, at its import). A user
# who sets it explicitly keeps their choice.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
