"""engine.eval.release: a trained models dir to a shipped release and its card in one command.

Tiny untrained models (`engine.models.init_models`) stand in for trained ones, with a made-up
card, INT8 variant and splits.csv; 16 real CXRs of ../shared/data (8 positives, 4 ieee8023 and 4
NIH negatives, one per patient). Everything is written under pytest's tmp directories.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the parity step needs the train extra (torch)")

from conftest import DATA, require_data  # noqa: E402

from engine.errors import ConfigError  # noqa: E402
from engine.eval import card as card_mod  # noqa: E402
from engine.eval.release import (  # noqa: E402
    PARITY_REFERENCE,
    data_paths_as_given,
    held_out_labels,
    install,
    main,
    pack,
    reference_precision,
)
from engine.models import (  # noqa: E402
    Variant,
    init_models,
    load_manifest,
    load_models,
    manifest_path,
    save_manifest,
    sha256_file,
)

DEV = DATA / "cxr-dev"
SCRATCH = "from scratch (no pretrained weights)"
IMAGENET = "ImageNet weights (made up for this test)"
# test part of the made-up splits.csv: 2 positives, 2 ieee8023 and 2 NIH negatives
TEST_ROWS = {"1": 2, "ieee8023:0": 2, "nih-chestxray14:0": 2}


def _pick() -> list[dict[str, str]]:
    require_data()
    with open(DEV / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seen: set[str] = set()
    pick: list[dict[str, str]] = []

    def take(cond, n: int) -> None:
        for r in rows:
            if n and cond(r) and r["patient_id"] not in seen:
                seen.add(r["patient_id"])
                pick.append(r)
                n -= 1

    take(lambda r: r["label"] == "1", 8)
    take(lambda r: r["label"] == "0" and r["source"] == "ieee8023", 4)
    take(lambda r: r["source"] == "nih-chestxray14", 4)
    return pick


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _trained(directory: Path, rows: list[dict[str, str]], *, seed: int, init: str) -> Path:
    """Tiny models dressed as a `cxr train` output: card, INT8 variant, splits.csv."""
    init_models(directory, size="tiny", seed=seed)
    clf = load_manifest(manifest_path(directory, "classifier"))
    shutil.copy2(clf.onnx_path, directory / "classifier.int8.onnx")  # stands in for the QDQ one
    sha = sha256_file(directory / "classifier.int8.onnx")
    card = {
        "training": {"initialisation": init, "seconds": 60.0},
        "splits": {"counts": {"train": {"images": 10, "patients": 10}}},
        "data": {"used": len(rows)},
        "int8": {"onnx": "classifier.int8.onnx", "sha256": sha, "parity": {}},
    }
    variants = {"int8": Variant(onnx="classifier.int8.onnx", sha256=sha)}
    save_manifest(replace(clf, card=card, variants=variants), directory)
    left = dict(TEST_ROWS)
    splits = []
    for r in rows:
        key = "1" if r["label"] == "1" else f"{r['source']}:0"
        part = "test" if left[key] else "train"
        left[key] -= part == "test"
        splits.append(
            {k: r[k] for k in ("path", "patient_id", "label", "source")} | {"split": part}
        )
    _write_csv(directory / "splits.csv", splits)
    return directory


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    rows = _pick()
    labels = _write_csv(root / "labels.csv", rows)
    trained = _trained(root / "trained", rows, seed=0, init=SCRATCH)
    other = _trained(root / "other", rows, seed=1, init=IMAGENET)
    out = root / "out"
    out.mkdir()
    # An older INT8 release in --out, plus a file that is not the release's.
    for name in ("classifier.int8.onnx", "classifier.onnx"):
        shutil.copy2(trained / name, out / name)
    (out / "segmenter_splits.csv").write_text("path,split\n")
    (out / "keep.txt").write_text("not a model file\n")
    argv = [
        "--trained", trained, "--out", out, "--labels", labels, "--images", DEV,
        "--work", root / "work", "--classifier", "fp16", "--compare", f"eff={other}",
        "--evidence", root / "evidence", "--backend", "onnxruntime", "--threads", "2",
        "--bootstrap", "20",
    ]  # fmt: skip
    argv = [str(a) for a in argv]
    code = main(argv)
    return {"code": code, "argv": argv, "root": root, "out": out, "trained": trained,
            "other": other, "labels": labels}  # fmt: skip


def test_release_installs_a_packed_release_that_loads(released):
    assert released["code"] == 0
    out = released["out"]
    models = load_models(out, precision="auto")
    assert models.classifier.precision == "fp16"
    assert models.classifier.onnx == "classifier.fp16.onnx"
    assert (out / "splits.csv").read_text() == (released["trained"] / "splits.csv").read_text()
    # the old release's model files the new manifests do not name are gone; the rest stays
    assert not (out / "classifier.int8.onnx").exists()
    assert not (out / "classifier.onnx").exists()
    assert not (out / "segmenter_splits.csv").exists()
    assert (out / "keep.txt").is_file()
    assert sorted(p.name for p in out.glob("*.onnx")) == ["classifier.fp16.onnx", "segmenter.onnx"]


def test_parity_is_recorded_in_the_packed_card(released):
    clf = load_models(released["out"], precision="auto").classifier
    entry = clf.card["fp16"]
    assert entry["onnx"] == "classifier.fp16.onnx"
    par = entry["parity"]
    assert par["images"] == 16  # every labelled image, by engine.train.parity
    assert 0.0 <= par["same_decision"] <= 1.0 and "meets_bar" in par
    assert par["embedding_cosine_min"] > 0.99  # float16-stored weights of the same model


def test_eval_and_shortcut_jsons_are_of_the_test_patients(released):
    work = released["root"] / "work"
    names = ["eval-fp32.json", "eval-shipped.json", "shortcut.json"]
    names += ["compare-eff-eval.json", "compare-eff-shortcut.json"]
    n_test = sum(TEST_ROWS.values())
    for name in names:
        data = json.loads((work / name).read_text())
        if "eval" in name:
            assert data["overall"]["images"] == n_test
            assert set(data["groups"]) == {"ieee8023", "nih-chestxray14"}
        else:
            assert data["split"] == "test" and data["counts"]["scored"] == n_test
    fp32 = json.loads((work / "eval-fp32.json").read_text())["run"]["model_id"]
    shipped = json.loads((work / "eval-shipped.json").read_text())["run"]["model_id"]
    assert "-fp32@" in fp32.split("+")[0] and "-fp16@" in shipped.split("+")[0]
    # the evidence holds the JSONs, not the runs
    evidence = released["root"] / "evidence"
    assert sorted(p.name for p in evidence.iterdir()) == sorted([*names, PARITY_REFERENCE])


def test_parity_reference_holds_the_fp32_logit_of_every_labelled_image(released):
    ref = json.loads((released["root"] / "evidence" / PARITY_REFERENCE).read_text())
    trained = load_manifest(manifest_path(released["trained"], "classifier"))
    assert ref["reference"] == f"classifier.onnx (fp32), sha256 {trained.sha256}"
    assert ref["threshold"] == trained.threshold
    with open(released["labels"], newline="") as f:
        labels = {r["path"]: int(r["label"]) for r in csv.DictReader(f)}
    assert {r["path"]: r["label"] for r in ref["images"]} == labels
    # the logits are the FP32 export's on the served crops: the recorded parity follows from them
    clf = load_models(released["out"], precision="auto").classifier
    par = clf.card["fp16"]["parity"]
    assert par["images"] == len(ref["images"])
    assert {r["split"] for r in ref["images"]} <= {"train", "val", "test"}
    assert all(np.isfinite(r["logit"]) for r in ref["images"])


def test_card_has_comparison_header_and_command(released, capsys):
    text = (released["out"] / "MODEL_CARD.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("Model id"))
    assert f"initialisation: {SCRATCH}" in header
    assert "## Comparison: eff" in text
    section = text.split("## Comparison: eff", 1)[1].split("\n## ", 1)[0]
    assert IMAGENET in section and "tiny-classifier" in section
    assert "| metric | shipped FP32 (tiny-classifier) | eff (tiny-classifier) | paper |" in section
    for row in ("| accuracy |", "| specificity (ieee8023) |", "| accuracy (nih-chestxray14) |"):
        assert row in section
    assert "| shortcut ROC AUC, lungs masked |" in section
    assert "| shortcut ROC AUC, source prior |" in section
    assert "It uses its own segmenter" in section  # the other dir's segmenter has other weights
    assert "Against the FP32 export on 16 images" in text
    assert "python -m engine.eval.release " + " ".join(released["argv"]) in text
    assert str(released["root"] / "evidence") in text


def test_card_header_follows_the_classifier_card(released, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(released["out"], models)
    clf = load_manifest(manifest_path(models, "classifier"))
    card = clf.card | {"training": {"initialisation": IMAGENET}}
    save_manifest(replace(clf, card=card), models)
    ev = json.loads((released["root"] / "work" / "eval-fp32.json").read_text())
    text = card_mod.render(models, ev, None, None)
    header = next(line for line in text.splitlines() if line.startswith("Model id"))
    assert f"initialisation: {IMAGENET}" in header
    assert "scratch" not in text


def test_card_cli_compare_and_segmenter_only(released, tmp_path, monkeypatch):
    work = released["root"] / "work"
    out = tmp_path / "CARD.md"
    argv = [
        "card", "--models", str(released["out"]), "--eval", str(work / "eval-fp32.json"),
        "--eval-int8", str(work / "eval-shipped.json"), "--shortcut", str(work / "shortcut.json"),
        "--compare",
        f"eff={work / 'compare-eff-eval.json'},{work / 'compare-eff-shortcut.json'},"
        f"{released['other']}",
        "--out", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    card_mod.main()
    text = out.read_text()
    assert "## Comparison: eff" in text and IMAGENET in text
    assert "## The same with the shipped fp16 classifier" in text
    assert "python -m engine.eval.card --models" in text
    monkeypatch.setattr(
        sys,
        "argv",
        ["card", "--models", str(released["out"]), "--segmenter-only", "--out", str(out)],
    )
    card_mod.main()
    assert out.read_text() == text  # same models: the segmenter section is re-rendered as is


def test_int8_release_removes_the_fp16_file(released, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(released["out"], out)
    staging = tmp_path / "staging"
    pack(released["trained"], staging, "int8")
    removed = install(staging, out)
    assert removed == ["classifier.fp16.onnx"]
    assert load_models(out, precision="auto").classifier.precision == "int8"
    assert sorted(p.name for p in out.glob("*.onnx")) == [
        "classifier.int8.onnx",
        "classifier.w8.onnx",
        "segmenter.onnx",
    ]


def test_card_data_paths_are_the_release_command_s_where_the_files_are_the_same(
    released, tmp_path, monkeypatch
):
    staging = tmp_path / "staging"
    pack(released["trained"], staging, "fp16")
    m = load_manifest(staging / "classifier.json")
    labels = Path(released["labels"]).resolve()
    recorded = {"labels": str(labels), "images": "/training/machine/images", "used": 3}
    save_manifest(replace(m, card=dict(m.card) | {"data": recorded}), staging)
    monkeypatch.chdir(labels.parent)
    # labels: the same file, now relative; images: not the same folder, left as recorded
    assert data_paths_as_given(staging, Path(labels.name), Path(".")) == ["labels"]
    data = load_manifest(staging / "classifier.json").card["data"]
    assert data == recorded | {"labels": labels.name}
    assert data_paths_as_given(staging, Path(labels.name), Path(".")) == []


def test_held_out_labels_refuses_splits_of_other_data(released, tmp_path):
    splits = _write_csv(tmp_path / "splits.csv", [{"path": "images/nope.png", "split": "test"}])
    with pytest.raises(ConfigError, match="not in"):
        held_out_labels(released["labels"], splits, tmp_path / "t.csv")
    dest = held_out_labels(
        released["labels"], released["trained"] / "splits.csv", tmp_path / "t.csv"
    )
    with open(dest, newline="") as f:
        assert len(list(csv.DictReader(f))) == sum(TEST_ROWS.values())


def test_bad_compare_name_is_refused(released, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([
            "--trained", str(released["trained"]), "--out", str(tmp_path / "o"),
            "--labels", str(released["labels"]), "--images", str(DEV),
            "--work", str(tmp_path / "w"), "--compare", f"a/b={released['other']}",
        ])  # fmt: skip
    assert "--compare" in capsys.readouterr().err


def _loso_run(directory: Path, specificity: float) -> Path:
    """The parts of a leave-one-source-out `cxr train classifier` manifest the card reads."""
    directory.mkdir(parents=True)
    m = {"n": 50, "n_pos": 0, "n_neg": 50, "roc_auc": None, "specificity": specificity}
    card = {
        "threshold": 0.5,
        "data": {"excluded_from_training": ["nih-chestxray14:0"]},
        "metrics": {"unseen": {"all": m, "source=nih-chestxray14": m}},
    }
    (directory / "classifier.json").write_text(json.dumps({"card": card}))
    return directory


def test_card_side_by_side_with_loso_runs_and_ship_rule(released, tmp_path, monkeypatch, capsys):
    work = released["root"] / "work"
    out = tmp_path / "CARD.md"
    argv = [
        "card", "--models", str(released["out"]), "--eval", str(work / "eval-fp32.json"),
        "--shortcut", str(work / "shortcut.json"),
        "--compare", f"eff={work / 'compare-eff-eval.json'},{work / 'compare-eff-shortcut.json'}",
        "--unseen", f"release={_loso_run(tmp_path / 'a', 0.9)}",
        "--unseen", f"eff={_loso_run(tmp_path / 'b', 0.8)}",
        "--baseline", "eff", "--out", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert card_mod.main() == 0
    text = out.read_text()
    side = text.split("## Side by side", 1)[1].split("\n## ", 1)[0]
    assert "| | this release (" in side and " | eff | paper |" in side
    row = next(ln for ln in side.splitlines() if ln.startswith("| unseen nih-chestxray14"))
    assert "0.900 [" in row and "0.800 [" in row and "of 50" in row
    assert (
        "Ship rule, this release" in side and "| unseen-source specificity no worse | yes |" in side
    )
    gen = text.split("## Generalisation", 1)[1].split("\n## ", 1)[0]
    assert "trained without nih-chestxray14:0" in gen and "specificity 0.900" in gen
    # an --unseen or --baseline naming no --compare is a usage error
    for bad in (["--unseen", f"nope={tmp_path / 'a'}"], ["--baseline", "nope"]):
        monkeypatch.setattr(sys, "argv", argv[:-2] + bad + ["--out", str(out)])
        with pytest.raises(SystemExit) as exc:
            card_mod.main()
        assert exc.value.code == 2
        assert "nope" in capsys.readouterr().err


def test_a_packed_release_is_compared_through_its_shipped_export(released):
    """--compare may name the release shipped before (no FP32 export, only its fp16 one)."""
    assert reference_precision(released["trained"]) == "fp32"
    assert reference_precision(released["out"]) == "fp16"
