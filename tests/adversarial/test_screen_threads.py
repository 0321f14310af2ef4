"""`--threads 10000`: a thread count far above the cores spawned thousands of threads.

Refused above MAX_THREADS_PER_CORE per usable core, with a message giving the bound, before
any thread is started; a count recorded by a run on a bigger machine is capped on reuse.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import dev_images, plain, run_cli

from engine.config import MAX_THREADS_PER_CORE, ScreenConfig, default_threads, max_threads
from engine.errors import ConfigError


def test_screen_config_refuses_threads_above_the_cap():
    """issue 16 #7: the bound holds in the library, not only on the command line."""
    cap = max_threads()
    assert cap == MAX_THREADS_PER_CORE * default_threads()
    assert ScreenConfig(inputs=(Path("x"),), out=Path("o"), threads=cap).threads == cap
    for threads in (cap + 1, 10_000):
        with pytest.raises(ConfigError, match=rf"--threads must be between 1 and {cap}.*{threads}"):
            ScreenConfig(inputs=(Path("x"),), out=Path("o"), threads=threads)


def test_screen_refuses_10000_threads_before_starting_any(tmp_path, tiny_models_dir, monkeypatch):
    """issue 16 #7: `cxr screen --threads 10000` exits 1 with the bound; nothing is written."""
    import engine.runner as runner

    def no_screener(*args, **kwargs):
        raise AssertionError("the models were loaded with an unchecked thread count")

    monkeypatch.setattr(runner, "Screener", no_screener)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    code, stdout, stderr = run_cli(
        ["screen", inp, "--out", out, "--models", tiny_models_dir, "--threads", "10000"]
    )
    assert code == 1
    message = plain(stderr)
    assert "--threads" in message and str(max_threads()) in message and "10000" in message
    assert not out.exists()


def test_train_refuses_10000_threads(tmp_path):
    """issue 16 #7: the training commands take --threads too."""
    pytest.importorskip("torch")
    code, stdout, stderr = run_cli(
        ["train", "segmenter", "--masks", tmp_path, "--out", tmp_path / "m", "--threads", "10000"]
    )
    assert code == 1 and "--threads" in plain(stderr)
    assert not (tmp_path / "m").exists()


def test_similar_caps_a_recorded_thread_count(tmp_path, tiny_models_dir, monkeypatch):
    """issue 16 #7: `cxr similar IMAGE` reuses the run's --threads; a run.json from a machine
    with more cores (or edited) must not make it start thousands of threads."""
    import engine.screener as screener_module

    image = dev_images(1)[0]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shutil.copyfile(image, inp / image.name)
    assert run_cli(["screen", inp, "--out", out, "--models", tiny_models_dir])[0] == 0
    run = json.loads((out / "run.json").read_text())
    run["config"]["threads"] = 10_000
    (out / "run.json").write_text(json.dumps(run))

    real, seen = screener_module.Screener, []

    def screener(*args, threads, **kwargs):
        seen.append(threads)
        if threads > max_threads():
            raise AssertionError(f"{threads} threads")
        return real(*args, threads=threads, **kwargs)

    monkeypatch.setattr(screener_module, "Screener", screener)
    code, stdout, stderr = run_cli(["similar", inp / image.name, "--out", out, "--json"])
    assert code == 0, stdout + stderr
    assert seen == [max_threads()]
