"""engine.eval.labels: reading the labels CSV (label spellings, patients, groups, paths, every
refusal with its fix) and joining label rows to prediction rows (files, archive members at a
folder boundary, ties, one prediction row per label row), on hand-made frames."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from engine.errors import ConfigError
from engine.eval.labels import (
    MISSING_GROUP,
    OWN_PATIENT,
    MatchCounts,
    match_predictions,
    read_labels,
)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# read_labels


def test_read_labels_columns_labels_patients_and_paths(tmp_path):
    csv = write(
        tmp_path / "set" / "labels.csv",
        "path,label,patient_id\n"
        " imgs/a.png ,1,P1\n"
        "imgs\\b.png,0,\n"
        "./imgs/c.png,TRUE,P1\n"
        "imgs/d.png, 0.0 ,P2\n"
        "imgs/e.png,false,\n",
    )
    df = read_labels(csv)
    assert df.columns == ["_row", "path", "label", "patient", "patient_given", "_rel", "_abs"]
    assert df["path"].to_list()[0] == "imgs/a.png"  # stripped
    assert df["label"].to_list() == [1, 0, 1, 0, 0]
    assert df["label"].dtype == pl.Int8
    assert df["patient"].to_list() == [
        "P1",
        OWN_PATIENT + "imgs\\b.png",
        "P1",
        "P2",
        OWN_PATIENT + "imgs/e.png",
    ]
    assert df["patient_given"].to_list() == [True, False, True, True, False]
    assert df["_rel"].to_list() == [
        "imgs/a.png",
        "imgs/b.png",
        "imgs/c.png",
        "imgs/d.png",
        "imgs/e.png",
    ]
    root = tmp_path / "set"
    assert df["_abs"][0] == os.path.realpath(root / "imgs/a.png")  # default root: the CSV's folder
    assert df["_row"].to_list() == [0, 1, 2, 3, 4]


def test_read_labels_without_patient_id_every_image_is_its_own_patient(tmp_path):
    csv = write(tmp_path / "l.csv", "path,label\na.png,1\nb.png,0\n")
    df = read_labels(csv, images=tmp_path)
    assert df["patient"].to_list() == [OWN_PATIENT + "a.png", OWN_PATIENT + "b.png"]
    assert not df["patient_given"].any()


def test_read_labels_images_root_and_groups(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    csv = write(tmp_path / "csvs" / "l.csv", "path,label,site\na.png,1, x \nb.png,0,\nc.png,0,y\n")
    df = read_labels(csv, images=images, by="site")
    assert df["group"].to_list() == ["x", MISSING_GROUP, "y"]
    assert df["_abs"].to_list() == [
        os.path.realpath(images / n) for n in ("a.png", "b.png", "c.png")
    ]
    assert "group" not in read_labels(csv, images=images).columns


@pytest.mark.parametrize(
    ("content", "by", "words"),
    [
        ("path,diagnosis\na.png,1\n", None, ["no column label", "it has path, diagnosis"]),
        ("file,label\na.png,1\n", None, ["no column path", "Required: path"]),
        ("path,label\na.png,1\n", "site", ["no column site (the --by column)"]),
        ("path,label\n", None, ["no label rows"]),
        (
            "path,label\na.png,2\nb.png,yes\nc.png,1\nd.png,\n",
            None,
            ["3 rows have a label that is not 0 or 1", "'2', 'yes'", "use 1 for COVID-19"],
        ),
        ("path,label\na.png,1\n,0\n", None, ["empty path in line 3"]),
        (
            "path,label\nb.png,1\na.png,0\nb.png,0\na.png,1\n",
            None,
            ["2 paths appear more than once", "'a.png'", "keep one row per image"],
        ),
    ],
)
def test_read_labels_refusals_name_the_file_and_the_fix(tmp_path, content, by, words):
    csv = write(tmp_path / "bad.csv", content)
    with pytest.raises(ConfigError) as err:
        read_labels(csv, by=by)
    text = str(err.value)
    assert str(csv) in text
    for word in words:
        assert word in text


def test_read_labels_missing_file_unreadable_csv_and_bad_images_root(tmp_path):
    with pytest.raises(ConfigError, match="labels CSV not found; pass --labels"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="labels CSV not found"):
        read_labels(tmp_path)  # a folder is no CSV
    garbage = write(tmp_path / "bin.csv", b"path,label\n\xff\xfe\x00a.png,1\n")
    with pytest.raises(ConfigError, match="cannot read as CSV"):
        read_labels(garbage)
    csv = write(tmp_path / "l.csv", "path,label\na.png,1\n")
    with pytest.raises(ConfigError, match=r"--images .*nowhere: not a folder"):
        read_labels(csv, images=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# match_predictions


def preds(rows: list[tuple[int, str, str | None]]) -> pl.DataFrame:
    keys, sources, members = zip(*rows, strict=True)
    return pl.DataFrame(
        {"key": list(keys), "source": list(sources), "member": list(members), "prob": 0.5},
        schema={"key": pl.UInt64, "source": pl.String, "member": pl.String, "prob": pl.Float64},
    )


def test_files_and_members_match_at_a_folder_boundary(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "imgs" / "a.png")
    csv = write(
        tmp_path / "l.csv",
        "path,label\nimgs/a.png,1\nimgs/b.png,0\nimgs/c.png,1\nimgs/d.png,0\nimgs/e.png,0\n",
    )
    labels = read_labels(csv)
    p = preds(
        [
            (10, str(link), None),  # a, through a symlink: both sides resolved
            (11, "/x/batch.tar", "batch/imgs/b.png"),  # member suffix at a folder boundary
            (12, "/x/batch.tar", "./imgs/c.png"),  # leading ./ dropped
            (13, "/x/batch.tar", "oldimgs/d.png"),  # not at a boundary: no match
            (14, "/x/other.tar", "/imgs/e.png"),  # leading / dropped
            (15, str(tmp_path / "imgs" / "z.png"), None),  # not labelled
        ]
    )
    joined, ambiguous = match_predictions(labels, p)
    assert dict(zip(joined["path"], joined["key"], strict=True)) == {
        "imgs/a.png": 10,
        "imgs/b.png": 11,
        "imgs/c.png": 12,
        "imgs/e.png": 14,
    }
    assert ambiguous == 0
    assert joined["_row"].to_list() == sorted(joined["_row"].to_list())
    assert {"label", "source", "member", "prob"} <= set(joined.columns)


def test_a_file_wins_over_a_member_and_the_smallest_key_among_members(tmp_path):
    csv = write(tmp_path / "l.csv", "path,label\nimgs/a.png,1\nimgs/b.png,0\n")
    labels = read_labels(csv)
    p = preds(
        [
            (5, "/x/t.tar", "imgs/a.png"),
            (50, str(tmp_path / "imgs" / "a.png"), None),  # the file: wins despite its key
            (9, "/x/u.tar", "u/imgs/b.png"),
            (7, "/x/v.tar", "v/imgs/b.png"),  # two members: the smaller key
        ]
    )
    joined, ambiguous = match_predictions(labels, p)
    assert joined["key"].to_list() == [50, 7]
    assert ambiguous == 2


def test_one_prediction_row_serves_one_label_row(tmp_path):
    # two label paths that name the same screened member: the first label row gets it
    csv = write(tmp_path / "l.csv", "path,label\nsub/a.png,1\na.png,0\n")
    joined, ambiguous = match_predictions(read_labels(csv), preds([(3, "/t.tar", "x/sub/a.png")]))
    assert joined["path"].to_list() == ["sub/a.png"]
    assert ambiguous == 1


def test_no_member_rows_and_no_matches(tmp_path):
    csv = write(tmp_path / "l.csv", "path,label\na.png,1\n")
    joined, ambiguous = match_predictions(read_labels(csv), preds([(1, "/elsewhere/a.png", None)]))
    assert joined.height == 0 and ambiguous == 0


def test_match_counts_json_keeps_the_field_order():
    c = MatchCounts(
        labelled=7, found=5, missing=2, ambiguous=1, errors=1, evaluated=4, unlabelled=3
    )
    assert list(c.to_json().items()) == [
        ("labelled", 7),
        ("found", 5),
        ("missing", 2),
        ("ambiguous", 1),
        ("errors", 1),
        ("evaluated", 4),
        ("unlabelled", 3),
    ]


def test_match_counts_rows_are_the_printed_counts_in_order():
    from engine.eval.labels import MatchCounts

    n = MatchCounts(
        labelled=10, found=8, missing=2, ambiguous=1, errors=1, evaluated=7, unlabelled=3
    )
    assert n.rows() == [
        ("labelled images", 10),
        ("found in the run", 8),
        ("missing from the run", 2),
        ("excluded (status error)", 1),
        ("evaluated (status ok)", 7),
    ]
