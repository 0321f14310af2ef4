"""engine.train.distil: the teacher's pool (CSV or folder), refusing images the segmenter is
measured on, the held-out slice, area resizing, and the teacher targets themselves: the
teacher's served output centred on its threshold, cached by content. The training that uses
them: test_segmenter.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data import write_csv, write_png

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)

from engine.errors import ConfigError, ModelError  # noqa: E402
from engine.models import ModelSet, load_manifest, manifest_path  # noqa: E402
from engine.stages.segment import logit_threshold  # noqa: E402
from engine.train.data import decode_all  # noqa: E402
from engine.train.distil import (  # noqa: E402
    HELD_OUT_SHARE,
    area_resize,
    check_disjoint,
    held_out,
    pool_images,
    teacher_targets,
)
from engine.train.export import ort_run, ort_session  # noqa: E402
from engine.train.specs import classifier_manifest, segmenter_manifest  # noqa: E402


def pool(root: Path, n: int) -> list[Path]:
    return [write_png(root / "pool" / f"p{i}.png", seed=300 + i) for i in range(n)]


def test_the_pool_is_a_csv_relative_to_its_folder_or_a_folder(tmp_path):
    images = pool(tmp_path, 3)
    (tmp_path / "pool" / "notes.txt").write_text("not an image")
    listed = write_csv(tmp_path / "list.csv", [{"path": f"pool/{p.name}"} for p in images[:2]])
    assert pool_images(listed) == images[:2]
    assert pool_images(tmp_path / "pool") == images


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "absent", "no such file or folder"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no images"),
        (
            lambda root: write_csv(root / "l.csv", [{"path": "gone.png"}]),
            "1 image(s) not found",
        ),
        (lambda root: write_csv(root / "l.csv", [{"file": "a.png"}]), "missing column(s) path"),
    ],
)
def test_a_bad_pool_is_refused_saying_why(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pool_images(make(tmp_path))


def test_a_pool_holding_measured_images_is_refused(tmp_path):
    images = pool(tmp_path, 3)
    check_disjoint(images[:2], {"the mask pairs": [images[2]]})  # disjoint: fine
    alias = tmp_path / "pool" / ".." / "pool" / images[1].name  # the same file, another spelling
    with pytest.raises(ConfigError, match=r"holds 1 image\(s\) of labels.csv"):
        check_disjoint(images, {"the mask pairs": [], "labels.csv": [alias]})


def test_the_held_out_slice_is_seeded_and_about_five_percent():
    a, b, c = held_out(200, 0), held_out(200, 0), held_out(200, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.sum() == round(200 * HELD_OUT_SHARE)
    assert held_out(3, 0).sum() == 1  # never an empty slice


def test_area_resize_averages_blocks_and_keeps_the_same_size():
    prob = np.zeros((1, 1, 4, 4), np.float32)
    prob[0, 0, :2, :2] = 1.0
    prob[0, 0, 2:, 2:] = [[1.0, 0.0], [0.0, 0.0]]
    assert np.allclose(area_resize(prob, (2, 2))[0, 0], [[1.0, 0.0], [0.0, 0.25]])
    assert np.array_equal(area_resize(prob, (4, 4)), prob)


def test_targets_are_the_teacher_s_served_probability_centred_on_its_threshold(
    tmp_path, tiny_models_dir
):
    images = pool(tmp_path, 5)
    (tmp_path / "pool" / "p2.png").write_bytes(b"not a png")  # dropped, as the engine drops it
    student = segmenter_manifest("tiny-unet", trained=False)
    data = teacher_targets(tiny_models_dir, student, images, threads=1, cache=tmp_path / "c")
    assert data.paths == [images[i] for i in (0, 1, 3, 4)]
    teacher = load_manifest(manifest_path(tiny_models_dir, "segmenter"))
    assert data.teacher == {"architecture": teacher.architecture, "sha256": teacher.sha256}
    # the same arithmetic, done here independently: the teacher's served input and output
    models = ModelSet(
        segmenter=teacher, classifier=classifier_manifest("tiny-classifier", trained=False)
    )
    served = decode_all(data.paths, models, threads=1)
    logits = ort_run(ort_session(teacher.onnx_path, 1), served.seg_input)["mask_logit"]
    expected = 1 / (1 + np.exp(-(logits - logit_threshold(teacher.threshold))))
    assert data.target.shape == data.x.shape == (4, 1, *student.preprocess.size)
    assert np.allclose(data.target, expected, atol=1e-6)
    assert np.array_equal(data.x, served.seg_input)  # same size family: the same input
    # a second run reads the cache; a changed pool image makes a new entry
    again = teacher_targets(tiny_models_dir, student, images, threads=1, cache=tmp_path / "c")
    assert np.array_equal(again.target, data.target) and again.paths == data.paths
    assert len(list((tmp_path / "c").glob("teacher-*.npz"))) == 1
    write_png(images[0], seed=999)
    teacher_targets(tiny_models_dir, student, images, threads=1, cache=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("teacher-*.npz"))) == 2


def test_chunks_give_the_same_targets_and_a_pool_that_never_decodes_is_refused(
    tmp_path, tiny_models_dir, monkeypatch
):
    import engine.train.distil as distil

    images = pool(tmp_path, 5)
    (tmp_path / "pool" / "p1.png").write_bytes(b"broken")
    student = segmenter_manifest("tiny-unet", trained=False)
    whole = teacher_targets(tiny_models_dir, student, images, threads=1)
    monkeypatch.setattr(distil, "CHUNK", 2)  # chunks [p0, p1 (bad)], [p2, p3], [p4]
    chunked = teacher_targets(tiny_models_dir, student, images, threads=1)
    assert chunked.paths == whole.paths == [images[i] for i in (0, 2, 3, 4)]
    assert np.array_equal(chunked.target, whole.target) and np.array_equal(chunked.x, whole.x)
    for p in images:
        p.write_bytes(b"broken")
    with pytest.raises(ConfigError, match="none of the 5 --teacher-images could be decoded"):
        teacher_targets(tiny_models_dir, student, images, threads=1)


def test_a_teacher_folder_without_a_segmenter_is_refused(tmp_path):
    student = segmenter_manifest("tiny-unet", trained=False)
    with pytest.raises(ModelError, match="segmenter.json: model manifest not found"):
        teacher_targets(tmp_path, student, pool(tmp_path, 1), threads=1)
