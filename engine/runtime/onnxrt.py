"""ONNX Runtime on the CPU: the embedded default and the numerical oracle."""

from __future__ import annotations

import numpy as np

from engine.errors import ModelError
from engine.runtime.base import Backend, register


@register
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    rank = 10  # first: the embedded default

    def load(self) -> None:
        import onnxruntime as ort

        # For a host process that imported onnxruntime before the engine (so before
        # ORT_DISABLE_TELEMETRY, see engine/__init__.py): at least no events from here on.
        ort.disable_telemetry_events()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        path = self.manifest.onnx_path
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelError(f"{path}: ONNX Runtime cannot load this model ({exc})") from None
        self.check_names(
            path,
            (i.name for i in self._session.get_inputs()),
            (o.name for o in self._session.get_outputs()),
        )
        self._outputs = [t.name for t in self.manifest.outputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._outputs, feeds)
        return dict(zip(self._outputs, results, strict=True))

    def close(self) -> None:
        self._session = None
