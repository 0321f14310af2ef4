"""`cxr evaluate`: metrics against scikit-learn, known answers, the patient bootstrap, ECE by
hand, the label join, retrieval on hand-built vectors, errors, and one end-to-end run that
screens real CXRs with tiny models and evaluates them with the real labels.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import typer
from conftest import DATA, plain, require_data
from typer.testing import CliRunner

from engine.errors import ConfigError, EngineError
from engine.eval import bootstrap as bs
from engine.eval import metrics as m
from engine.eval.cli import evaluate as evaluate_command
from engine.eval.evaluate import EvalConfig, evaluate
from engine.io import parquet, vectors
from engine.io.archive import image_key


@pytest.fixture(scope="module")
def sk():
    """scikit-learn's metrics, the reference (a dev dependency; only these tests need it)."""
    return pytest.importorskip("sklearn.metrics")


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# metrics against scikit-learn


def _random_case(rng: np.random.Generator, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes (sometimes 2% positives) and scores, often heavily tied."""
    n = int(rng.integers(2, 400))
    prevalence = [0.5, 0.02, 0.97, rng.uniform(0.05, 0.95)][i % 4]
    y = (rng.random(n) < prevalence).astype(int)
    y[rng.integers(n)], y[rng.integers(n)] = 0, 1  # both classes, whatever the prevalence
    if y.min() == y.max():
        y[0] = 1 - y[0]
    kind = i % 3
    if kind == 0:
        scores = rng.random(n)
    elif kind == 1:
        scores = np.round(rng.random(n), int(rng.integers(1, 3)))  # many ties
    else:
        scores = rng.choice([0.1, 0.5, 0.5, 0.9], size=n).astype(np.float32)  # few values
    return y, scores


CASES = 120


def test_auc_and_average_precision_agree_with_sklearn(sk):
    rng = np.random.default_rng(20240601)
    for i in range(CASES):
        y, s = _random_case(rng, i)
        assert m.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-9), i
        assert m.average_precision(y, s) == pytest.approx(
            sk.average_precision_score(y, s), abs=1e-9
        ), i
        values = m.all_metrics(y, s, s >= 0.5)
        assert values["roc_auc"] == pytest.approx(sk.roc_auc_score(y, s), abs=1e-9)
        assert values["pr_auc"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-9)


def test_curves_agree_with_sklearn_point_for_point(sk):
    rng = np.random.default_rng(7)
    for i in range(CASES):
        y, s = _random_case(rng, i)
        for ours, theirs in (
            (m.roc_curve(y, s), sk.roc_curve(y, s)),
            (
                m.roc_curve(y, s, drop_intermediate=False),
                sk.roc_curve(y, s, drop_intermediate=False),
            ),
            (m.precision_recall_curve(y, s), sk.precision_recall_curve(y, s)),
        ):
            for a, b in zip(ours, theirs, strict=True):
                assert a.shape == b.shape, i
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_confusion_and_rates_agree_with_sklearn(sk):
    rng = np.random.default_rng(3)
    for i in range(CASES // 2):  # sklearn's input checks make these calls slow
        y, s = _random_case(rng, i)
        d = s >= rng.choice([0.3, 0.5, 0.7])
        c = m.confusion(y, d)
        (tn, fp), (fn, tp) = sk.confusion_matrix(y, d, labels=[0, 1])
        assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)
        r = m.rates(c)
        assert r["accuracy"] == pytest.approx(sk.accuracy_score(y, d), abs=1e-9)
        assert r["sensitivity"] == pytest.approx(sk.recall_score(y, d), abs=1e-9)
        assert r["specificity"] == pytest.approx(sk.recall_score(y, d, pos_label=0), abs=1e-9)
        assert r["f1"] == pytest.approx(sk.f1_score(y, d), abs=1e-9)
        if d.any():
            assert r["ppv"] == pytest.approx(sk.precision_score(y, d), abs=1e-9)
        if not d.all():
            assert r["npv"] == pytest.approx(sk.precision_score(y, d, pos_label=0), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# known answers


def test_perfect_inverted_and_constant_scores():
    y = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    perfect = y * 0.8 + 0.1
    assert m.roc_auc(y, perfect) == 1.0
    assert m.average_precision(y, perfect) == 1.0
    assert m.roc_auc(y, 1 - perfect) == 0.0
    constant = np.full(y.size, 0.37)
    assert m.roc_auc(y, constant) == 0.5
    assert m.average_precision(y, constant) == pytest.approx(y.mean(), abs=1e-12)


def test_one_class_makes_the_class_metrics_undefined_not_zero():
    y = np.zeros(5, int)
    s = np.linspace(0.1, 0.9, 5)
    assert np.isnan(m.roc_auc(y, s))
    assert np.isnan(m.average_precision(y, s))
    v = m.all_metrics(y, s, s >= 0.5)
    assert np.isnan(v["sensitivity"]) and np.isnan(v["roc_auc"]) and np.isnan(v["pr_auc"])
    assert v["specificity"] == pytest.approx(2 / 5)  # 0.5, 0.7, 0.9 are called positive
    assert np.isnan(m.rates(m.confusion([1, 0], [False, False]))["ppv"])  # no positive call


def test_ece_hand_computed():
    # bin 0: p 0.05, y 0 -> |0 - 0.05| = 0.05, 1 image
    # bin 1: p 0.15 x2, y 1,0 -> |0.5 - 0.15| = 0.35, 2 images
    # bin 5: p 0.5 (edge -> upper bin), y 1 -> 0.5, 1 image
    # bin 9: p 0.95 x3 and 1.0 (the top edge stays in bin 9), y 1,1,0,1 -> |0.75 - 0.9625|
    p = np.array([0.05, 0.15, 0.15, 0.5, 0.95, 0.95, 0.95, 1.0])
    y = np.array([0, 1, 0, 1, 1, 1, 0, 1])
    expected = (0.05 + 2 * 0.35 + 0.5 + 4 * abs(0.75 - 0.9625)) / 8
    assert m.ece(y, p) == pytest.approx(expected, abs=1e-12)
    r = m.reliability(y, p)
    assert r.ece == pytest.approx(expected, abs=1e-12)
    assert r.count.tolist() == [1, 2, 0, 0, 0, 1, 0, 0, 0, 4]
    assert r.observed[9] == 0.75 and r.mean_prob[1] == pytest.approx(0.15)
    assert np.isnan(r.observed[2])
    assert r.edges.tolist() == [i / 10 for i in range(11)]


def test_perfectly_calibrated_bins_have_zero_ece():
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert m.ece(y, p) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# bootstrap


def test_resamples_take_whole_patients():
    codes = bs.patient_codes(["p3", "p1", "p3", "p2", "p1", "p3", "p4"])
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = bs.resample_images(codes, rng)
        times = np.bincount(idx, minlength=codes.size)
        for patient in np.unique(codes):
            assert np.unique(times[codes == patient]).size == 1  # all images of a patient alike
        drawn = sum(times[codes == p][0] for p in np.unique(codes))
        assert drawn == 4  # as many patient draws as there are patients


def test_bootstrap_is_reproducible_with_a_seed():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = rng.random(60)
    codes = bs.patient_codes(rng.integers(0, 25, 60))

    def run(seed: int):
        return bs.cluster_bootstrap(
            lambda i: m.all_metrics(y[i], s[i], s[i] >= 0.5),
            codes,
            resamples=150,
            rng=np.random.default_rng(seed),
        )

    assert run(5) == run(5)
    assert run(5)["roc_auc"] != run(6)["roc_auc"]


def auc_interval(y: np.ndarray, s: np.ndarray, codes: np.ndarray, resamples: int):
    """The patient-bootstrap interval of the ROC AUC of scores s for labels y (seed 0)."""
    return bs.cluster_bootstrap(
        lambda i: {"roc_auc": m.roc_auc(y[i], s[i])},
        codes,
        resamples=resamples,
        rng=np.random.default_rng(0),
    )["roc_auc"]


def test_bootstrap_resamples_patients_not_images():
    """Two patients with 20 images each, one all positive, one all negative. Drawing patients,
    half the resamples hold one patient only, so the AUC is undefined there and dropped;
    drawing images would almost never miss a class."""
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    s = np.random.default_rng(2).random(40)
    codes = bs.patient_codes(["a"] * 20 + ["b"] * 20)
    ci = auc_interval(y, s, codes, 400)
    assert 140 < ci.valid < 260  # about 200 of 400 (binomial, p = 1/2)
    assert ci.resamples == 400
    by_image = auc_interval(y, s, bs.patient_codes(list(range(40))), 400)
    assert by_image.valid == 400


def test_bootstrap_interval_brackets_the_spread_and_counts_valid():
    y = np.array([0, 1] * 30)
    s = np.where(y == 1, 0.7, 0.3) + np.random.default_rng(4).normal(0, 0.2, 60)
    codes = bs.patient_codes(range(60))
    ci = auc_interval(y, s, codes, 300)
    assert ci.low < m.roc_auc(y, s) < ci.high <= 1.0
    assert ci.valid == 300


# ---------------------------------------------------------------------------------------------
# a hand-built run: prediction rows + index, no screening


def fake_run(out: Path, rows: list[dict], vecs: dict[int, list[float]]) -> None:
    parquet.write_part(out, 0, parquet.rows_frame(rows))
    index = vectors.new_index(len(next(iter(vecs.values()))))
    keys = np.array(list(vecs), np.uint64)
    index.add(keys, np.array(list(vecs.values()), np.float32))
    index.save(str(vectors.index_path(out)))


def row(source: Path | str, member: str | None = None, *, prob=0.5, status="ok") -> dict:
    ok = status == "ok"
    return {
        "key": image_key(str(source), member),
        "source": str(source),
        "member": member,
        "status": status,
        "error": None if ok else f"{source}: broken",
        "prob": prob if ok else None,
        "decision": (prob >= 0.5) if ok else None,
        "threshold": 0.5,
    }


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_csv(path)
    return path


@pytest.fixture
def joined_run(tmp_path):
    """Label rows a..g against a run of plain files and an archive; see the counts test."""
    root = tmp_path / "data"
    root.mkdir()
    archive = root / "batch.tar"
    rows = [
        row(root / "imgs/a.png", prob=0.9),
        row(root / "imgs/b.png", prob=0.2),
        row(archive, "batch/imgs/c.png", prob=0.7),  # archive member, matched by suffix
        row(root / "imgs/d.png", status="error"),
        row(root / "imgs/z.png", prob=0.4),  # screened, not labelled
        row(archive, "oldimgs/f.png", prob=0.4),  # not a folder-boundary suffix of imgs/f.png
        row(root / "imgs/g.png", prob=0.6),  # g is both a file ...
        row(archive, "imgs/g.png", prob=0.1),  # ... and a member: the file wins
    ]
    rng = np.random.default_rng(0)
    fake_run(tmp_path / "out", rows, {r["key"]: rng.normal(size=8) for r in rows if r["prob"]})
    labels = [
        {"path": f"imgs/{name}.png", "label": label, "site": site}
        for name, label, site in [
            ("a", 1, "x"),
            ("b", 0, "x"),
            ("c", 1, "y"),
            ("d", 0, "y"),
            ("e", 1, "y"),  # never screened
            ("f", 0, "y"),
            ("g", 0, "x"),
        ]
    ]
    csv = write_csv(tmp_path / "elsewhere/labels.csv", labels)
    return tmp_path / "out", csv, root, rows


def test_join_counts_files_members_errors_missing_and_unlabelled(joined_run):
    out, csv, root, rows = joined_run
    e = evaluate(EvalConfig(out=out, labels=csv, images=root, by="site", bootstrap=50, k=2))
    assert e.counts.to_json() == {
        "labelled": 7,
        "found": 5,  # a, b, c, d, g
        "missing": 2,  # e, f
        "ambiguous": 1,  # g
        "errors": 1,  # d
        "evaluated": 4,
        "unlabelled": 3,  # z, oldimgs/f, the archive copy of g
    }
    chosen = dict(zip(e.rows["path"], e.rows["key"], strict=True))
    assert chosen["imgs/g.png"] == rows[6]["key"]
    assert chosen["imgs/c.png"] == rows[2]["key"]
    assert e.overall.positives == 2 and e.overall.negatives == 2
    assert set(e.groups) == {"x", "y"}
    text = " ".join(e.caveats)
    assert "2 of 7 labelled images are not in the run" in text
    assert "1 labelled images failed to screen" in text
    assert "no patient_id" in text
    assert "All 1 images in site = y are positive" in text


def test_images_root_defaults_to_the_csv_folder(joined_run, tmp_path):
    out, csv, root, _ = joined_run
    local = write_csv(root / "labels.csv", pl.read_csv(csv).to_dicts())
    e = evaluate(EvalConfig(out=out, labels=local, bootstrap=0))
    assert e.counts.found == 5
    assert e.overall.intervals == {}
    assert any("--bootstrap 0" in c for c in e.caveats)
    vectors.index_path(out).unlink()
    e = evaluate(EvalConfig(out=out, labels=local, bootstrap=0))
    assert e.retrieval is None and e.counts.evaluated == 4
    assert any("Retrieval quality was not measured" in c for c in e.caveats)


@pytest.mark.parametrize(
    ("content", "by", "words"),
    [
        ("path,diagnosis\nimgs/a.png,1\n", None, ["labels.csv", "no column label", "diagnosis"]),
        ("path,label\nimgs/a.png,1\n", "source", ["no column source", "--by"]),
        ("path,label\nimgs/a.png,2\nimgs/b.png,yes\n", None, ["2 rows", "not 0 or 1"]),
        ("path,label\nimgs/a.png,1\nimgs/a.png,0\n", None, ["more than once", "imgs/a.png"]),
        ("path,label\n", None, ["no label rows"]),
        ("path,label\nnowhere/q.png,1\n", None, ["none of the 1 images", "--images"]),
    ],
)
def test_bad_labels_raise_config_errors_naming_file_and_fix(
    joined_run, tmp_path, content, by, words
):
    out, _, root, _ = joined_run
    csv = tmp_path / "bad" / "labels.csv"
    csv.parent.mkdir()
    csv.write_text(content)
    with pytest.raises(ConfigError) as err:
        evaluate(EvalConfig(out=out, labels=csv, images=root, by=by, bootstrap=0))
    for word in words:
        assert word in str(err.value)


def test_missing_inputs_and_bad_options(tmp_path, joined_run):
    out, csv, root, _ = joined_run
    with pytest.raises(ConfigError, match="not found"):
        evaluate(EvalConfig(out=out, labels=tmp_path / "nope.csv"))
    with pytest.raises(EngineError, match="no predictions"):
        evaluate(EvalConfig(out=tmp_path / "empty", labels=csv, images=root))
    with pytest.raises(ConfigError, match="-k"):
        EvalConfig(out=out, labels=csv, k=0)
    with pytest.raises(ConfigError, match="--bootstrap"):
        EvalConfig(out=out, labels=csv, bootstrap=-1)


def _cli(args: list) -> tuple[int, str, str]:
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.command("other")(lambda: None)  # two commands: `evaluate` stays a subcommand, as in cxr
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_turns_engine_errors_into_exit_1(joined_run, tmp_path):
    out, csv, _, _ = joined_run
    code, stdout, stderr = _cli([out, "--labels", tmp_path / "missing.csv"])
    assert code == 1
    assert "missing.csv" in plain(stderr) and "not found" in plain(stderr)


# ---------------------------------------------------------------------------------------------
# retrieval on vectors with known neighbours


def test_retrieval_precision_at_k_and_same_patient_hits(tmp_path):
    # name: (label, patient, group, vector); the nearest other image of each (k = 1):
    # a->b, b->a, c->b (label differs), d->f (other patient), e->d, f->d
    spec = {
        "a": (1, "p1", "x", [1, 0, 0, 0]),
        "b": (1, "p1", "x", [1, 0.05, 0, 0]),
        "c": (0, "p2", "x", [0.9, 0.1, 0, 0]),
        "d": (0, "p3", "y", [0, 1, 0, 0]),
        "e": (0, "p3", "y", [0, 0.3, 0, 1]),
        "f": (0, "p4", "y", [0, 1, 0.3, 0]),
        "h": (1, "p5", "y", None),  # screened ok, but its vector never reached the index
    }
    rows = [row(tmp_path / f"{n}.png", prob=0.5) for n in spec]
    vecs = {r["key"]: v[3] for r, v in zip(rows, spec.values(), strict=True) if v[3]}
    fake_run(tmp_path / "out", rows, vecs)
    csv = write_csv(
        tmp_path / "labels.csv",
        [
            {"path": f"{n}.png", "label": v[0], "patient_id": v[1], "g": v[2]}
            for n, v in spec.items()
        ],
    )
    e = evaluate(EvalConfig(out=tmp_path / "out", labels=csv, by="g", bootstrap=0, k=1))
    r = e.retrieval
    assert r is not None and r.neighbours == 1 and r.not_in_index == 1
    assert any("1 evaluated images are missing from index.usearch" in c for c in e.caveats)
    assert r.overall.precision_at_k == pytest.approx(5 / 6)
    # chance: label-1 queries (2/6) expect 1 of 5 others alike, label-0 queries 3 of 5
    assert r.overall.chance_precision_at_k == pytest.approx((2 * 0.2 + 4 * 0.6) / 6)
    assert r.overall.same_patient_queries == 4  # a, b, d, e
    assert r.overall.same_patient_hit_rate == pytest.approx(3 / 4)
    assert r.groups["x"].precision_at_k == pytest.approx(2 / 3)
    assert r.groups["x"].same_patient_hit_rate == 1.0
    assert r.groups["y"].same_patient_hit_rate == 0.5

    wide = evaluate(EvalConfig(out=tmp_path / "out", labels=csv, bootstrap=0, k=10))
    assert wide.retrieval.neighbours == 5  # everything but the query
    assert wide.retrieval.overall.same_patient_hit_rate == 1.0
    assert any("not k = 10" in c for c in wide.caveats)


# ---------------------------------------------------------------------------------------------
# end to end: screen real CXRs with tiny models, evaluate with the real labels


ARCHIVED = 4  # of the screened images, this many go in through a .tar


@pytest.fixture(scope="module")
def screened_dev(tiny_models_dir, tmp_path_factory):
    """30 real CXRs (10 COVID-19, 10 other ieee8023, 10 NIH) screened with the tiny models;
    four of them inside a tar whose members carry a `cxr-dev/` prefix."""
    from engine.config import ScreenConfig
    from engine.runner import screen

    require_data()
    dev = DATA / "cxr-dev"
    labels = pl.read_csv(dev / "labels.csv").sort("path")
    ieee = pl.col("source") == "ieee8023"
    chosen = pl.concat(
        [
            labels.filter(ieee & (pl.col("label") == 1)).head(10),
            labels.filter(ieee & (pl.col("label") == 0)).head(10),
            labels.filter(~ieee).head(10),
        ]
    )
    files = [dev / p for p in chosen["path"]]
    tmp = tmp_path_factory.mktemp("eval-e2e")
    archive = tmp / "part.tar"
    with tarfile.open(archive, "w") as tar:
        for f in files[:ARCHIVED]:
            tar.add(f, arcname=f"cxr-dev/{f.relative_to(dev).as_posix()}")
    out = tmp / "out"
    screen(
        ScreenConfig(
            inputs=(archive, *files[ARCHIVED:]),
            out=out,
            models=tiny_models_dir,
            threads=2,
            progress=False,
        )
    )
    return out, dev / "labels.csv", chosen, tmp


def test_e2e_json_counts_metrics_and_caveats(screened_dev):
    out, csv, chosen, tmp = screened_dev
    report = tmp / "report"
    args = [out, "--labels", csv, "--by", "source", "--json", "--bootstrap", 300, "-k", 3]
    code, stdout, stderr = _cli([*args, "--report", report])
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["counts"] == {
        "labelled": 288,
        "found": 30,
        "missing": 258,
        "ambiguous": 0,
        "errors": 0,
        "evaluated": 30,
        "unlabelled": 0,
    }
    overall = doc["overall"]
    assert (overall["positives"], overall["negatives"]) == (10, 20)
    assert overall["patients"] == chosen["patient_id"].n_unique()
    c = overall["confusion"]
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == 30
    for group in (overall, *doc["groups"].values()):
        for metric in group["metrics"].values():
            if metric["value"] is not None:
                assert 0.0 <= metric["value"] <= 1.0
            if metric["ci95"] and metric["ci95"]["low"] is not None:
                assert metric["ci95"]["low"] <= metric["ci95"]["high"]
                assert 0 < metric["ci95"]["valid_resamples"] <= 300
    assert overall["metrics"]["roc_auc"]["value"] is not None
    nih = doc["groups"]["nih-chestxray14"]
    assert nih["positives"] == 0 and nih["metrics"]["roc_auc"]["value"] is None
    assert sum(b["images"] for b in overall["calibration"]["bins"]) == 30
    caveats = " ".join(doc["caveats"])
    assert "UNTRAINED" in caveats
    assert "nih-chestxray14 are negative" in caveats and "undefined" in caveats
    assert "share of positives differs between source groups" in caveats
    r = doc["retrieval"]
    assert r["overall"]["queries"] == 30 and r["neighbours"] == 3
    for s in (r["overall"], *r["groups"].values()):
        for key in ("precision_at_k", "chance_precision_at_k", "same_patient_hit_rate"):
            assert s[key] is None or 0.0 <= s[key] <= 1.0
    assert r["overall"]["same_patient_queries"] > 0  # several ieee8023 patients have 2+ images

    # the report: metrics.json is the same document, PNGs are real PNGs, HTML embeds them
    assert json.loads((report / "metrics.json").read_text()) == doc
    for name in ("roc.png", "pr.png", "reliability.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        from PIL import Image

        with Image.open(report / name) as im:
            im.verify()
    html = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<link" not in html and "<script" not in html
    sources = re.findall(r"""src="([^"]*)\"""", html)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "nih-chestxray14 are negative" in html and "undefined" in html


def test_e2e_table_output_and_same_seed_same_numbers(screened_dev):
    out, csv, _, _ = screened_dev
    code, stdout, _ = _cli([out, "--labels", csv, "--bootstrap", 100])
    assert code == 0
    text = plain(stdout)
    assert "found in the run 30" in text and "ROC AUC" in text and "precision@k" in text
    runs = [
        json.loads(_cli([out, "--labels", csv, "--json", "--bootstrap", 100, "--seed", s])[1])
        for s in (3, 3, 4)
    ]
    assert runs[0] == runs[1]
    assert runs[0]["overall"]["metrics"] != runs[2]["overall"]["metrics"]
