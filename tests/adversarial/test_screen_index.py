"""A lost or corrupt `index.usearch`: the fix the engine names must give the index back.

The index is derived data: it is rebuilt from the embedding sidecars a run keeps
(`embeddings/indexed/`), by `cxr index rebuild OUT` or by rerunning `cxr screen` after the
index was deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import dev_images, plain, run_cli

from engine.io import parquet, vectors

N_IMAGES = 5


@pytest.fixture(scope="module")
def screened(tmp_path_factory, tiny_models_dir) -> Path:
    """A complete run (two parts) to copy: one image is an empty file, so one error row."""
    root = tmp_path_factory.mktemp("index-run")
    inp = root / "in"
    inp.mkdir()
    for src in dev_images(N_IMAGES):
        shutil.copyfile(src, inp / src.name)
    (inp / "zz-empty.png").write_bytes(b"")
    out = root / "out"
    code, stdout, stderr = run_cli(
        ["screen", inp, "--out", out, "--models", tiny_models_dir, "--shard-size", "3"]
    )
    assert code == 3, stdout + stderr  # the empty file
    return out


def _copy(screened: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(screened, out)
    return out


def _ok_keys(out: Path) -> set[int]:
    df = parquet.read_predictions(out, ["key", "status"])
    return set(df.filter(df["status"] == "ok")["key"].to_list())


def _vectors(out: Path) -> dict[int, np.ndarray]:
    index = vectors.load_index(out)
    keys = sorted(int(k) for k in np.asarray(index.keys))
    got = np.asarray(index.get(np.array(keys, np.uint64)), np.float32)
    return dict(zip(keys, got, strict=True))


def _screen_args(out: Path) -> list[str]:
    run = json.loads((out / "run.json").read_text())
    cfg = run["config"]
    return [
        "screen",
        *cfg["inputs"],
        "--out",
        out,
        "--models",
        run["models"]["directory"],
        "--shard-size",
        str(cfg["shard_size"]),
    ]


def test_rerun_after_deleting_the_index_restores_it(screened, tmp_path):
    """issue 16 #2: deleting index.usearch and rerunning `cxr screen` (the old message's fix)
    must give back an index holding every screened image, not an empty one."""
    out = _copy(screened, tmp_path)
    before = _vectors(out)
    assert set(before) == _ok_keys(out) and len(before) == N_IMAGES
    vectors.index_path(out).unlink()

    code, stdout, stderr = run_cli(_screen_args(out))

    assert code == 3, stdout + stderr  # the empty file is still an error row
    text = plain(stdout)
    assert f"index size {N_IMAGES} " in text and "screened now 0 " in text
    after = _vectors(out)
    assert set(after) == set(before)
    for key, vec in before.items():
        assert np.allclose(after[key], vec, atol=1e-3)


@pytest.mark.parametrize("content", [b"", b"not an index\n" * 64], ids=["empty", "garbage"])
def test_corrupt_index_message_names_a_fix_that_works(screened, tmp_path, content):
    """issue 16 #2: the corrupt-index message names `cxr index rebuild OUT`, and that command
    gives back the whole index, which `cxr similar` then searches."""
    out = _copy(screened, tmp_path)
    before = _vectors(out)
    vectors.index_path(out).write_bytes(content)

    code, _, stderr = run_cli(_screen_args(out))
    assert code == 1
    message = plain(stderr)
    assert f"cxr index rebuild {out}" in message and "delete it" not in message
    key = next(iter(before))
    code, _, stderr = run_cli(["similar", str(key), "--out", out])
    assert code == 1 and f"cxr index rebuild {out}" in plain(stderr)

    code, stdout, stderr = run_cli(["index", "rebuild", out])

    assert code == 0, stdout + stderr
    assert f"{N_IMAGES} " in plain(stdout)
    after = _vectors(out)
    assert set(after) == set(before)
    code, stdout, stderr = run_cli(["similar", str(key), "--out", out, "--json", "-k", "2"])
    assert code == 0, stdout + stderr
    assert len(json.loads(stdout)["neighbours"]) == 2
    assert [p.name for p in out.rglob(".*tmp*")] == []


def test_rebuild_of_an_older_run_uses_embeddings_in_parquet(tmp_path, tiny_models_dir):
    """issue 16 #2: a run made before sidecars were kept has only what Parquet holds: with
    --embeddings-in-parquet the index is rebuilt from it; without, the command says what is
    missing instead of writing an empty index."""
    inp = tmp_path / "in"
    inp.mkdir()
    for src in dev_images(3):
        shutil.copyfile(src, inp / src.name)
    for name, extra in (("with", ["--embeddings-in-parquet"]), ("without", [])):
        out = tmp_path / name
        args = ["screen", inp, "--out", out, "--models", tiny_models_dir, *extra]
        assert run_cli(args)[0] == 0
        before = _vectors(out)
        shutil.rmtree(out / vectors.EMBEDDINGS)  # what an older cxr left: no sidecars
        vectors.index_path(out).unlink()
        code, stdout, stderr = run_cli(["index", "rebuild", out])
        if name == "with":
            assert code == 0, stdout + stderr
            after = _vectors(out)
            assert set(after) == set(before)
            for key, vec in before.items():
                assert np.allclose(after[key], vec, atol=1e-3)
        else:
            assert code == 1
            message = plain(stderr)
            assert "3 screened images" in message and "new --out" in message
            assert not vectors.index_path(out).exists()


def test_rebuild_refuses_a_directory_in_use_or_without_rows(screened, tmp_path):
    """issue 16 #2: the rebuild takes the output lock (a running screen writes the index) and
    names a directory that is not a screening run."""
    from engine.io.outdir import OutputLock

    out = _copy(screened, tmp_path)
    with OutputLock(out):
        code, _, stderr = run_cli(["index", "rebuild", out])
    assert code == 1 and "another" in plain(stderr)
    code, _, stderr = run_cli(["index", "rebuild", tmp_path / "nothing"])
    assert code == 1 and "cxr screen" in plain(stderr)
    assert not (tmp_path / "nothing").exists()
