"""engine.eval.evaluate and `cxr evaluate` (eval/cli.py): the label join (eval/labels.py) on a
hand-built run, errors, and one end-to-end run that screens real CXRs with tiny models and
evaluates them with the real labels (caveats, the HTML report and its plots). The metrics, the
bootstrap and retrieval have their own files: test_eval_metrics, test_bootstrap, test_retrieval.
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
from engine.eval.cli import evaluate as evaluate_command
from engine.eval.evaluate import EvalConfig, evaluate
from engine.io import parquet, vectors
from engine.io.archive import image_key

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
