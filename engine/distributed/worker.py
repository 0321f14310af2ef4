"""The worker side of `cxr screen --ray`: the Ray Data actor that screens shards.

A `ShardActor` is built once per actor: it checks that its node sees the run's files
(`shard.check_view`), writes the model files the driver shipped through the object store to a
local cache (`materialise_models`; `model_files` is what the driver ships), loads them with the
usual sha256 check, refuses models whose id differs from the driver's, and builds the same
Screener as a local run. Each call then screens one shard into its part (`shard.screen_shard`,
fenced by the run's run.json) and returns its counts and timings as one row per shard.

No Ray at import: Ray Data pickles the class by reference, and imports Ray only on the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ScreenConfig
from engine.errors import EngineError, ModelError
from engine.io.shards import Shard, ShardReader
from engine.models import ModelSet, load_models, manifest_path

MODEL_CACHE_ENV = "CXR_MODEL_CACHE"  # where workers keep the shipped model files


def model_files(models: ModelSet) -> dict[str, bytes]:
    """The manifests and the ONNX files (and TensorRT plans, if any) the run uses."""
    files: dict[str, bytes] = {}
    for m in (models.segmenter, models.classifier):
        files[f"{m.role}.json"] = manifest_path(m.directory, m.role).read_bytes()
        files[m.onnx] = m.onnx_path.read_bytes()
        plans = m.directory / "plans"
        if plans.is_dir():
            for p in sorted(plans.iterdir()):
                if p.is_file():
                    files[f"plans/{p.name}"] = p.read_bytes()
    return files


def materialise_models(files: dict[str, bytes]) -> Path:
    """Write the shipped files once per machine (a cache keyed by their content), under
    $CXR_MODEL_CACHE, else $TMPDIR/cxr-models-UID; load_models checks their sha256."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    default = Path(tempfile.gettempdir()) / f"cxr-models-{os.getuid()}"
    cache = Path(os.environ.get(MODEL_CACHE_ENV) or default)
    final = cache / digest.hexdigest()[:24]
    if not final.is_dir():
        tmp = cache / f".{final.name}.tmp-{os.getpid()}"
        for name, data in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        try:
            os.rename(tmp, final)
        except OSError:  # another actor on this machine was first: use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# the actor


@dataclass(frozen=True)
class WorkerSpec:
    config: ScreenConfig  # threads = the actor's CPUs; out absolute
    model_id: str
    run_id: str
    inputs: list[str]  # absolute inputs the driver could see


class ShardActor:
    """A Ray Data actor: models loaded once, then one shard per call (batch_size=1)."""

    def __init__(self, spec: WorkerSpec, files: list[Any]) -> None:
        import ray

        from engine.distributed.shard import check_view, fence
        from engine.screener import Screener
        from engine.screening import common_columns

        config = spec.config
        self.spec = spec
        self.out = Path(config.out)
        problems = check_view(self.out, spec.run_id, spec.inputs)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = platform.node()
        if problems:
            raise EngineError(
                f"node {self.host} cannot see the run's files (a shared filesystem is needed): "
                + "; ".join(problems)
            )
        directory = materialise_models(ray.get(files[0]))
        models = load_models(directory, precision=config.precision).with_threshold(config.threshold)
        if models.model_id != spec.model_id:
            raise ModelError(
                f"node {self.host}: the shipped models load as {models.model_id}, the driver "
                f"has {spec.model_id}; is this node's cxr-engine another version?"
            )
        self.screener = Screener(
            models,
            backend=config.backend,
            batch_size=config.batch_size,
            threads=config.threads,
            decoder=config.decoder,
        )
        self.reader = ShardReader()
        self.fence = fence(self.out, spec.run_id)
        self.common = common_columns(self.screener, spec.run_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from engine.distributed.shard import screen_shard

        results = []
        for number, text in zip(batch["number"], batch["entries"], strict=True):
            shard = Shard.from_json(int(number), str(text))
            results.append(
                screen_shard(
                    self.screener,
                    self.reader,
                    shard,
                    config=self.spec.config,
                    out=self.out,
                    common=self.common,
                    before_commit=self.fence,
                )
            )
        return {
            "number": [r.number for r in results],
            "rows": [r.rows for r in results],
            "ok": [r.ok for r in results],
            "errors": [r.errors for r in results],
            "positives": [r.positives for r in results],
            "error_samples": [json.dumps(r.error_samples) for r in results],
            "already_committed": [r.already_committed for r in results],
            "started": [r.started for r in results],
            "seconds": [r.seconds for r in results],
            "stage_s": [json.dumps(r.stage_s) for r in results],
            "latencies_s": [json.dumps(r.latencies_s) for r in results],
            "node_id": [self.node_id] * len(results),
            "host": [self.host] * len(results),
            "backend": [self.screener.backend_name] * len(results),
            "decoder": [self.screener.decoder] * len(results),
        }
