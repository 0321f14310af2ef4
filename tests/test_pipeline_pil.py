"""engine/pipeline_pil.py: the Pillow/NumPy preprocessor computes DALI's numbers (to float32
rounding on full decodes; within stated bounds with a draft JPEG decode), reports bad images and
keeps the rest, and refuses what it cannot do (the GPU, batches it was not sized for).

The other side of the comparison, DALI against a Pillow reference, is tests/test_pipeline.py.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import archive_files, benchmarks_importable, dev_images
from PIL import Image

from engine.errors import ConfigError, ImageError
from engine.pipeline import Sample
from engine.pipeline_pil import PilPreprocessor, resize_edge

benchmarks_importable()
from benchmarks.make_archive import ArchiveSpec, make_archive  # noqa: E402

# Pillow preprocessor vs DALI, work image on [0, 1] (measured, Pillow 13 / DALI 2.4, x86, full
# sizes: work 512, segmenter 256):
#   full decode, all 288 dev images (8-bit PNG, JPEG) and 2048-3000 px 16-bit PNG, DICOM
#   pixels and JPEG: mean |err| <= 1.8e-7, p99 <= 4.2e-7, max <= 7.2e-7 (float32 rounding; the
#   same libjpeg-turbo IDCT) -> the lossless tolerances of test_pipeline.py;
#   draft=2 on 68 JPEGs of 2048-3000 px: mean <= 1.24e-3, p99 <= 2.7e-3, max 2.5e-2 (mostly a
#   different min/max stretch: an affine fit leaves 5e-4) -> bounds with ~4x headroom.
PIL_MEAN_TOL, PIL_P99_TOL = 1e-5, 1e-4
DRAFT_MEAN_TOL, DRAFT_P99_TOL = 5e-3, 1e-2


def _errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.mean()), float(np.percentile(d, 99))


def _full_size(models):
    """Tiny manifests with the full architectures' preprocessing (work 512, segmenter 256)."""
    c, s = models.classifier, models.segmenter
    return replace(
        models,
        classifier=replace(c, crop=replace(c.crop, source_size=512)),
        segmenter=replace(s, preprocess=replace(s.preprocess, size=(256, 256))),
    )


def _samples(paths):
    from engine.io.dicom import decode_dicom
    from engine.pipeline import Sample

    out = []
    for p in paths:
        data = Path(p).read_bytes()
        if data[128:132] == b"DICM":
            out.append(Sample(pixels=decode_dicom(data).pixels))
        else:
            out.append(Sample(encoded=np.frombuffer(data, np.uint8)))
    return out


def test_pillow_preprocessor_matches_dali(bench_archive, tiny_models):
    from engine.pipeline import Preprocessor
    from engine.pipeline_pil import PilPreprocessor

    models = _full_size(tiny_models)
    paths = dev_images(12) + archive_files(bench_archive)  # 8-bit PNG/JPEG, 16-bit PNG, DICOM
    samples = _samples(paths)
    dali = Preprocessor(models, batch_size=len(samples), threads=2).run(samples)
    pil = PilPreprocessor(models, batch_size=len(samples), threads=2).run(samples)
    assert pil.ok == dali.ok == list(range(len(samples)))
    std = models.segmenter.preprocess.std[0]
    for i, path in enumerate(paths):
        mean, p99 = _errors(pil.work[i], dali.work[i])
        assert mean <= PIL_MEAN_TOL and p99 <= PIL_P99_TOL, (path.name, mean, p99)
        mean, p99 = _errors(pil.seg_input[i], dali.seg_input[i])
        assert mean <= PIL_MEAN_TOL / std and p99 <= PIL_P99_TOL / std, (path.name, mean, p99)


def test_pillow_draft_decode_is_close_to_dali_on_large_jpegs(tiny_models, tmp_path):
    from engine.pipeline import Preprocessor
    from engine.pipeline_pil import PilPreprocessor

    spec = ArchiveSpec(
        out=str(tmp_path / "big"),
        count=2,
        formats=("jpeg",),
        long_side=(2048, 2200),
        seed=5,
        source=str(dev_images(1)[0].parent),
    )
    make_archive(spec, workers=1)
    samples = _samples(sorted((tmp_path / "big").rglob("*.jpg")))
    models = _full_size(tiny_models)
    dali = Preprocessor(models, batch_size=2, threads=2).run(samples)
    draft = PilPreprocessor(models, batch_size=2, threads=2, draft=2).run(samples)
    for i in range(2):
        mean, p99 = _errors(draft.work[i], dali.work[i])
        assert mean <= DRAFT_MEAN_TOL and p99 <= DRAFT_P99_TOL, (mean, p99)


def test_pillow_preprocessor_reports_bad_images_and_keeps_the_rest(tiny_models):
    from engine.pipeline import Sample
    from engine.pipeline_pil import PilPreprocessor

    good = _samples(dev_images(2))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, "PNG")
    truncated = Sample(encoded=np.frombuffer(buf.getvalue()[:40], np.uint8))
    garbage = Sample(encoded=np.frombuffer(b"not an image at all", np.uint8))
    pre = PilPreprocessor(tiny_models, batch_size=4, threads=2)
    out = pre.run([good[0], truncated, garbage, good[1]])
    assert out.ok == [0, 3] and set(out.errors) == {1, 2}
    assert all("cannot decode" in m for m in out.errors.values())
    assert out.work.shape == (2, 128, 128) and out.seg_input.shape == (2, 1, 64, 64)
    with pytest.raises(ImageError):
        pre.run_one(garbage)


def test_pillow_preprocessor_is_cpu_only(tiny_models):
    with pytest.raises(ConfigError, match="runs on the CPU only, not 'gpu'"):
        PilPreprocessor(tiny_models, device="gpu", batch_size=1, threads=1)
    pre = PilPreprocessor(tiny_models, batch_size=1, threads=1)
    with pytest.raises(ConfigError, match="run_device needs DALI on the GPU"):
        pre.run_device(_samples(dev_images(1)))
    pre.close()


def test_pillow_preprocessor_refuses_batches_it_was_not_sized_for(tiny_models):
    pre = PilPreprocessor(tiny_models, batch_size=2, threads=1)
    one = Sample(pixels=np.full((40, 30), 1000, np.uint16))
    with pytest.raises(ValueError, match="empty batch"):
        pre.run([])
    with pytest.raises(ValueError, match="batch of 3 exceeds the pipeline's 2"):
        pre.run([one] * 3)
    with pytest.raises(ValueError, match="needs encoded bytes or pixels"):
        pre.run_one(Sample())
    pre.close()


def test_a_batch_of_bad_images_only_gives_errors_and_empty_arrays(tiny_models):
    bad = Sample(encoded=np.frombuffer(b"not an image at all", np.uint8))
    out = PilPreprocessor(tiny_models, batch_size=2, threads=1).run([bad, bad])
    assert out.ok == [] and set(out.errors) == {0, 1}
    assert out.work.shape == (0, 0, 0) and out.seg_input.shape == (0, 1, 0, 0)


def test_fullrange_keeps_absolute_intensity_and_minmax_stretches(tiny_models):
    c = tiny_models.classifier
    fullrange = replace(
        tiny_models, classifier=replace(c, preprocess=replace(c.preprocess, intensity="fullrange"))
    )
    pixels = np.full((50, 40), 16384, np.uint16)
    pixels[:, 20:] = 32768
    sample = Sample(pixels=pixels)
    work, seg = PilPreprocessor(fullrange, batch_size=1, threads=1).run_one(sample)
    side = c.crop.source_size
    assert work.shape == (side, side) and work.dtype == np.float32
    assert np.isclose(work.min(), 16384 / 65535, atol=1e-6)
    assert np.isclose(work.max(), 32768 / 65535, atol=1e-6)
    work, seg = PilPreprocessor(tiny_models, batch_size=1, threads=1).run_one(sample)
    assert (work.min(), work.max()) == (0.0, 1.0)  # minmax: stretched to [0, 1]
    s = tiny_models.segmenter.preprocess
    assert seg.shape == (1, *s.size)
    np.testing.assert_allclose(seg.min(), (0.0 - s.mean[0]) / s.std[0], atol=1e-6)


def test_resize_edge_puts_8_bit_on_the_16_bit_scale_and_replicates_the_border():
    flat = resize_edge(np.full((30, 20), 200, np.uint8), (64, 64))
    assert flat.shape == (64, 64) and flat.dtype == np.float32
    np.testing.assert_allclose(flat, 200 * 257.0)  # edge replication: no darker border
    ramp = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (8, 1))  # 8 x 100
    same = resize_edge(ramp, (8, 100))
    np.testing.assert_allclose(same, ramp, atol=1e-3)  # the same size: the same pixels
    half = resize_edge(ramp.astype(np.float32), (4, 50))
    assert half.shape == (4, 50) and np.all(np.diff(half[0]) > 0)  # still a ramp
