"""Hostile reruns of `cxr screen` on an output directory screened with other models.

run.json is only a record: it can be lost or deleted. What the directory holds (the Parquet
rows' `model_id`, the index's dimension) must be checked too, and refused before anything is
written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from conftest import dev_images, plain, run_cli

from engine.io import parquet, vectors


def _inputs(root: Path, n: int, skip: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for src in dev_images(skip + n)[skip:]:
        shutil.copyfile(src, root / src.name)
    return root


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_other_models_are_refused_without_run_json(tmp_path, tiny_models_dir):
    """issue 16 #1: with run.json deleted, a run with other models must not append its rows."""
    from engine.models import init_models

    other = init_models(tmp_path / "other-models", size="tiny", seed=1).classifier.directory
    inp, out = _inputs(tmp_path / "in", 3), tmp_path / "out"
    code, stdout, stderr = run_cli(["screen", inp, "--out", out, "--models", tiny_models_dir])
    assert code == 0, stdout + stderr
    before_ids = set(parquet.read_predictions(out, ["model_id"])["model_id"].to_list())
    (out / "run.json").unlink()
    _inputs(inp, 2, skip=3)  # new images: an unchecked run would screen and append them
    before = _snapshot(out)

    code, stdout, stderr = run_cli(["screen", inp, "--out", out, "--models", other])

    assert code == 1, stdout + stderr
    message = plain(stderr)
    (held,) = before_ids
    assert held in message and "new --out" in message
    assert _snapshot(out) == before  # nothing written: no rows, no run.json, no index change
    ids = set(parquet.read_predictions(out, ["model_id"])["model_id"].to_list())
    assert ids == before_ids


def test_index_of_another_dimension_is_refused_before_writing(tmp_path, tiny_models_dir):
    """issue 16 #1: an index.usearch of another dimension (another model's) next to this
    model's embeddings: refused before any row is written, not after the run."""
    inp, out = _inputs(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    index = vectors.new_index(2048)
    index.add(np.arange(3, dtype=np.uint64), np.eye(3, 2048, dtype=np.float32))
    index.save(str(vectors.index_path(out)))

    code, stdout, stderr = run_cli(["screen", inp, "--out", out, "--models", tiny_models_dir])

    assert code == 1, stdout + stderr
    message = plain(stderr)
    assert "2048-d" in message and "64-d" in message and "new --out" in message
    assert not (out / "predictions").exists()
    assert not (out / "run.json").exists()
    assert len(vectors.load_index(out)) == 3
