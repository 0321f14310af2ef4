"""ONNX Runtime on the CPU: the embedded default and the numerical oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelError
from engine.runtime import ort_cache
from engine.runtime.base import Backend, register


@register
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    rank = 10  # first: the embedded default
    optimized: Path | None = None  # this model's saved optimised graph (ort_cache)

    def load(self) -> None:
        import onnxruntime as ort

        # For a host process that imported onnxruntime before the engine (so before
        # ORT_DISABLE_TELEMETRY, see engine/__init__.py): at least no events from here on.
        ort.disable_telemetry_events()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        path = self.manifest.onnx_path
        self._session = self._cached_session(ort, opts)
        if self._session is None:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            tmp = None if self.optimized is None else ort_cache.temporary_path(self.optimized)
            if tmp is not None:
                opts.optimized_model_filepath = str(tmp)
            try:
                self._session = ort.InferenceSession(
                    str(path), sess_options=opts, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
                raise ModelError(f"{path}: ONNX Runtime cannot load this model ({exc})") from None
            finally:
                if tmp is not None and self.optimized is not None:
                    ort_cache.publish(tmp, self.optimized)
        self.check_names(
            path,
            (i.name for i in self._session.get_inputs()),
            (o.name for o in self._session.get_outputs()),
        )
        self._outputs = [t.name for t in self.manifest.outputs]

    def _cached_session(self, ort: Any, opts: Any) -> Any:
        """A session on this model's saved optimised graph (engine.runtime.ort_cache), or None
        where there is none yet or it cannot be loaded (then it is made anew)."""
        self.optimized = ort_cache.optimized_path(self.manifest.sha256, ort.__version__)
        if self.optimized is None or not self.optimized.is_file():
            return None
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(
                str(self.optimized), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception:  # a damaged or foreign file: make the session from the model again
            ort_cache.discard(self.optimized)
            return None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._outputs, feeds)
        return dict(zip(self._outputs, results, strict=True))

    def close(self) -> None:
        self._session = None
