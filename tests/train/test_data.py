"""engine.train.data: the labels and mask tables (each error names the file, line or column),
decoding through the engine's own Preprocessor (a bad image is listed, not fatal), masks,
box jitter and the crops, which are the serving crop code's.

Also the builders the other train test files share: small gray PNGs and the labelled folders
and tables around them (`from test_data import write_png, labelled_set`). Everything is
synthetic and written under tmp_path; decoding uses the tiny untrained models.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import ConfigError, ImageError
from engine.train.data import (
    crops01,
    decode_all,
    find_mask_pairs,
    jitter_boxes,
    labels_split,
    load_mask,
    log,
    normalise,
    read_labels,
    read_sample,
    read_table,
)
from engine.train.specs import classifier_manifest

# --- builders ---------------------------------------------------------------------------------


def write_png(path: Path, seed: int, shape: tuple[int, int] = (40, 48)) -> Path:
    """A gray 8-bit PNG of noise with a brighter block (so images differ and have structure)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 160, shape, dtype=np.uint8)
    h, w = shape
    pixels[h // 4 : 3 * h // 4, w // 5 : w // 2] += 90
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def labelled_set(
    root: Path,
    patients: int,
    *,
    source: str | None = "site-a",
    prefix: str = "p",
    seed: int = 0,
    images_per_patient: int = 1,
) -> Path:
    """root/labels.csv over root/images/*.png: `patients` patients, labels alternating 1, 0;
    returns the CSV (its 'path' column is relative to root). source None: no source column."""
    rows = []
    for i in range(patients):
        for j in range(images_per_patient):
            rel = f"images/{prefix}{i}_{j}.png"
            write_png(root / rel, seed=seed * 1000 + i * 10 + j)
            row: dict[str, object] = {
                "path": rel,
                "label": (i + 1) % 2,
                "patient_id": f"{prefix}{i}",
            }
            if source is not None:
                row["source"] = source
            rows.append(row)
    return write_csv(root / "labels.csv", rows)


# --- tables ------------------------------------------------------------------------------------


def test_read_table_names_the_file_and_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.csv: CSV file not found"):
        read_table(tmp_path / "nowhere.csv", ("path",))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,1\n")
    with pytest.raises(ConfigError, match=r"bad.csv: missing column\(s\) path, patient_id"):
        read_table(bad, ("path", "label", "patient_id"))
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    with pytest.raises(ConfigError, match="empty.csv: no rows below the header"):
        read_table(empty, ("path",))
    good = tmp_path / "good.csv"
    good.write_text("path,label,extra\na.png,1,x\nb.png,0,y\n")
    assert read_table(good, ("path", "label")) == [
        {"path": "a.png", "label": "1", "extra": "x"},
        {"path": "b.png", "label": "0", "extra": "y"},
    ]


def test_read_labels_resolves_paths_and_fills_in_patient_and_source(tmp_path):
    write_png(tmp_path / "images" / "a.png", 0)
    write_png(tmp_path / "images" / "b.png", 1)
    csv_path = write_csv(
        tmp_path / "labels.csv",
        [
            {"path": "images/a.png", "label": " 1", "patient_id": "p1"},
            {"path": "images/b.png", "label": "0", "patient_id": "  "},
        ],
    )
    a, b = read_labels(csv_path, tmp_path)
    assert a.path == tmp_path / "images" / "a.png" and a.rel == "images/a.png"
    assert (a.label, a.patient_id, a.source) == (1, "p1", "")
    # an image without a patient id is its own patient
    assert (b.label, b.patient_id) == (0, "image:images/b.png")


def test_read_labels_refuses_bad_labels_by_line_and_missing_images_by_count(tmp_path):
    write_png(tmp_path / "a.png", 0)
    bad = write_csv(
        tmp_path / "bad.csv",
        [
            {"path": "a.png", "label": "1", "patient_id": "p"},
            {"path": "a.png", "label": "yes", "patient_id": "q"},
        ],
    )
    with pytest.raises(ConfigError, match=r"bad.csv: line 3: label 'yes' is not 0 or 1"):
        read_labels(bad, tmp_path)
    absent = write_csv(
        tmp_path / "absent.csv",
        [{"path": f"{n}.png", "label": "0", "patient_id": n} for n in ("a", "x", "y")],
    )
    with pytest.raises(ConfigError, match=r"2 image\(s\) not found under .* \(e.g. x.png\)"):
        read_labels(absent, tmp_path)


def test_labels_split_gives_every_patient_one_part_by_seed(tmp_path):
    from engine.train.splits import SPLITS

    rows = [{"label": i % 2, "patient_id": f"p{i // 2}"} for i in range(40)]  # 2 images each
    rows.append({"label": 0, "patient_id": ""})  # no patient: not in the split
    labels = write_csv(tmp_path / "l.csv", rows)
    split = labels_split(labels, seed=0)
    assert set(split) == {f"p{i}" for i in range(20)}
    assert set(split.values()) == set(SPLITS)
    assert labels_split(labels, seed=0) == split
    assert labels_split(labels, seed=1) != split
    bad = write_csv(tmp_path / "bad.csv", [{"label": "2", "patient_id": "p"}])
    with pytest.raises(ConfigError, match="line 2: label '2' is not 0 or 1"):
        labels_split(bad, seed=0)


# --- mask pairs ----------------------------------------------------------------------------------


def test_mask_pairs_from_an_index_csv_a_folder_with_one_or_the_plain_layout(tmp_path, capsys):
    root = tmp_path / "masks"
    for name in ("a", "b"):
        write_png(root / "images" / f"{name}.png", 0)
        write_png(root / "masks" / f"{name}_mask.png", 1)
    write_png(root / "images" / "c.png", 2)  # no mask: left out
    plain = find_mask_pairs(root)
    assert [p.image.name for p in plain] == ["a.png", "b.png"]
    assert [p.mask.name for p in plain] == ["a_mask.png", "b_mask.png"]
    assert plain[0].patient_id == "image:a.png" and plain[0].label is None
    assert "every image counts as its own patient" in capsys.readouterr().err

    index = write_csv(
        root / "index.csv",
        [
            {"image_path": "images/a.png", "mask_path": "masks/a_mask.png", "patient_id": "P",
             "label": "1", "source": "s"},
            {"image_path": "images/b.png", "mask_path": "masks/b_mask.png", "patient_id": "",
             "label": "", "source": ""},
        ],
    )  # fmt: skip
    for given in (root, index):  # the folder holding index.csv, or the CSV itself
        a, b = find_mask_pairs(given)
        assert a.image == root / "images" / "a.png" and a.mask == root / "masks" / "a_mask.png"
        assert (a.patient_id, a.label, a.source) == ("P", 1, "s")
        assert (b.patient_id, b.label) == ("image:images/b.png", None)


def test_mask_pairs_errors_say_what_is_wrong(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no image/mask pairs found"):
        find_mask_pairs(tmp_path / "empty")
    index = write_csv(
        tmp_path / "index.csv", [{"image_path": "gone.png", "mask_path": "gone_mask.png"}]
    )
    with pytest.raises(ConfigError, match="gone.png not found; image_path and mask_path are rel"):
        find_mask_pairs(index)
    cols = write_csv(tmp_path / "cols.csv", [{"image": "a.png"}])
    with pytest.raises(ConfigError, match=r"missing column\(s\) image_path, mask_path"):
        find_mask_pairs(cols)


def test_load_mask_resizes_and_binarises(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255  # left half lung
    Image.fromarray(mask).save(tmp_path / "m.png")
    small = load_mask(tmp_path / "m.png", (4, 2))
    assert small.dtype == np.float32 and small.shape == (4, 2)
    np.testing.assert_array_equal(small, [[1, 0]] * 4)
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png", (8, 8)), mask / 255)
    (tmp_path / "text.png").write_text("no image")
    with pytest.raises(ConfigError, match="text.png: cannot read this mask"):
        load_mask(tmp_path / "text.png", (4, 4))


# --- reading and decoding ------------------------------------------------------------------------


def test_read_sample_leaves_png_encoded_and_decodes_dicom(tmp_path):
    from conftest import dicom_file

    png = write_png(tmp_path / "a.png", 0)
    sample = read_sample(png)
    assert sample.pixels is None and sample.encoded is not None
    assert sample.encoded.tobytes() == png.read_bytes()
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 100
    dcm = tmp_path / "a.dcm"
    dcm.write_bytes(dicom_file(pixels, sop_uid="1.2.3.4", study_uid="1.2.3", patient_id="p"))
    decoded = read_sample(dcm)
    assert decoded.encoded is None and decoded.pixels is not None
    # decoded on the CPU as the reader does (stretched to the uint16 range, order kept)
    assert decoded.pixels.shape == (8, 8) and decoded.pixels.dtype == np.uint16
    assert (np.diff(decoded.pixels.reshape(-1).astype(np.int64)) > 0).all()
    with pytest.raises(ImageError, match="cannot read"):
        read_sample(tmp_path / "missing.png")


def test_decode_all_lists_bad_images_by_index_and_batches_do_not_matter(tiny_models, tmp_path):
    paths = [write_png(tmp_path / f"{i}.png", i, (30 + i, 40)) for i in range(4)]
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    paths.insert(2, tmp_path / "bad.png")
    paths.append(tmp_path / "missing.png")
    dec = decode_all(paths, tiny_models, threads=1, batch_size=2)
    assert dec.ok == [0, 1, 3, 4]
    assert set(dec.errors) == {2, 5} and "cannot read" in dec.errors[5]
    side = tiny_models.classifier.crop.source_size
    assert dec.work.shape == (4, side, side) and dec.seg_input.shape == (4, 1, 64, 64)
    assert dec.work.min() >= 0.0 and dec.work.max() <= 1.0
    again = decode_all([paths[i] for i in dec.ok], tiny_models, threads=1, batch_size=16)
    np.testing.assert_array_equal(again.work, dec.work)
    np.testing.assert_array_equal(again.seg_input, dec.seg_input)


def test_decode_all_with_nothing_decodable(tiny_models, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    with pytest.raises(ConfigError, match="none of the 2 images could be decoded"):
        decode_all(paths, tiny_models, threads=1)
    empty = decode_all(paths, tiny_models, threads=1, require_any=False)
    assert empty.ok == [] and set(empty.errors) == {0, 1}
    assert empty.work.shape[0] == 0 and empty.seg_input.shape[0] == 0


# --- boxes and crops -----------------------------------------------------------------------------


def test_jitter_boxes_is_seeded_bounded_and_the_identity_when_off():
    boxes = np.array(
        [[0.2, 0.1, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.6, 0.55]], np.float32
    )
    a = jitter_boxes(boxes, np.random.default_rng(3))
    b = jitter_boxes(boxes, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and not np.array_equal(a[0], boxes[0])
    assert (a >= 0).all() and (a <= 1).all()
    assert (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()
    off = jitter_boxes(boxes, np.random.default_rng(0), scale=0, shift=0)
    np.testing.assert_allclose(off, boxes, atol=1e-6)  # up to float rounding of centre +- half
    # scale alone keeps the centre and stays within 1 +- scale of each side
    many = np.repeat(boxes[:1], 200, axis=0)
    s = jitter_boxes(many, np.random.default_rng(1), scale=0.1, shift=0.0)
    np.testing.assert_allclose((s[:, 0] + s[:, 2]) / 2, 0.5, atol=1e-6)
    width = (s[:, 2] - s[:, 0]) / 0.6
    assert width.min() >= 0.9 - 1e-6 and width.max() <= 1.1 + 1e-6 and width.std() > 0.01
    # a box squeezed against an edge keeps a sliver of image
    edge = jitter_boxes(np.array([[0.3, 0.0, 0.5, 0.0]], np.float32), np.random.default_rng(0))
    assert edge[0, 3] - edge[0, 1] >= 0.01 - 1e-7


def test_box_transforms_are_seeded_draws_of_the_box_jitter():
    from engine.train.data import box_transforms

    t = box_transforms(4, 0, scale=0.08, shift=0.05)
    assert t == box_transforms(4, 0, scale=0.08, shift=0.05) != box_transforms(4, 1)
    assert len(t) == 4 and all(len(x) == 4 for x in t)
    a = np.array(t)
    assert (np.abs(a[:, :2] - 1) <= 0.08).all() and (np.abs(a[:, 2:]) <= 0.05).all()
    assert len({tuple(x) for x in t}) == 4  # four different crops
    assert box_transforms(2, 0, scale=0.0, shift=0.0) == ((1.0, 1.0, 0.0, 0.0),) * 2


def test_crops_are_the_serving_crop_before_and_after_normalisation():
    from kernels.reference import crop_resize_normalize

    clf = classifier_manifest("tiny-classifier", trained=False)
    pre = clf.preprocess
    rng = np.random.default_rng(0)
    work = rng.random((3, 128, 128), dtype=np.float32)
    boxes = np.array([[0.1, 0.2, 0.7, 0.9], [0, 0, 1, 1], [0.4, 0.4, 0.6, 0.6]], np.float32)
    x01 = crops01(work, boxes, clf)
    assert x01.shape == (3, 1, *pre.size) and x01.min() >= 0 and x01.max() <= 1
    np.testing.assert_allclose(normalise(x01, clf), (x01 - 0.5) / 0.25, rtol=1e-6)
    from engine.train.data import classifier_inputs

    served = crop_resize_normalize(work, boxes, pre.size, pre.mean, pre.std)
    np.testing.assert_allclose(classifier_inputs(work, boxes, clf), served, atol=1e-5)
    flat = crops01(np.full((1, 128, 128), 0.25, np.float32), boxes[:1], clf)
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)


def test_log_stamps_each_line_on_stderr(capsys):
    log("hello there")
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.endswith("s] hello there\n") and out.err.startswith("[")
