"""A full disk (or a spent quota, a read-only filesystem, a file-size limit) under `cxr screen`.

Whichever file fails to be written (a Parquet part, previews, an embedding sidecar, the index,
run.json), the run stops with one clear message and exit code 1, no traceback and no temporary
file left, and rerunning the same command once there is room completes the run.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, cxr_argv, dev_images, plain, run_cli

from engine.io import parquet, vectors

N_IMAGES = 6
SHARD = 2


def _inputs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for src in dev_images(N_IMAGES):
        shutil.copyfile(src, root / src.name)
    return root


def _args(inp: Path, out: Path, models: Path) -> list[str | Path]:
    return ["screen", inp, "--out", out, "--models", models, "--shard-size", str(SHARD)]


def _temporaries(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name]


def _uncommitted(out: Path) -> list[str]:
    """Sidecars and previews whose Parquet part was never committed."""
    committed = {f"part-{n:05d}" for n, _ in parquet.list_parts(out)}
    found = []
    for d in (out / vectors.EMBEDDINGS, out / "thumbs"):
        if d.is_dir():
            found += [p.name for p in d.glob("part-*") if p.name.split(".")[0] not in committed]
    return found


def _assert_one_clear_message(code: int, stdout: str, stderr: str, words: tuple[str, ...]) -> None:
    assert code == 1, stdout + stderr
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    message = plain(stderr)
    assert message.count("error:") == 1 and len(lines) <= 4, stderr
    for word in words:
        assert word in message, message
    assert "rerun" in message


def _assert_complete(out: Path) -> None:
    df = parquet.read_predictions(out)
    assert df.height == N_IMAGES and df["key"].n_unique() == N_IMAGES
    assert (df["status"] == "ok").all()
    assert len(vectors.load_index(out)) == N_IMAGES
    assert _temporaries(out) == [] and _uncommitted(out) == []


def _fail_writes_to(monkeypatch, out: Path, pattern: str, code: int) -> None:
    """os.write raises OSError(code) for the run's temporary files whose path holds `pattern`,
    as a full disk would for every new block; everything else is written as usual."""
    real_write = os.write

    def write(fd: int, data) -> int:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path.startswith(str(out)) and ".tmp" in path and pattern in path:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.fixture
def run_dirs(tmp_path: Path) -> tuple[Path, Path]:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    return _inputs(tmp_path / "in"), tmp_path / "out"


@pytest.mark.parametrize(
    ("pattern", "code"),
    [
        ("embeddings", errno.ENOSPC),
        ("thumbs", errno.ENOSPC),
        ("predictions", errno.ENOSPC),
        ("predictions", errno.EDQUOT),
        ("predictions", errno.EROFS),
        ("run.json", errno.ENOSPC),
    ],
    ids=["sidecar", "thumbs", "part", "part-quota", "part-readonly", "run-json"],
)
def test_a_full_disk_at_any_writer_is_one_message_and_the_rerun_completes(
    run_dirs, tiny_models_dir, monkeypatch, pattern, code
):
    """issue 16 #6: disk full printed four chained tracebacks and left .tmp files."""
    inp, out = run_dirs
    with monkeypatch.context() as m:
        _fail_writes_to(m, out, pattern, code)
        got = run_cli(_args(inp, out, tiny_models_dir))
    _assert_one_clear_message(*got, (os.strerror(code),))
    assert _temporaries(out) == [] and _uncommitted(out) == []

    code_, stdout, stderr = run_cli(_args(inp, out, tiny_models_dir))
    assert code_ == 0, stdout + stderr
    _assert_complete(out)


def test_no_room_for_the_index_is_one_message_and_the_rerun_completes(
    run_dirs, tiny_models_dir, monkeypatch
):
    """issue 16 #6: the index is written by usearch (no errno in its errors): too little
    free space is found before writing it, and named."""
    inp, out = run_dirs
    real_statvfs = os.statvfs

    def statvfs(path):
        st = real_statvfs(path)
        if not str(path).startswith(str(out)):
            return st
        fields = list(st)
        fields[3] = fields[4] = 0  # f_bfree, f_bavail
        return os.statvfs_result(fields)

    with monkeypatch.context() as m:
        m.setattr(os, "statvfs", statvfs)
        got = run_cli(_args(inp, out, tiny_models_dir))
    _assert_one_clear_message(*got, ("index.usearch", os.strerror(errno.ENOSPC)))
    assert _temporaries(out) == []
    assert len(parquet.read_predictions(out)) == N_IMAGES  # every row was committed
    assert not vectors.index_path(out).exists()

    code, stdout, stderr = run_cli(_args(inp, out, tiny_models_dir))
    assert code == 0, stdout + stderr
    _assert_complete(out)


def test_the_index_writer_failing_is_one_message(run_dirs, tiny_models_dir, monkeypatch):
    """issue 16 #6: usearch failing half way through the index (its error has no errno) still
    gives one message and leaves no temporary index."""
    from usearch.index import Index

    inp, out = run_dirs

    def save(self, path_or_buffer=None, progress=None):
        Path(path_or_buffer).write_bytes(b"\0" * 100)  # half written, then the device fails
        raise RuntimeError("Failed to serialize into stream")

    with monkeypatch.context() as m:
        m.setattr(Index, "save", save)
        got = run_cli(_args(inp, out, tiny_models_dir))
    _assert_one_clear_message(*got, ("index.usearch", "Failed to serialize into stream"))
    assert _temporaries(out) == []

    code, stdout, stderr = run_cli(_args(inp, out, tiny_models_dir))
    assert code == 0, stdout + stderr
    _assert_complete(out)


def _limit_file_size(limit: int):
    def apply() -> None:
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_real_write_failures_in_a_child_process(run_dirs, tiny_models_dir):
    """issue 16 #6: nothing simulated in Python: the kernel refuses every write past 16 KB per
    file (RLIMIT_FSIZE, EFBIG), the way a nearly full disk refuses the first large file."""
    inp, out = run_dirs
    # this checkout's engine (an installed `cxr` script may import another one)
    cmd = cxr_argv(*_args(inp, out, tiny_models_dir))
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    run = {"capture_output": True, "text": True, "timeout": 300, "env": env, "cwd": REPO}
    proc = subprocess.run([*cmd, "--no-progress"], preexec_fn=_limit_file_size(16 * 1024), **run)
    _assert_one_clear_message(proc.returncode, proc.stdout, proc.stderr, ("too large",))
    assert _temporaries(out) == [] and _uncommitted(out) == []

    proc = subprocess.run([*cmd, "--no-progress"], **run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_complete(out)
