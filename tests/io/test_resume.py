"""engine.io.resume: what an existing output directory holds, which runs may write into it, and
what a killed run left behind. On hand-written parts; the real killed-and-rerun `cxr screen`
runs are in tests/test_screen_resume.py, hostile reruns in tests/adversarial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.io import parquet, resume, thumbs, vectors

DIM = 4


def commit(out: Path, number: int, keys: list[int], *, model_id="m1", threshold=0.5, emb=False):
    """A committed shard as a run writes it: the sidecar, then the part."""
    rows = [
        parquet.Row(key=k, source=f"img{k}.png", member=None).columns()
        | {"status": "ok", "model_id": model_id, "threshold": threshold}
        for k in keys
    ]
    vecs = np.eye(len(keys), DIM, dtype=np.float32)
    vectors.write_sidecar(out, number, np.array(keys, np.uint64), vecs)
    parquet.write_part(out, number, parquet.rows_frame(rows, vecs if emb else None))


def check(out: Path, *, previous=None, model_id="m1", dim=DIM, threshold=0.5, emb=False):
    resume.check_resumable(
        out,
        previous=previous,
        model_id=model_id,
        dim=dim,
        threshold=threshold,
        with_embeddings=emb,
    )


def test_holdings_of_the_committed_parts(tmp_path):
    assert resume.holdings(tmp_path) is None
    commit(tmp_path, 0, [1, 2])
    commit(tmp_path, 1, [3], model_id="m2", threshold=0.25, emb=True)
    held = resume.holdings(tmp_path)
    assert held == resume.Holdings(
        model_ids=frozenset({"m1", "m2"}),
        thresholds=frozenset({0.5, 0.25}),
        with_embeddings=frozenset({False, True}),
    )


def test_a_new_directory_and_the_same_run_again_may_write(tmp_path):
    check(tmp_path / "new")
    commit(tmp_path, 0, [1, 2])
    check(tmp_path, previous={"models": {"model_id": "m1"}})
    check(tmp_path, threshold=np.float32(0.5).item())  # as stored: float32


def test_other_models_are_refused_also_when_only_run_json_names_them(tmp_path):
    commit(tmp_path, 0, [1])
    with pytest.raises(ConfigError, match=r"holds results of models m1; this run uses m2"):
        check(tmp_path, model_id="m2")
    with pytest.raises(ConfigError, match=r"models m0; this run uses m1.*new --out"):
        check(tmp_path, previous={"models": {"model_id": "m0"}})
    commit(tmp_path, 1, [2], model_id="m2")
    with pytest.raises(ConfigError, match="it already mixes models"):
        check(tmp_path)


def test_another_threshold_is_refused_with_the_one_to_use(tmp_path):
    commit(tmp_path, 0, [1], threshold=0.3)
    check(tmp_path, threshold=0.3)  # 0.3 reads back as 0.30000001: still the same
    with pytest.raises(ConfigError, match=r"threshold 0\.3; this run's is 0\.5.*--threshold 0\.3"):
        check(tmp_path, threshold=0.5)


def test_the_embedding_column_must_stay_as_it_was(tmp_path):
    commit(tmp_path, 0, [1])
    with pytest.raises(ConfigError, match="screened without --embeddings-in-parquet"):
        check(tmp_path, emb=True)
    commit(tmp_path, 1, [2], emb=True)
    with pytest.raises(ConfigError, match="already mixes parts with and without"):
        check(tmp_path)


def test_an_index_of_another_dimension_is_refused(tmp_path):
    commit(tmp_path, 0, [1, 2])
    vectors.sync_index(tmp_path, DIM)
    with pytest.raises(ConfigError, match=r"holds 4-d vectors but the models give 8-d"):
        check(tmp_path, dim=8)


def test_resume_clears_leftovers_merges_committed_sidecars_and_names_the_keys(tmp_path):
    commit(tmp_path, 0, [1, 2])
    commit(tmp_path, 1, [3])
    (parquet.parts_dir(tmp_path) / ".part-00002.parquet.tmp-99").write_bytes(b"torn")
    thumbs.write_thumbs(tmp_path, 2, [4], [b"j"], [b"m"])  # its part never came
    vectors.write_sidecar(tmp_path, 2, np.array([4], np.uint64), np.ones((1, DIM), np.float32))
    assert resume.resume(tmp_path, DIM) == {1, 2, 3}
    assert sorted(int(k) for k in vectors.load_index(tmp_path).keys) == [1, 2, 3]
    assert sorted(p.name for p in parquet.parts_dir(tmp_path).iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert not thumbs.thumbs_path(tmp_path, 2).exists()
    assert not vectors.sidecar_path(tmp_path, 2).exists()  # uncommitted: dropped, not indexed
