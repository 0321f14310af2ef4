"""engine.distributed.executor without Ray: how actors are sized, which part numbers a run takes,
Ray's wrapped errors unwrapped, the --ray options, and that Ray stays an optional extra (the
runs on a local Ray cluster are in test_distributed.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, dev_images, run_cli
from test_shard import shard_config

from engine.config import ScreenConfig
from engine.distributed.executor import (
    NodeInfo,
    _first_part_number,
    _unwrap,
    plan_actors,
)
from engine.distributed.shard import StaleRun
from engine.errors import ConfigError, EngineError, ModelError
from engine.io import parquet


def node(cpus: float, gpus: float = 0.0, name: str = "n") -> NodeInfo:
    return NodeInfo(node_id=name, host=name, address=name, cpus=cpus, gpus=gpus)


def test_actor_plan(tmp_path):
    cfg = shard_config(tmp_path, tmp_path)
    plan = plan_actors([node(4), node(4), node(2)], cfg)
    assert (plan.kind, plan.count, plan.cpus, plan.gpus) == ("cpu", 5, 2, 0)
    plan = plan_actors([node(4), node(8)], ScreenConfig(**{**vars(cfg), "ray_actor_cpus": 4}))
    assert (plan.count, plan.cpus) == (3, 4)
    plan = plan_actors([node(16, 2), node(8)], cfg)  # GPUs: one actor each, CPUs shared out
    assert (plan.kind, plan.count, plan.cpus, plan.gpus) == ("gpu", 2, 8, 1)
    plan = plan_actors([node(16, 2)], ScreenConfig(**{**vars(cfg), "backend": "onnxruntime"}))
    assert plan.kind == "cpu"
    with pytest.raises(ConfigError, match="no node of the cluster has that many CPUs"):
        plan_actors([node(2)], ScreenConfig(**{**vars(cfg), "ray_actor_cpus": 3}))
    with pytest.raises(ConfigError):
        plan_actors([node(0)], cfg)


def test_part_numbers_follow_what_a_killed_run_planned(tmp_path):
    assert _first_part_number(tmp_path, None) == 0
    parquet.write_part(tmp_path, 3, parquet.rows_frame([{"key": 1, "status": "ok"}]))
    assert _first_part_number(tmp_path, None) == 4
    assert _first_part_number(tmp_path, {"cluster": {"parts": {"first": 0, "end": 9}}}) == 9
    assert _first_part_number(tmp_path, {"cluster": {"parts": {"first": 0, "end": 2}}}) == 4


def test_unwrap_finds_our_error_in_rays_wrappers():
    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("ray: task failed\nTraceback ...")
            self.cause = cause

    found = _unwrap(Wrapper(StaleRun("out is now written by run b")))
    assert type(found) is StaleRun and str(found) == "out is now written by run b"
    died = RuntimeError(
        "The actor died because of an error raised in its creation task\n  File x\n"
        "engine.errors.ModelError: node b: the shipped models load as m1, the driver has m2"
    )
    found = _unwrap(died)
    assert type(found) is ModelError and str(found).startswith("node b: the shipped models")
    mixed = StaleRun("out is now written by run b\nFailed to apply UDF transform after 1/1")
    assert str(_unwrap(mixed)) == "out is now written by run b"
    other = _unwrap(RuntimeError("line 1\nthe actor died"))
    assert isinstance(other, EngineError) and "the actor died" in str(other)


def test_ray_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--ray needs a value"):
        shard_config(tmp_path, tmp_path, ray=" ")
    with pytest.raises(ConfigError, match="--ray-actor-cpus"):
        shard_config(tmp_path, tmp_path, ray_actor_cpus=-1)


def test_without_ray_installed_ray_runs_say_how_to_get_it(monkeypatch, tmp_path, tiny_models_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    image = dev_images(1)[0]
    code, _, stderr = run_cli(
        ["screen", image, "--out", tmp_path / "o", "--models", tiny_models_dir, "--ray", "local"]
    )
    assert code == 1
    assert "pip install 'cxr-engine[ray]'" in " ".join(stderr.split())


def test_a_local_screen_never_imports_ray(tmp_path, tiny_models_dir):
    image = dev_images(1)[0]
    code = (
        "import sys\n"
        "from engine.cli import main\n"
        f"sys.argv = ['cxr', 'screen', {str(image)!r}, '--out', {str(tmp_path / 'o')!r},"
        f" '--models', {str(tiny_models_dir)!r}, '--no-progress']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n"
        "assert 'engine.distributed.executor' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "o" / "run.json").read_text())["config"]["ray"] is None
