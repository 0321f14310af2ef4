"""benchmarks/bench_startup.py: one line per configuration with its ratio to the baseline and
the machine it ran on; the configurations differ only in the optimised-graph cache."""

from __future__ import annotations

import json

from conftest import REPO, benchmarks_importable

benchmarks_importable()
from benchmarks import bench_startup  # noqa: E402


def test_bench_startup_writes_a_line_per_configuration(tiny_models_dir, tmp_path):
    results = tmp_path / "startup.jsonl"
    argv = ["--images", str(REPO / "examples"), "--models", str(tiny_models_dir)]
    assert bench_startup.main([*argv, "--repeats", "1", "--results", str(results)]) == 0
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["config"] for r in lines] == list(bench_startup.CONFIGS)
    assert len({r["run_id"] for r in lines}) == 1
    by = {r["config"]: r for r in lines}
    assert by["baseline"]["x_baseline"] == 1.0
    assert all(r["seconds_median"] > 0 and len(r["seconds"]) == 1 for r in lines)
    assert "cpu_flags" in by["ort-cache"]["machine"]  # the CPU it ran on, with its flags


def test_startup_configurations_differ_only_in_the_cache(tmp_path):
    cache = tmp_path / "c"
    assert bench_startup._env("baseline", cache)["CXR_CACHE_DIR"] == "off"
    assert bench_startup._env("ort-cache", cache)["CXR_CACHE_DIR"] == str(cache)
    screen = bench_startup._command("ort-cache", REPO / "examples", tmp_path, None)
    assert screen[1:4] == ["-m", "engine.cli", "screen"]
