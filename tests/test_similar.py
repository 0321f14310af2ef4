"""engine.similar: `cxr similar` on hand-made runs (parquet rows + a usearch index of known
vectors): queries by key, ranking, ties, the current row of a rescreened key, why a key has no
neighbours, what cannot be a query; and queries by file through the run's own models on a small
run screened with the tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engine import similar as sim
from engine.errors import ConfigError, EngineError
from engine.io import parquet, vectors
from engine.io.archive import image_key
from engine.io.outdir import write_run_json
from engine.similar import Neighbour, SimilarResult, similar

DIM = 4


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def rows_of(keys, *, run="r1", prob=0.5, status="ok") -> list[dict]:
    return [
        {
            "key": k,
            "source": f"/in/{k}.png",
            "member": None,
            "status": status,
            "error": None if status == "ok" else f"/in/{k}.png: cannot decode",
            "prob": prob if status == "ok" else None,
            "decision": prob >= 0.5 if status == "ok" else None,
            "run_id": run,
        }
        for k in keys
    ]


def make_run(out: Path, vecs: dict[int, list[float]], parts: list[list[dict]]) -> Path:
    for number, rows in enumerate(parts):
        parquet.write_part(out, number, parquet.rows_frame(rows))
    if vecs:
        index = vectors.new_index(DIM)
        index.add(np.array(list(vecs), np.uint64), np.stack([unit(v) for v in vecs.values()]))
        index.save(str(vectors.index_path(out)))
    return out


# key 1 is the query; 2 is nearest, then 3, then 4; 5 failed to screen; 6 screened, not indexed
VECS = {1: [1, 0, 0, 0], 2: [0.9, 0.1, 0, 0], 3: [0.6, 0.4, 0, 0], 4: [0, 0, 1, 0]}


@pytest.fixture
def run(tmp_path) -> Path:
    first = rows_of([1, 2, 3, 4], prob=0.8) + rows_of([5], status="error") + rows_of([6])
    second = rows_of([3], run="r2", prob=0.1)  # key 3 rescreened: its current row
    return make_run(tmp_path / "out", VECS, [first, second])


def test_a_key_query_ranks_the_other_cases_by_cosine_similarity(run):
    r = similar(run, "1", k=2)
    assert r.query == "1" and r.query_key == 1
    assert [(n.rank, n.key) for n in r.neighbours] == [(1, 2), (2, 3)]
    assert r.neighbours[0].similarity == pytest.approx(float(unit(VECS[2])[0]), abs=1e-6)
    assert r.neighbours[0].source == "/in/2.png" and r.neighbours[0].member is None
    assert (r.neighbours[0].prob, r.neighbours[0].decision) == (pytest.approx(0.8), True)
    assert (r.neighbours[1].prob, r.neighbours[1].decision) == (pytest.approx(0.1), False)
    everything = similar(run, "1", k=10)  # more than there are: all the others, never itself
    assert [n.key for n in everything.neighbours] == [2, 3, 4]


def test_result_as_json(run):
    doc = json.loads(json.dumps(similar(run, "4", k=1).to_json()))
    assert doc["query"] == "4" and doc["query_key"] == 4
    (n,) = doc["neighbours"]
    assert set(n) == {"rank", "key", "similarity", "source", "member", "prob", "decision"}
    result = SimilarResult("q", None, [Neighbour(1, 9, 0.5, "?", None, None, None)])
    assert result.to_json()["neighbours"][0]["source"] == "?"


def test_a_neighbour_without_a_row_is_shown_with_an_unknown_source(tmp_path):
    out = make_run(tmp_path / "out", {1: [1, 0, 0, 0], 7: [1, 1, 0, 0]}, [rows_of([1])])
    (n,) = similar(out, "1", k=1).neighbours
    assert (n.key, n.source, n.prob, n.decision) == (7, "?", None, None)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("5", "key 5: this image failed: /in/5.png: cannot decode"),
        ("6", "key 6 is screened but not in"),
        ("99", "key 99 is not in"),
        (str(2**64), f"key {2**64} is not in"),  # no uint64: no key of any run
    ],
)
def test_why_a_key_has_no_neighbours(run, query, words):
    with pytest.raises(EngineError) as err:
        similar(run, query)
    assert words in str(err.value)
    assert not isinstance(err.value, ConfigError)


@pytest.mark.parametrize("query", ["nope.png", "-1", "１２", "0x10"])
def test_what_is_neither_a_file_nor_a_key_is_refused(run, query, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="neither an existing image file nor a key"):
        similar(run, query)


def test_k_must_be_positive(run):
    with pytest.raises(ConfigError, match="-k must be at least 1, not 0"):
        similar(run, "1", k=0)


def test_without_an_index_it_says_what_to_run(tmp_path):
    screened = make_run(tmp_path / "a", {}, [rows_of([1, 2])])
    with pytest.raises(EngineError, match=r"`cxr index rebuild .*` rebuilds it"):
        similar(screened, "1")
    failed = make_run(tmp_path / "b", {}, [rows_of([1], status="error")])
    with pytest.raises(EngineError, match=r"run `cxr screen \.\.\. --out .*` first"):
        similar(failed, "1")


def test_a_key_wins_over_a_file_of_that_name(run, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Path("1").write_bytes(b"not an image")
    assert similar(run, "1", k=1).query_key == 1  # read as the key: no decoding tried


# ---------------------------------------------------------------------------------------------
# _nearest: ties and the search


class FakeIndex:
    """An exact cosine index over a dict; records how it was searched."""

    def __init__(self, vecs: dict[int, list[float]]) -> None:
        self.vecs = {k: unit(v) for k, v in vecs.items()}
        self.searches: list[tuple[int, bool, int]] = []
        self.expansion_search = 64

    def __len__(self) -> int:
        return len(self.vecs)

    def search(self, vector, count, exact=False):
        self.searches.append((count, exact, self.expansion_search))
        dist = {k: 1.0 - float(v @ vector) for k, v in self.vecs.items()}
        # usearch returns ties in an order of its own: here the largest key first
        order = sorted(dist, key=lambda k: (round(dist[k], 6), -k))[:count]
        return SimpleNamespace(keys=np.array(order), distances=np.array([dist[k] for k in order]))


def test_ties_go_to_the_query_s_own_key_then_by_key():
    index = FakeIndex({9: [1, 0], 3: [1, 0], 5: [1, 0], 8: [0, 1]})
    pairs = sim._nearest(index, unit([1, 0]), 3, exclude=None, first=9)
    assert [k for k, _ in pairs] == [9, 3, 5]
    pairs = sim._nearest(index, unit([1, 0]), 2, exclude=None, first=None)
    assert [k for k, _ in pairs] == [3, 5]


def test_a_tie_past_the_k_th_fetches_more_until_it_ends():
    vecs = {k: [1, 0] for k in range(10, 16)} | {1: [0, 1]}  # six equal, one far
    index = FakeIndex(vecs)
    pairs = sim._nearest(index, unit([1, 0]), 2, exclude=None, first=None)
    assert [k for k, _ in pairs] == [10, 11]  # not the two usearch happened to return first
    assert [c for c, _, _ in index.searches] == [3, 6, 7]


def test_the_excluded_key_is_fetched_past():
    index = FakeIndex({1: [1, 0], 2: [0.9, 0.1], 3: [0, 1]})
    pairs = sim._nearest(index, unit([1, 0]), 1, exclude=1, first=1)
    assert [k for k, _ in pairs] == [2]
    assert index.searches[0][0] == 3  # k + 1 for the tie check + 1 for the excluded key


def test_large_indexes_search_with_the_wider_breadth(monkeypatch):
    index = FakeIndex({1: [1, 0], 2: [0, 1]})
    sim._nearest(index, unit([1, 0]), 1, exclude=None, first=None)
    assert index.searches[-1] == (2, True, 64)  # exact below EXACT_SEARCH_UP_TO
    monkeypatch.setattr(sim, "EXACT_SEARCH_UP_TO", 1)
    sim._nearest(index, unit([1, 0]), 1, exclude=None, first=None)
    assert index.searches[-1] == (2, False, sim.EXPANSION_SEARCH)


# ---------------------------------------------------------------------------------------------
# queries by file, through the run's models


def png(path: Path, seed: int, size=(150, 130)) -> Path:
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 200, size[0])[None, :] + rng.normal(0, 25, (size[1], size[0]))
    Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8), "L").save(path)
    return path


@pytest.fixture(scope="module")
def screened(tiny_models_dir, tmp_path_factory):
    from conftest import screen_folder

    root = tmp_path_factory.mktemp("similar")
    images = root / "images"
    images.mkdir()
    paths = [png(images / f"{i}.png", i) for i in range(4)]
    screen_folder([images], root / "out", tiny_models_dir, batch_size=2)
    return root / "out", paths


def test_a_screened_file_finds_itself_first(screened):
    out, paths = screened
    r = similar(out, str(paths[2]), k=2)
    key = image_key(os.path.abspath(paths[2]), None)
    assert r.query_key == key
    assert r.neighbours[0].key == key and r.neighbours[0].source == str(paths[2])
    assert r.neighbours[0].similarity == pytest.approx(1.0, abs=2e-3)
    assert len(r.neighbours) == 2


def test_a_new_file_is_embedded_with_the_run_s_models(screened, tmp_path):
    out, paths = screened
    copy = tmp_path / "copy.png"
    copy.write_bytes(paths[1].read_bytes())  # not screened, same pixels as paths[1]
    r = similar(out, str(copy), k=1)
    assert r.query_key == image_key(str(copy), None)
    assert r.neighbours[0].key == image_key(str(paths[1]), None)
    assert r.neighbours[0].similarity == pytest.approx(1.0, abs=2e-3)


def test_models_of_another_id_are_refused(screened, tmp_path):
    out, paths = screened
    record = json.loads((out / "run.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for f in ("predictions", "index.usearch"):
        os.symlink(out / f, other / f)
    record["models"]["model_id"] = "some-other-models"
    write_run_json(other, record)
    with pytest.raises(ConfigError, match="screened with models some-other-models.*pass --models"):
        similar(other, str(paths[0]))


def test_what_cannot_be_screened_as_a_query(screened, tmp_path, monkeypatch):
    out, paths = screened
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(EngineError, match="cannot screen the query"):
        similar(out, str(bad))
    with pytest.raises(EngineError, match="not a regular file"):
        similar(out, str(tmp_path))  # a folder
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(EngineError, match="not a regular file"):
        similar(out, str(fifo))  # refused, not waited on
    monkeypatch.setattr(sim, "DEFAULT_MAX_FILE_BYTES", 100)
    with pytest.raises(EngineError, match="larger than 100 bytes, as in cxr screen"):
        similar(out, str(paths[0]))
