"""engine.train.cache: the crop cache: one entry per labelled set, named by a hash of what its
arrays depend on, holding memory-mapped working images, served classifier inputs and lung masks
exactly as `cxr screen` makes them; undecodable images marked, not fatal; a complete entry
reopened without decoding; a killed build resumed by chunk to the same arrays.

Synthetic PNGs and the tiny untrained models (tests/conftest.py's tiny_models), under tmp_path;
the same on real images with the shipped segmenter: tests/train/test_train_multiset.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from test_data import labelled_set

from engine.train import cache as cache_mod
from engine.train.data import read_labels
from engine.train.datasets import LabelSet

N = 6
BAD = 2  # the row whose file is not an image


@pytest.fixture(scope="module")
def label_set(tmp_path_factory) -> LabelSet:
    root = tmp_path_factory.mktemp("cache-set") / "site-set"
    labels = labelled_set(root, N, prefix="c")
    (root / f"images/c{BAD}_0.png").write_bytes(b"this is not a PNG")
    return LabelSet(labels, root)


@pytest.fixture(scope="module")
def built(label_set, tiny_models, tmp_path_factory):
    images = read_labels(label_set.labels, label_set.images)
    cache_dir = tmp_path_factory.mktemp("cache")
    seg, clf = tiny_models.segmenter, tiny_models.classifier
    crops = cache_mod.open_or_build(cache_dir, label_set, images, seg, clf, threads=1)
    return crops, images, cache_dir


def _served(tiny_models, images):
    """What `cxr screen` computes for the images that decode: work, mask logits, crops."""
    from engine.runtime.onnxrt import OnnxRuntimeBackend
    from engine.stages.crop import lung_crops
    from engine.stages.segment import segment
    from engine.train.data import decode_all

    dec = decode_all([im.path for im in images], tiny_models, threads=1)
    seg = tiny_models.segmenter
    with OnnxRuntimeBackend(seg, threads=1) as backend:
        logits = segment(backend, seg, dec.seg_input)
    return dec, logits, lung_crops(dec.work, logits, seg, tiny_models.classifier)


def test_entry_layout_shapes_and_memory_maps(built, label_set, tiny_models):
    crops, images, cache_dir = built
    key = cache_mod.entry_key(label_set, tiny_models.segmenter, tiny_models.classifier)
    assert crops.directory == cache_dir / f"site-set-{key}" and len(key) == 16
    names = {p.name for p in crops.directory.iterdir()}
    assert {"work.u8.npy", "inputs.f32.npy", "mask.u8.npy", "boxes.npy", "fraction.npy"} <= names
    assert {"ok.npy", "errors.json", "meta.json", "progress.json"} <= names
    meta = json.loads((crops.directory / "meta.json").read_text())
    assert meta == {"images": N, "ok": N - 1, "version": cache_mod.CACHE_VERSION}
    clf, seg = tiny_models.classifier, tiny_models.segmenter
    side = clf.crop.source_size
    assert crops.work.shape == (N, side, side) and crops.work.dtype == np.uint8
    assert crops.inputs.shape == (N, 1, *clf.preprocess.size) and crops.inputs.dtype == np.float32
    assert crops.masks.shape == (N, *seg.preprocess.size) and crops.masks.dtype == np.uint8
    assert crops.boxes.shape == (N, 4) and crops.fraction.shape == (N,)
    for big in (crops.work, crops.inputs, crops.masks):
        assert isinstance(big, np.memmap)  # not read into memory
        with pytest.raises(ValueError):
            big[0] = 0  # opened read-only


def test_cached_arrays_are_what_screening_computes(built, tiny_models):
    crops, images, _ = built
    dec, logits, served = _served(tiny_models, images)
    ok = np.flatnonzero(crops.ok)
    assert ok.tolist() == [i for i in range(N) if i != BAD]
    assert list(crops.errors) == [BAD] and "not a PNG" in crops.errors[BAD]
    np.testing.assert_array_equal(crops.inputs[ok], served.classifier_input)
    np.testing.assert_array_equal(crops.boxes[ok], served.boxes)
    np.testing.assert_array_equal(crops.fraction[ok], served.fraction)
    # the working image to the nearest grey level (half a level at most)
    assert np.abs(crops.work[ok] / 255.0 - dec.work).max() <= 0.5 / 255 + 1e-6
    from engine.stages.segment import logit_threshold

    want = logits >= logit_threshold(tiny_models.segmenter.threshold)
    np.testing.assert_array_equal(crops.masks[ok], want)
    np.testing.assert_allclose(crops.masks[ok].mean(axis=(1, 2)), crops.fraction[ok], atol=1e-6)
    # the row that could not be decoded stays zero
    assert not crops.work[BAD].any() and not crops.inputs[BAD].any()
    assert not crops.masks[BAD].any() and not crops.boxes[BAD].any()


def test_complete_entry_is_opened_not_rebuilt(built, label_set, tiny_models, monkeypatch):
    crops, images, cache_dir = built

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "decode_all", no_decode)
    seg, clf = tiny_models.segmenter, tiny_models.classifier
    again = cache_mod.open_or_build(cache_dir, label_set, images, seg, clf, threads=1)
    assert again.directory == crops.directory and again.errors == crops.errors
    np.testing.assert_array_equal(again.inputs, crops.inputs)
    np.testing.assert_array_equal(again.ok, crops.ok)
    # an entry for another number of images is refused, not read past its end
    with pytest.raises(ValueError, match=f"holds {N} images, the labels CSV {N - 1}"):
        cache_mod.open_or_build(cache_dir, label_set, images[:-1], seg, clf, threads=1)


def test_a_classifier_without_crop_is_refused(built, label_set, tiny_models, tmp_path):
    _, images, _ = built
    clf = replace(tiny_models.classifier, crop=None)
    with pytest.raises(ValueError, match="no crop section"):
        cache_mod.open_or_build(tmp_path, label_set, images, tiny_models.segmenter, clf, threads=1)
    assert not any(tmp_path.iterdir())


def test_entry_key_changes_with_what_the_arrays_depend_on(
    label_set, tiny_models, tmp_path, monkeypatch
):
    seg, clf = tiny_models.segmenter, tiny_models.classifier
    key = cache_mod.entry_key(label_set, seg, clf)
    assert cache_mod.entry_key(label_set, seg, replace(clf, threshold=0.9)) == key  # not used
    copy = tmp_path / "labels.csv"
    copy.write_bytes(label_set.labels.read_bytes())
    assert cache_mod.entry_key(LabelSet(copy, label_set.images), seg, clf) == key  # bytes, not path
    copy.write_bytes(label_set.labels.read_bytes() + b"x.png,0,p9,site-a\n")
    pre = replace(clf.preprocess, mean=(0.4,))
    others = [
        cache_mod.entry_key(LabelSet(copy, label_set.images), seg, clf),
        cache_mod.entry_key(LabelSet(label_set.labels, tmp_path), seg, clf),
        cache_mod.entry_key(label_set, replace(seg, sha256="0" * 64), clf),
        cache_mod.entry_key(label_set, replace(seg, threshold=0.3), clf),
        cache_mod.entry_key(label_set, seg, replace(clf, preprocess=pre)),
        cache_mod.entry_key(label_set, seg, replace(clf, crop=replace(clf.crop, margin=0.2))),
    ]
    assert key not in others and len(set(others)) == len(others)
    # an entry of an older cache layout is never opened: the version is part of the name
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", cache_mod.CACHE_VERSION - 1)
    assert cache_mod.entry_key(label_set, seg, clf) != key


def test_a_killed_build_resumes_at_its_chunk_to_the_same_arrays(
    built, label_set, tiny_models, tmp_path, monkeypatch
):
    crops, images, _ = built
    seg, clf = tiny_models.segmenter, tiny_models.classifier
    monkeypatch.setattr(cache_mod, "CHUNK", 2)
    real = cache_mod.decode_all
    decoded: list[int] = []

    def dies_on_chunk_three(paths, *a, **k):
        if len(decoded) == 4:
            raise KeyboardInterrupt
        decoded.extend(range(len(decoded), len(decoded) + len(paths)))
        return real(paths, *a, **k)

    monkeypatch.setattr(cache_mod, "decode_all", dies_on_chunk_three)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.open_or_build(tmp_path, label_set, images, seg, clf, threads=1)
    entry = next(tmp_path.iterdir())
    assert json.loads((entry / "progress.json").read_text()) == {"done": 4}
    assert not (entry / "meta.json").exists()  # incomplete: not opened as it is

    calls: list[int] = []

    def counts(paths, *a, **k):
        calls.append(len(paths))
        return real(paths, *a, **k)

    monkeypatch.setattr(cache_mod, "decode_all", counts)
    resumed = cache_mod.open_or_build(tmp_path, label_set, images, seg, clf, threads=1)
    assert calls == [2]  # only the last chunk
    for name in ("work", "inputs", "masks", "boxes", "fraction", "ok"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(crops, name), err_msg=name)
    assert resumed.errors == crops.errors  # the bad image of the first chunks is remembered
