"""engine.distributed.worker, without a Ray cluster: the model files a driver ships, their
content-keyed cache on a worker (loads with the sha256 check, shared by actors), WorkerSpec
through pickle, and ShardActor on a stand-in `ray` module: its refusals (files it cannot see,
models of another id) and one shard screened into its part."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from PIL import Image

from engine.config import ScreenConfig
from engine.distributed import worker
from engine.distributed.worker import (
    MODEL_CACHE_ENV,
    ShardActor,
    WorkerSpec,
    materialise_models,
    model_files,
)
from engine.errors import EngineError, ModelError
from engine.io import parquet
from engine.io.outdir import write_run_json
from engine.io.shards import list_entries, plan_shards
from engine.models import load_models


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------
# the model files


def test_model_files_are_the_manifests_and_onnx_files(tiny_models):
    files = model_files(tiny_models)
    seg, clf = tiny_models.segmenter, tiny_models.classifier
    assert sorted(files) == sorted(["segmenter.json", "classifier.json", seg.onnx, clf.onnx])
    assert files[clf.onnx] == clf.onnx_path.read_bytes()
    assert json.loads(files["classifier.json"])["role"] == "classifier"


def test_model_files_include_plans_but_not_subfolders(tiny_models_dir, tmp_path):
    models = shutil.copytree(tiny_models_dir, tmp_path / "models")
    (models / "plans" / "old").mkdir(parents=True)
    (models / "plans" / "classifier.fp16.plan").write_bytes(b"plan bytes")
    files = model_files(load_models(models))
    assert files["plans/classifier.fp16.plan"] == b"plan bytes"
    assert not any("old" in name for name in files)


def test_materialised_models_load_as_the_same_models(tiny_models, cache):
    files = model_files(tiny_models)
    directory = materialise_models(files)
    assert directory.parent == cache and len(directory.name) == 24
    assert load_models(directory).model_id == tiny_models.model_id  # sha256s checked
    assert materialise_models(dict(reversed(files.items()))) == directory  # order: same key
    assert sorted(p.name for p in cache.iterdir()) == [directory.name]  # no temporary left


def test_the_cache_key_is_the_content(cache):
    a = materialise_models({"x.json": b"1", "plans/p.plan": b"2"})
    assert (a / "plans" / "p.plan").read_bytes() == b"2"
    assert materialise_models({"x.json": b"1", "plans/p.plan": b"3"}) != a
    assert materialise_models({"y.json": b"1", "plans/p.plan": b"2"}) != a  # names count too


def test_an_existing_copy_is_used_as_it_is(cache):
    first = materialise_models({"a": b"1"})
    (first / "a").write_bytes(b"kept")  # not rewritten: the content named it already
    assert materialise_models({"a": b"1"}) == first and (first / "a").read_bytes() == b"kept"


def test_an_actor_that_loses_the_race_uses_the_winner_s_copy(cache, monkeypatch):
    def rename(src, dst):
        os.makedirs(dst)  # another actor on this machine renamed its copy first
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(worker.os, "rename", rename)
    final = materialise_models({"a": b"1"})
    assert final.is_dir()
    assert [p.name for p in cache.iterdir()] == [final.name]  # this actor's copy removed


def test_default_cache_is_per_user_under_the_temp_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(MODEL_CACHE_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    final = materialise_models({"a": b"1"})
    assert final.parent == tmp_path / f"cxr-models-{os.getuid()}"


def test_config_round_trip_for_workers(tiny_models_dir, tmp_path):
    """What the actors receive pickles and keeps its meaning."""
    cfg = ScreenConfig(
        inputs=(Path("/x"),), out=tmp_path, models=tiny_models_dir, threads=1, ray="auto"
    )
    spec = WorkerSpec(config=replace(cfg, threads=2), model_id="m", run_id="r", inputs=["/x"])
    assert pickle.loads(pickle.dumps(spec)) == spec


# ---------------------------------------------------------------------------------------------
# the actor, on a stand-in ray module


@pytest.fixture
def fake_ray(monkeypatch):
    """`ray.get` hands back what it is given; the node id is fixed."""
    ray = SimpleNamespace(
        get=lambda ref: ref,
        get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "node-7"),
    )
    monkeypatch.setitem(sys.modules, "ray", ray)
    return ray


def png(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8), "L").save(path)
    return str(path)


@pytest.fixture
def run(tmp_path, tiny_models, cache):
    """A run directory whose run.json is run r1's, three images (one broken) as one shard."""
    images = tmp_path / "in"
    images.mkdir()
    paths = [png(images / f"{i}.png", i) for i in range(2)]
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    out.mkdir()
    write_run_json(out, {"run_id": "r1"})
    config = ScreenConfig(
        inputs=(images,), out=out, models=tiny_models.classifier.directory, threads=1,
        batch_size=2, decoder="pillow", progress=False,
    )  # fmt: skip
    spec = WorkerSpec(
        config=config, model_id=tiny_models.model_id, run_id="r1", inputs=[str(images)]
    )
    shard = plan_shards(list_entries([*paths, str(images / "broken.png")]), 10, first_number=3)[0]
    return spec, [model_files(tiny_models)], shard


def test_an_actor_screens_a_shard_into_its_part(run, fake_ray):
    spec, files, shard = run
    actor = ShardActor(spec, files)
    assert actor.node_id == "node-7" and actor.screener.backend_name == "onnxruntime"
    result = actor({"number": np.array([shard.number]), "entries": np.array([shard.to_json()])})
    assert result["number"] == [3] and result["rows"] == [3]
    assert result["ok"] == [2] and result["errors"] == [1]
    assert result["already_committed"] == [False]
    (samples,) = result["error_samples"]
    assert "broken.png" in json.loads(samples)[0]
    assert set(json.loads(result["stage_s"][0])) and json.loads(result["latencies_s"][0])
    assert result["backend"] == ["onnxruntime"] and result["decoder"] == ["pillow"]
    assert result["node_id"] == ["node-7"] and len(result["host"]) == 1
    part = pl.read_parquet(parquet.part_path(spec.config.out, 3))
    assert part["key"].to_list() == [e.key for e in shard.entries]
    assert set(part["run_id"]) == {"r1"}
    again = actor({"number": np.array([3]), "entries": np.array([shard.to_json()])})
    assert again["already_committed"] == [True] and again["rows"] == [3]


def test_an_actor_that_cannot_see_the_run_refuses_at_once(run, fake_ray, tmp_path):
    spec, files, _ = run
    write_run_json(spec.config.out, {"run_id": "another"})
    lost = replace(spec, inputs=[*spec.inputs, str(tmp_path / "gone.tar")])
    with pytest.raises(EngineError, match="cannot see the run's files") as err:
        ShardActor(lost, files)
    assert "run another's, not this run's (r1)" in str(err.value)
    assert "gone.tar: no such file or directory" in str(err.value)


def test_an_actor_refuses_models_of_another_id(run, fake_ray):
    spec, files, _ = run
    with pytest.raises(ModelError, match=r"the shipped models load as .*, the driver has m-other"):
        ShardActor(replace(spec, model_id="m-other"), files)


def test_a_fenced_out_actor_commits_nothing(run, fake_ray):
    from engine.distributed.shard import StaleRun

    spec, files, shard = run
    actor = ShardActor(spec, files)
    write_run_json(spec.config.out, {"run_id": "newer"})
    with pytest.raises(StaleRun, match="newer"):
        actor({"number": np.array([3]), "entries": np.array([shard.to_json()])})
    assert parquet.list_parts(spec.config.out) == []
