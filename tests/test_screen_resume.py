"""Resume and exactly-once: real `cxr screen` subprocesses killed (SIGKILL, SIGINT) and rerun.

Every test drives `python -m engine.cli screen` the way a user would, interrupts it at a chosen
point, reruns the same command to completion and checks that every input image ends up exactly
once in the Parquet parts and in the usearch index, with nothing left behind (temporary files,
embedding sidecars). Inputs mix a directory and a .tar.gz, so resuming through a compressed tar
stream (skipping members already written) is covered as well.

After every SIGKILL the test takes the output lock itself (flock), and every resume is a new
`cxr screen` on the same directory: the kernel must have released the dead holder's lock.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import cxr_argv

from engine.io import parquet, vectors
from engine.io.archive import image_key

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("CXR_DATA", REPO_ROOT.parent / "shared" / "data"))
IMAGES_DIR = DATA_ROOT / "cxr-dev" / "images"

N_DIR = 60  # images copied into a directory input
N_TAR = 60  # other images packed into a .tar.gz input
N_IMAGES = N_DIR + N_TAR
BATCH_SIZE = 4
SHARD_SIZE = 8
DECODE_WORKERS = 3
N_PARTS = math.ceil(N_IMAGES / SHARD_SIZE)  # parts of one uninterrupted run

POLL_S = 0.005
WAIT_S = 90.0  # bound on any single wait; a stuck run fails the test instead of hanging it
RUN_S = 180.0


# ---------------------------------------------------------------------------------------------
# fixtures


@dataclass(frozen=True)
class Inputs:
    args: tuple[str, ...]  # command-line inputs: the .tar.gz first, then the directory
    keys: frozenset[int]  # the key of every input image


@dataclass(frozen=True)
class Result:
    probs: dict[int, float]
    index_size: int
    vectors: dict[int, np.ndarray]  # unit embeddings as stored in the index (f16)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.models import init_models

    out = tmp_path_factory.mktemp("models")
    init_models(out, size="tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    if not IMAGES_DIR.is_dir():
        pytest.skip(f"real chest X-rays not found under {IMAGES_DIR} (set CXR_DATA)")
    names = sorted(
        p.name for p in IMAGES_DIR.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"}
    )
    if len(names) < N_IMAGES:
        pytest.skip(f"need {N_IMAGES} images under {IMAGES_DIR}, found {len(names)}")
    root = tmp_path_factory.mktemp("inputs")
    tree = root / "tree"
    tar_path = root / "archive.tar.gz"
    keys: set[int] = set()
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in names[:N_TAR]:
            member = f"xrays/{name}"
            tar.add(IMAGES_DIR / name, arcname=member)
            keys.add(image_key(os.path.abspath(tar_path), member))
    for i, name in enumerate(names[N_TAR:N_IMAGES]):
        dest = tree / f"sub{i % 3}" / name  # a few subdirectories: depth-first walk
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((IMAGES_DIR / name).read_bytes())
        keys.add(image_key(os.path.abspath(dest), None))
    assert len(keys) == N_IMAGES
    return Inputs(args=(str(tar_path), str(tree)), keys=frozenset(keys))


@pytest.fixture(scope="module")
def clean_run(
    tmp_path_factory: pytest.TempPathFactory, inputs: Inputs, models_dir: Path
) -> tuple[Path, Result]:
    """One uninterrupted run: the reference every killed-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("clean") / "out"
    proc = run_to_end(inputs, out, models_dir)
    assert proc.returncode == 0, describe(proc)
    assert len(parquet.list_parts(out)) == N_PARTS
    return out, assert_exactly_once(out, inputs)


# ---------------------------------------------------------------------------------------------
# helpers


def screen_cmd(inputs: Inputs, out: Path, models: Path) -> list[str]:
    return cxr_argv(
        "screen",
        *inputs.args,
        "--out",
        out,
        "--models",
        models,
        "--batch-size",
        BATCH_SIZE,
        "--shard-size",
        SHARD_SIZE,
        # more decode workers than cores: kills land with several images read ahead and in flight
        "--decode-workers",
        DECODE_WORKERS,
        "--no-progress",
    )


def start(inputs: Inputs, out: Path, models: Path) -> subprocess.Popen[str]:
    """Start a run in the background; its output goes to files (a full pipe would block it)."""
    logs = out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    paths = (logs / f"{n:02d}.out", logs / f"{n:02d}.err")
    with open(paths[0], "w") as stdout, open(paths[1], "w") as stderr:
        proc = subprocess.Popen(
            screen_cmd(inputs, out, models), cwd=REPO_ROOT, stdout=stdout, stderr=stderr, text=True
        )
    proc.log_paths = paths  # type: ignore[attr-defined]
    return proc


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def finish(proc: subprocess.Popen[str], timeout: float = RUN_S) -> Finished:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"cxr screen (pid {proc.pid}) still running after {timeout:.0f} s")
    out_path, err_path = proc.log_paths  # type: ignore[attr-defined]
    return Finished(proc.returncode, out_path.read_text(), err_path.read_text())


def describe(proc: Finished) -> str:
    return f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def run_to_end(inputs: Inputs, out: Path, models: Path) -> Finished:
    return finish(start(inputs, out, models))


def wait_until(
    proc: subprocess.Popen[str], cond: Callable[[], bool], what: str, *, poll: float = POLL_S
) -> None:
    """Poll cond() until true; fail clearly if the run ends first or it takes too long."""
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"cxr screen exited with {proc.returncode} before: {what}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out after {WAIT_S:.0f} s waiting for: {what}")
        if poll:
            time.sleep(poll)


def start_until(
    inputs: Inputs, out: Path, models: Path, cond: Callable[[], bool], what: str, *, poll=POLL_S
) -> subprocess.Popen[str]:
    """Start a run and wait until cond() is true (see wait_until)."""
    proc = start(inputs, out, models)
    wait_until(proc, cond, what, poll=poll)
    return proc


def kill_when(
    inputs: Inputs, out: Path, models: Path, cond: Callable[[], bool], what: str, *, poll=POLL_S
) -> None:
    """Start a run and SIGKILL it as soon as cond() is true (see kill9)."""
    kill9(start_until(inputs, out, models, cond, what, poll=poll), out)


def kill9(proc: subprocess.Popen[str], out: Path) -> None:
    """SIGKILL a run that must still be alive, then check the kernel released its lock."""
    os.kill(proc.pid, signal.SIGKILL)
    result = finish(proc, timeout=30)
    assert result.returncode == -signal.SIGKILL, f"the kill missed: {describe(result)}"
    assert_lock_free(out)


def assert_lock_free(out: Path) -> None:
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def n_parts(out: Path) -> int:
    return len(parquet.list_parts(out))


def sidecars(out: Path) -> list[str]:
    """Sidecars not yet merged into the index (merged ones are kept in embeddings/indexed/)."""
    d = out / vectors.EMBEDDINGS
    return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def lock_held_by(out: Path, pid: int) -> bool:
    try:
        return (out / ".lock").read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def temporaries(out: Path) -> list[str]:
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.name.startswith(".") and ".tmp" in p.name
    )


def assert_exactly_once(out: Path, inputs: Inputs) -> Result:
    """The state a complete run must leave: every image once in Parquet and once in the index."""
    df = parquet.read_predictions(out)
    keys = df["key"].to_list()
    assert len(keys) == len(inputs.keys), f"{len(keys)} rows for {len(inputs.keys)} images"
    assert df["key"].n_unique() == len(keys), "duplicate keys in the Parquet parts"
    assert set(keys) == inputs.keys, "rows do not match the input images"
    errors = df.filter(df["status"] != "ok")
    assert errors.height == 0, f"unexpected error rows: {errors['error'].to_list()[:5]}"
    assert df["prob"].is_not_null().all()

    index = vectors.load_index(out)
    assert index is not None, "no index.usearch after a complete run"
    index_keys = np.asarray(index.keys, dtype=np.uint64)
    assert len(index) == len(keys) == len(index_keys)
    assert len(set(index_keys.tolist())) == len(index_keys), "duplicate keys in the index"
    assert set(index_keys.tolist()) == set(keys), "index keys differ from Parquet keys"

    assert temporaries(out) == [], "temporary files left behind"
    assert sidecars(out) == [], "embedding sidecars left after a complete run"
    record = run_json(out)
    assert record["status"] == "complete"
    assert record["counts"]["total_rows"] == len(keys)
    assert record["counts"]["index_size"] == len(keys)

    ordered = sorted(keys)
    vecs = np.asarray(index.get(np.array(ordered, np.uint64)), dtype=np.float32)
    probs = dict(zip(df["key"].to_list(), df["prob"].to_list(), strict=True))
    return Result(probs=probs, index_size=len(index), vectors=dict(zip(ordered, vecs, strict=True)))


def assert_same_as_clean(result: Result, clean: Result) -> None:
    assert result.index_size == clean.index_size
    assert result.probs.keys() == clean.probs.keys()
    worst = max(abs(result.probs[k] - clean.probs[k]) for k in clean.probs)
    assert worst <= 1e-6, f"probabilities differ from the clean run by up to {worst}"
    a = np.stack([result.vectors[k] for k in sorted(clean.vectors)])
    b = np.stack([clean.vectors[k] for k in sorted(clean.vectors)])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.999, f"index vectors differ from the clean run (min cosine {cos.min()})"


def resume_to_end(out: Path, inputs: Inputs, models: Path) -> Result:
    """Rerun the same command; it must skip what is committed and add exactly the rest."""
    already = len(parquet.existing_keys(out)) if out.exists() else 0
    proc = run_to_end(inputs, out, models)
    assert proc.returncode == 0, describe(proc)
    counts = run_json(out)["counts"]
    assert counts["skipped_existing"] == already
    assert counts["processed"] == N_IMAGES - already
    return assert_exactly_once(out, inputs)


# ---------------------------------------------------------------------------------------------
# tests


def test_clean_run_then_rerun_adds_nothing(
    clean_run: tuple[Path, Result], inputs: Inputs, models_dir: Path
) -> None:
    out, clean = clean_run
    assert clean.index_size == N_IMAGES
    parts_before = [p.name for _, p in parquet.list_parts(out)]
    proc = run_to_end(inputs, out, models_dir)
    assert proc.returncode == 0, describe(proc)
    counts = run_json(out)["counts"]
    assert counts["processed"] == 0
    assert counts["skipped_existing"] == N_IMAGES
    assert [p.name for _, p in parquet.list_parts(out)] == parts_before
    assert_same_as_clean(assert_exactly_once(out, inputs), clean)


def test_killed_before_any_part_and_at_first_sidecar(
    tmp_path: Path, clean_run: tuple[Path, Result], inputs: Inputs, models_dir: Path
) -> None:
    out = tmp_path / "out"
    # 1. during start-up: the lock is taken, run.json says "running", no row is finished yet
    kill_when(inputs, out, models_dir, lambda: (out / "run.json").exists(), "run.json written")
    assert n_parts(out) == 0
    assert run_json(out)["status"] == "running"

    # 2. the moment the first embeddings sidecar appears: written, its part not yet committed
    # (spin without sleeping: the part follows within milliseconds)
    kill_when(inputs, out, models_dir, lambda: bool(sidecars(out)), "first sidecar", poll=0)
    assert n_parts(out) <= 1

    assert_same_as_clean(resume_to_end(out, inputs, models_dir), clean_run[1])


def test_killed_twice_mid_run(
    tmp_path: Path, clean_run: tuple[Path, Result], inputs: Inputs, models_dir: Path
) -> None:
    out = tmp_path / "out"
    kill_when(inputs, out, models_dir, lambda: n_parts(out) >= 3, "3 parts committed")
    first = n_parts(out)
    assert 3 <= first < N_PARTS
    # the rerun is killed too, once it has added two parts of its own
    kill_when(
        inputs, out, models_dir, lambda: n_parts(out) >= first + 2, f"{first + 2} parts committed"
    )
    assert first + 2 <= n_parts(out)
    rows = parquet.read_predictions(out, ["key"])["key"]
    assert rows.n_unique() == rows.len() < N_IMAGES

    assert_same_as_clean(resume_to_end(out, inputs, models_dir), clean_run[1])


def test_killed_during_final_index_sync(
    tmp_path: Path, clean_run: tuple[Path, Result], inputs: Inputs, models_dir: Path
) -> None:
    out = tmp_path / "out"
    proc = start_until(
        inputs, out, models_dir, lambda: n_parts(out) >= N_PARTS - 1, "the last parts"
    )

    # on a fresh --out the index is first saved by the final sync: spin until its temporary
    # (or, if that was too quick to see, the index itself) appears, and kill right then
    def index_being_written() -> bool:
        return any(
            n == vectors.INDEX or n.startswith(f".{vectors.INDEX}.tmp") for n in os.listdir(out)
        )

    wait_until(proc, index_being_written, "the final index sync", poll=0)
    kill9(proc, out)
    assert n_parts(out) == N_PARTS
    assert run_json(out)["status"] == "running", "the kill came after the run had finished"
    # (on an idle machine the kill lands inside sync_index: its temporary is still there, or
    # the sidecars it deletes last are.) A kill inside write_run_json leaves this; that window
    # is too brief to hit reliably, so plant one: the rerun must clear it too
    (out / ".run.json.tmp-999999").write_text("{")

    assert_same_as_clean(resume_to_end(out, inputs, models_dir), clean_run[1])


def test_killed_at_random_moments(
    tmp_path: Path, clean_run: tuple[Path, Result], inputs: Inputs, models_dir: Path
) -> None:
    out = tmp_path / "out"
    rng = random.Random(20240611)
    for _ in range(2):
        proc = start(inputs, out, models_dir)
        # start-up takes a few seconds: let each victim live until its lock is taken, then a
        # random while longer, so the kills land anywhere from model loading to mid-run
        wait_until(proc, lambda p=proc: lock_held_by(out, p.pid), "the output lock")
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:  # a fast machine may finish first: fine, nothing to kill
            result = finish(proc)
            assert result.returncode == 0, describe(result)
            break
        kill9(proc, out)
        keys = parquet.read_predictions(out, ["key"])["key"]
        assert keys.n_unique() == keys.len()
    assert_same_as_clean(resume_to_end(out, inputs, models_dir), clean_run[1])


def test_second_concurrent_run_is_refused(
    tmp_path: Path, clean_run: tuple[Path, Result], inputs: Inputs, models_dir: Path
) -> None:
    out = tmp_path / "out"
    first = start_until(
        inputs, out, models_dir, lambda: n_parts(out) >= 1, "first part of the first run"
    )
    # pause the first run mid-way so it surely still holds the directory while the second one
    # starts up (a second's start-up would otherwise race the first run's end)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(
            screen_cmd(inputs, out, models_dir),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=RUN_S,
        )
    finally:
        os.kill(first.pid, signal.SIGCONT)
    result = finish(first)  # before asserting on the second: never leave the first running
    refused = Finished(second.returncode, second.stdout, second.stderr)
    assert refused.returncode == 1, describe(refused)
    message = " ".join(refused.stderr.split())
    assert "another cxr screen" in message
    assert f"pid {first.pid}" in message
    assert str(out) in message

    assert result.returncode == 0, describe(result)
    assert run_json(out)["history"] == []  # the refused run left no trace
    assert_same_as_clean(assert_exactly_once(out, inputs), clean_run[1])


def test_ctrl_c_keeps_finished_rows_and_resumes(
    tmp_path: Path, clean_run: tuple[Path, Result], inputs: Inputs, models_dir: Path
) -> None:
    out = tmp_path / "out"
    proc = start_until(inputs, out, models_dir, lambda: n_parts(out) >= 2, "2 parts committed")
    committed = parquet.existing_keys(out)
    os.kill(proc.pid, signal.SIGINT)
    result = finish(proc)
    assert result.returncode == 130, describe(result)
    assert "interrupted" in result.stdout + result.stderr

    df = parquet.read_predictions(out)
    kept = df["key"].to_list()
    assert committed <= set(kept), "rows committed before Ctrl-C were lost"
    assert len(set(kept)) == len(kept) < N_IMAGES
    assert set(kept) <= inputs.keys
    # the interrupted run still merged what it wrote into the index and said so
    index = vectors.load_index(out)
    assert index is not None
    assert set(np.asarray(index.keys).tolist()) == set(kept)
    assert sidecars(out) == []
    assert temporaries(out) == []
    record = run_json(out)
    assert record["status"] == "interrupted"
    assert record["counts"]["total_rows"] == len(kept)
    assert record["counts"]["processed"] == len(kept)  # every row it finished was written

    assert_same_as_clean(resume_to_end(out, inputs, models_dir), clean_run[1])
