"""Nothing is written outside --out and the models folder: ONNX Runtime's telemetry kept a
device id and an event database under ~/.cache/Microsoft/DeveloperTools/.onnxruntime/.

The run goes in a child process whose HOME, XDG directories and TMPDIR are empty folders of
the test, so anything written there is seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import REPO, cxr_argv, dev_images


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_screen_and_similar_write_nothing_under_home_or_tmp(tmp_path, tiny_models_dir):
    """issue 16 (smaller): ONNX Runtime wrote a telemetry cache under ~/.cache."""
    home, tmp, inp, out = (tmp_path / n for n in ("home", "tmp", "in", "out"))
    for d in (home, tmp, inp):
        d.mkdir()
    for src in dev_images(2):
        shutil.copyfile(src, inp / src.name)
    env = {
        k: v
        for k, v in os.environ.items()
        # the engine sets ORT_DISABLE_TELEMETRY in this (test) process: the child must not
        # inherit it, or the check would pass without the engine doing anything
        if k not in ("ORT_DISABLE_TELEMETRY", "CXR_CACHE_DIR") and not k.startswith("XDG_")
    }
    env.update(HOME=str(home), TMPDIR=str(tmp), NO_COLOR="1", TERM="dumb")

    def cxr(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cxr_argv(*args),
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=REPO,
        )

    proc = cxr("screen", inp, "--out", out, "--models", tiny_models_dir, "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = cxr("similar", inp / sorted(os.listdir(inp))[0], "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert _files(home) == []
    assert _files(tmp) == []
