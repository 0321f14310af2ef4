"""engine.pipeline (DALI, CPU mode) against a Pillow/NumPy reference of the same preprocessing.

Reference, per image: decode with Pillow to gray on the 16-bit scale (8-bit values * 257, 16-bit
as is, colour through Pillow's "L"), float32, resize to S x S with Pillow BILINEAR on mode "F",
then the intensity mode ("minmax": stretch to [0, 1]; "fullrange": / 65535) -> ``work``; then
resize(work, segmenter size), (x - mean) / std -> ``seg_input``.

One convention had to be matched, not tolerated: at the image border DALI's antialiased linear
resize clamps its filter to the edge pixel (edge replication), while Pillow renormalises the
filter over the pixels inside the image. Plain Pillow therefore differs from DALI on the outer
ring of output pixels only (measured up to 0.15 there on real 1024-px images, mean 1e-3 overall);
the reference pads the image by edge replication and resizes the original box, which states
DALI's convention and makes the rest of the comparison exact to float32 rounding.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import ConfigError, ImageError
from engine.models import CropSpec, ModelSet, Preprocess, init_models
from engine.pipeline import Preprocessor, Sample, decoder_message

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CXR_DATA", REPO.parent / "shared" / "data"))
IMAGES = DATA / "cxr-dev" / "images"

# Tolerances on ``work`` ([0, 1] scale), per image. Measured on the 24 real dev images below
# (12 PNG, 12 JPEG, seed 0; DALI 2.4 CPU vs Pillow 13, x86):
#   PNG and JPEG: mean |err| <= 1.0e-7, p99 <= 3.6e-7, max <= 5.4e-7 (seg_input: 3.9e-7,
#                 1.2e-6, 1.4e-6): float32 rounding only. Both decoders are libjpeg-turbo with
#                 the same IDCT, so even JPEGs agree exactly. (Plain Pillow, without the edge
#                 padding: mean up to 3.2e-3, max 0.15 on the border ring.)
#   RGB/RGBA/palette -> gray: mean 1.2e-3..1.7e-3, p99 3.1e-3..4.8e-3, max <= 6.4e-3 after the
#                 min-max stretch (two images): DALI truncates 0.299 R + 0.587 G + 0.114 B
#                 to 8 bits where Pillow rounds, so they differ by 0 or 1 level (mean 0.5).
# Lossless sources: headroom of ~100x for float summation order changing between DALI
# versions; any real convention change (e.g. the border handling above) is 1000x larger.
LOSSLESS_MEAN_TOL = 1e-5
LOSSLESS_P99_TOL = 1e-4
# JPEG: DALI's own tests allow 4/255 per pixel between JPEG decoders; an IDCT change moves the
# mean far less than that.
JPEG_MEAN_TOL = 1.0 / 255
JPEG_P99_TOL = 4.0 / 255
# Colour -> gray: one 8-bit level of rounding, stretched by min-max (range < 255 levels).
COLOR_MEAN_TOL = 2.0 / 255
COLOR_P99_TOL = 4.0 / 255
# ``seg_input`` is (resized work - mean) / std: the same errors, scaled by 1 / std (checked
# per test with the segmenter's std), plus the same float32 rounding.

N_PER_FORMAT = 12
SEED = 0


def _need_data() -> None:
    if not IMAGES.is_dir():
        pytest.skip(f"real images not found at {IMAGES} (set CXR_DATA to the shared data folder)")


# --------------------------------------------------------------------------- reference


def gray16(img: Image.Image) -> np.ndarray:
    """Pillow decode -> float32 gray on the 0..65535 scale."""
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32)
    return np.asarray(img.convert("L"), np.float32) * 257.0


def resize_edge(a: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Pillow BILINEAR (antialiased) resize on mode "F", edge-replicated border (DALI's)."""
    h, w = a.shape
    oh, ow = out_hw
    pad = math.ceil(max(h / oh, w / ow)) + 2  # the filter reaches `scale` pixels out
    padded = np.pad(a.astype(np.float32), pad, mode="edge")
    out = Image.fromarray(padded, mode="F").resize(
        (ow, oh), Image.Resampling.BILINEAR, box=(pad, pad, pad + w, pad + h)
    )
    return np.asarray(out, np.float32)


def reference(a16: np.ndarray, models: ModelSet) -> tuple[np.ndarray, np.ndarray]:
    side = models.classifier.crop.source_size
    pre = models.classifier.preprocess
    seg = models.segmenter.preprocess
    work = resize_edge(a16, (side, side))
    if pre.intensity == "minmax":
        lo, hi = float(work.min()), float(work.max())
        work = (work - lo) / max(hi - lo, 1e-6)
    else:
        work = work / 65535.0
    seg_in = (resize_edge(work, seg.size) - seg.mean[0]) / seg.std[0]
    return work.astype(np.float32), seg_in[None].astype(np.float32)


def errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.mean()), float(np.percentile(d, 99))


def assert_close(got, want, mean_tol, p99_tol, what=""):
    mean, p99 = errors(got, want)
    assert mean <= mean_tol and p99 <= p99_tol, (
        f"{what}: mean |err| {mean:.3g} (tol {mean_tol:.3g}), p99 {p99:.3g} (tol {p99_tol:.3g})"
    )


def assert_matches_reference(
    out, i, a16, models, mean_tol=LOSSLESS_MEAN_TOL, p99_tol=LOSSLESS_P99_TOL, what=""
):
    """Image i of a preprocessor's output against the NumPy reference of the same pixels."""
    out_work, out_seg = out.work[i], out.seg_input[i]
    want_work, want_seg = reference(a16, models)
    assert out_work.shape == want_work.shape and out_seg.shape == want_seg.shape
    assert_close(out_work, want_work, mean_tol, p99_tol, f"{what} work")
    std = models.segmenter.preprocess.std[0]
    assert_close(out_seg, want_seg, mean_tol / std, p99_tol / std, f"{what} seg_input")


# --------------------------------------------------------------------------- fixtures


def encode(img: Image.Image, fmt: str = "PNG", **params) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return np.frombuffer(buf.getvalue(), np.uint8)


def file_sample(path: Path) -> Sample:
    return Sample(encoded=np.frombuffer(path.read_bytes(), np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelSet:
    return init_models(tmp_path_factory.mktemp("models"), size="tiny")


@pytest.fixture(scope="module")
def pipe(tiny) -> Preprocessor:
    return Preprocessor(tiny, device="cpu", batch_size=8, threads=2)


def with_intensity(models: ModelSet, intensity: str) -> ModelSet:
    c = models.classifier
    return replace(
        models, classifier=replace(c, preprocess=replace(c.preprocess, intensity=intensity))
    )


@pytest.fixture(scope="module")
def fullrange(tiny) -> tuple[ModelSet, Preprocessor]:
    models = with_intensity(tiny, "fullrange")
    return models, Preprocessor(models, device="cpu", batch_size=2, threads=1)


@pytest.fixture(scope="module")
def real_files() -> dict[str, list[Path]]:
    _need_data()
    rng = np.random.default_rng(SEED)
    picked = {}
    for ext in ("png", "jpg"):
        files = sorted(IMAGES.glob(f"*.{ext}"))
        if len(files) < N_PER_FORMAT:
            pytest.skip(f"need {N_PER_FORMAT} .{ext} images in {IMAGES}")
        picked[ext] = [
            files[i] for i in sorted(rng.choice(len(files), N_PER_FORMAT, replace=False))
        ]
    return picked


@pytest.fixture(scope="module")
def real_gray(real_files) -> Image.Image:
    """One real 8-bit gray radiograph (not square)."""
    for p in real_files["png"]:
        img = Image.open(p)
        if img.mode == "L" and img.width != img.height:
            return img.copy()
    return Image.open(real_files["png"][0]).convert("L")


# --------------------------------------------------------------------------- real images


@pytest.mark.parametrize(
    "ext,mean_tol,p99_tol",
    [
        pytest.param("png", LOSSLESS_MEAN_TOL, LOSSLESS_P99_TOL, id="png"),
        pytest.param("jpg", JPEG_MEAN_TOL, JPEG_P99_TOL, id="jpeg"),
    ],
)
def test_real_images_match_reference(pipe, tiny, real_files, ext, mean_tol, p99_tol):
    files = real_files[ext]
    sizes = {Image.open(p).size for p in files}
    assert len(sizes) > 2, "the selection should mix image sizes"
    for start in range(0, len(files), pipe.batch_size):
        chunk = files[start : start + pipe.batch_size]
        out = pipe.run([file_sample(p) for p in chunk])
        assert out.ok == list(range(len(chunk))) and out.errors == {}
        side = tiny.classifier.crop.source_size
        h, w = tiny.segmenter.preprocess.size
        assert out.work.shape == (len(chunk), side, side) and out.work.dtype == np.float32
        assert out.seg_input.shape == (len(chunk), 1, h, w) and out.seg_input.dtype == np.float32
        for i, p in enumerate(chunk):
            work = out.work[i]
            assert math.isclose(work.min(), 0.0, abs_tol=1e-6)
            assert math.isclose(work.max(), 1.0, abs_tol=1e-6)
            a16 = gray16(Image.open(p))
            assert_matches_reference(out, i, a16, tiny, mean_tol, p99_tol, what=p.name)


def test_batch_of_n_mixed_sizes_equals_each_alone(pipe, real_files):
    files = real_files["png"][:4] + real_files["jpg"][:4]
    assert len({Image.open(p).size for p in files}) > 2
    batch = pipe.run([file_sample(p) for p in files])
    for i, p in enumerate(files):
        alone = pipe.run([file_sample(p)])
        assert alone.ok == [0] and alone.work.shape[0] == 1
        np.testing.assert_array_equal(batch.work[i], alone.work[0], err_msg=p.name)
        np.testing.assert_array_equal(batch.seg_input[i], alone.seg_input[0], err_msg=p.name)


def test_uniform_image_gives_zeros_not_nan(pipe, tiny):
    flat = Image.new("L", (50, 70), 123)
    out = pipe.run([Sample(encoded=encode(flat))])
    assert np.isfinite(out.work).all() and np.isfinite(out.seg_input).all()
    np.testing.assert_array_equal(out.work, 0.0)
    seg = tiny.segmenter.preprocess
    np.testing.assert_allclose(out.seg_input, (0.0 - seg.mean[0]) / seg.std[0], atol=1e-6)


def test_small_image_is_upscaled_like_reference(pipe, tiny, real_gray):
    small = real_gray.crop((100, 80, 137, 103))  # 37 x 23: upscaled to S x S
    out = pipe.run([Sample(encoded=encode(small))])
    assert_matches_reference(out, 0, gray16(small), tiny)


# --------------------------------------------------------------------------- bit depths


def real_16bit(gray: Image.Image) -> np.ndarray:
    """A real image re-mapped through a gamma curve onto the full 0..65535 range."""
    x = np.asarray(gray, np.float64)
    x = (x - x.min()) / (x.max() - x.min())
    return np.round(x**0.7 * 65535).astype(np.uint16)


def test_16bit_png_is_decoded_at_full_precision(pipe, tiny, real_gray):
    a16 = real_16bit(real_gray)
    assert a16.min() == 0 and a16.max() == 65535 and len(np.unique(a16)) > 200
    img = Image.fromarray(a16)
    assert img.mode == "I;16"
    data = encode(img)
    assert Image.open(io.BytesIO(data.tobytes())).mode == "I;16"  # a real 16-bit PNG
    out = pipe.run([Sample(encoded=data)])
    assert_matches_reference(out, 0, a16.astype(np.float32), tiny, what="16-bit")


def test_minmax_makes_12bit_in_16_look_like_full_16bit(pipe, real_gray):
    a8 = np.asarray(real_gray)
    a16 = real_16bit(real_gray)
    a12 = a16 >> 4  # the same picture stored as 12-bit values in a 16-bit PNG
    assert a12.max() == 4095
    # Exactly proportional sources (8-bit, x257 in 16 bits, x16 in 12 bits): same output.
    exact = pipe.run(
        [
            Sample(encoded=encode(real_gray)),
            Sample(encoded=encode(Image.fromarray(a8.astype(np.uint16) * 257))),
            Sample(encoded=encode(Image.fromarray(a8.astype(np.uint16) * 16))),
        ]
    )
    np.testing.assert_allclose(exact.work[1], exact.work[0], atol=1e-5)
    np.testing.assert_allclose(exact.work[2], exact.work[0], atol=1e-5)
    # 16-bit vs its own top 12 bits: the same up to the 12-bit quantisation (1/4095 of the
    # range). Measured: max 0.53 / 4095, mean 0.14 / 4095.
    out = pipe.run(
        [Sample(encoded=encode(Image.fromarray(a16))), Sample(encoded=encode(Image.fromarray(a12)))]
    )
    d = np.abs(out.work[0] - out.work[1])
    assert d.max() <= 2.0 / 4095 and d.mean() <= 0.5 / 4095, (d.max(), d.mean())


def test_fullrange_keeps_absolute_intensity(fullrange, real_gray):
    models, pipe = fullrange
    a12 = real_16bit(real_gray) >> 4
    a8 = np.asarray(real_gray)
    out = pipe.run(
        [Sample(encoded=encode(Image.fromarray(a12))), Sample(encoded=encode(real_gray))]
    )
    # 12-bit data stays dim (<= 4095 / 65535); 8-bit data spans what it spans on [0, 1].
    assert out.work[0].max() <= 4095 / 65535 + 1e-6
    assert math.isclose(out.work[1].max(), a8.max() / 255, abs_tol=0.02)
    for i, a in enumerate((a12.astype(np.float32), gray16(real_gray))):
        assert_matches_reference(out, i, a, models, what="fullrange")


# --------------------------------------------------------------------------- colour and formats


def colour_versions(gray: Image.Image) -> dict[str, Image.Image]:
    """Colour encodings of a real radiograph whose channels differ (so gray conversion matters)."""
    rgb = Image.merge(
        "RGB", (gray, gray.point(lambda v: int(v * 0.8)), gray.point(lambda v: 255 - v))
    )
    alpha = Image.fromarray((np.indices(gray.size[::-1]).sum(0) % 256).astype(np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = gray.copy()
    la.putalpha(alpha)
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
        "LA": la,
    }


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_png_matches_pillow_gray(pipe, tiny, real_gray, mode):
    img = colour_versions(real_gray)[mode]
    data = encode(img)
    decoded = Image.open(io.BytesIO(data.tobytes()))
    assert decoded.mode == mode
    out = pipe.run([Sample(encoded=data)])
    assert_matches_reference(out, 0, gray16(decoded), tiny, COLOR_MEAN_TOL, COLOR_P99_TOL, mode)


def test_alpha_is_ignored(pipe, real_gray):
    v = colour_versions(real_gray)
    out = pipe.run([Sample(encoded=encode(v["RGB"])), Sample(encoded=encode(v["RGBA"]))])
    np.testing.assert_array_equal(out.work[0], out.work[1])
    out = pipe.run([Sample(encoded=encode(real_gray)), Sample(encoded=encode(v["LA"]))])
    np.testing.assert_array_equal(out.work[0], out.work[1])


def test_rgb_jpeg_matches_pillow_gray(pipe, tiny, real_gray):
    data = encode(colour_versions(real_gray)["RGB"], "JPEG", quality=92)
    out = pipe.run([Sample(encoded=data)])
    decoded = Image.open(io.BytesIO(data.tobytes()))
    assert decoded.mode == "RGB"
    assert_matches_reference(
        out,
        0,
        gray16(decoded),
        tiny,
        COLOR_MEAN_TOL + JPEG_MEAN_TOL,
        COLOR_P99_TOL + JPEG_P99_TOL,
        "RGB JPEG",
    )


# --------------------------------------------------------------------------- DICOM-like pixels


def test_raw_pixels_equal_encoded_png_of_the_same_pixels(pipe, tiny, real_gray):
    a16 = real_16bit(real_gray)
    a8_as_16 = np.asarray(real_gray).astype(np.uint16) * 257
    out = pipe.run(
        [
            Sample(pixels=a16),
            Sample(encoded=encode(Image.fromarray(a16))),
            Sample(pixels=a8_as_16),
            Sample(encoded=encode(real_gray)),
        ]
    )
    assert out.ok == [0, 1, 2, 3]
    assert_close(out.work[0], out.work[1], LOSSLESS_MEAN_TOL, LOSSLESS_P99_TOL, "16-bit pixels")
    assert_close(out.seg_input[0], out.seg_input[1], LOSSLESS_MEAN_TOL, LOSSLESS_P99_TOL)
    assert_close(out.work[2], out.work[3], LOSSLESS_MEAN_TOL, LOSSLESS_P99_TOL, "8-bit pixels")
    assert_matches_reference(out, 0, a16.astype(np.float32), tiny, what="pixels")


def test_sample_without_data_is_a_value_error(pipe):
    with pytest.raises(ValueError, match="encoded bytes or pixels"):
        pipe.run([Sample()])


# --------------------------------------------------------------------------- other sizes


def test_hand_built_manifests_with_other_sizes(tiny, real_files):
    seg = tiny.segmenter
    clf = tiny.classifier
    models = ModelSet(
        segmenter=replace(
            seg,
            preprocess=Preprocess(size=(48, 80), channels=1, mean=(0.4,), std=(0.3,)),
        ),
        classifier=replace(clf, crop=CropSpec(source_size=96, margin=0.1)),
    )
    pipe = Preprocessor(models, device="cpu", batch_size=3, threads=1)
    files = [real_files["png"][0], real_files["jpg"][0], real_files["png"][1]]
    out = pipe.run([file_sample(p) for p in files])
    assert out.work.shape == (3, 96, 96)
    assert out.seg_input.shape == (3, 1, 48, 80)
    for i, p in enumerate(files):
        assert_matches_reference(
            out, i, gray16(Image.open(p)), models, JPEG_MEAN_TOL, JPEG_P99_TOL, p.name
        )


def test_a_cheaper_segmenter_leaves_the_work_image_as_it_was(real_files):
    """Issue 17: a segmenter of another input size (engine.models.UNET_SEGMENTERS) changes the
    segmenter input alone; the work image the classifier's crop is cut from is bit for bit the
    shipped U-Net's."""
    from engine.models import classifier_manifest, segmenter_manifest

    clf = classifier_manifest("resnet50", trained=False)
    files = [real_files["png"][0], real_files["jpg"][0]]
    outs = {}
    for arch in ("unet", "unet-s8-128"):
        models = ModelSet(segmenter=segmenter_manifest(arch, trained=False), classifier=clf)
        outs[arch] = Preprocessor(models, device="cpu", batch_size=2, threads=1).run(
            [file_sample(p) for p in files]
        )
        for i, p in enumerate(files):
            assert_matches_reference(
                outs[arch], i, gray16(Image.open(p)), models, JPEG_MEAN_TOL, JPEG_P99_TOL, p.name
            )
    assert outs["unet"].work.shape == (2, 512, 512)
    np.testing.assert_array_equal(outs["unet"].work, outs["unet-s8-128"].work)
    assert outs["unet-s8-128"].seg_input.shape == (2, 1, 128, 128)


# --------------------------------------------------------------------------- bad input


BAD_TEXT = np.frombuffer(b"patient notes, not an image\n" * 3, np.uint8)


def test_bad_files_become_errors_and_good_ones_are_unchanged(pipe, real_files):
    good = [real_files["png"][2], real_files["jpg"][1], real_files["png"][3]]
    png_bytes = good[0].read_bytes()
    samples = [
        file_sample(good[0]),
        Sample(encoded=np.frombuffer(png_bytes[: len(png_bytes) // 2], np.uint8)),  # truncated
        file_sample(good[1]),
        Sample(encoded=BAD_TEXT),
        file_sample(good[2]),
    ]
    out = pipe.run(samples)
    assert out.ok == [0, 2, 4]
    assert sorted(out.errors) == [1, 3]
    for j, p in enumerate(good):
        alone = pipe.run([file_sample(p)])
        np.testing.assert_array_equal(out.work[j], alone.work[0])
        np.testing.assert_array_equal(out.seg_input[j], alone.seg_input[0])
    for msg in out.errors.values():
        assert msg.startswith("cannot decode: the file is truncated or corrupt")
        assert len(msg) < 400
        for noise in ("Traceback", "pipeline definition", 'File "', "Current pipeline"):
            assert noise not in msg
    # the pipeline still works after the failures
    again = pipe.run([file_sample(good[0])])
    np.testing.assert_array_equal(again.work[0], out.work[0])


def test_batch_of_one_bad_image_is_an_error_entry_not_a_crash(pipe, real_files):
    # A truncated JPEG alone (say, the last batch of a run) must not kill the run.
    data = real_files["jpg"][0].read_bytes()
    out = pipe.run([Sample(encoded=np.frombuffer(data[: len(data) // 2], np.uint8))])
    assert out.ok == [] and list(out.errors) == [0]
    assert out.errors[0].startswith("cannot decode")
    out = pipe.run([Sample(encoded=BAD_TEXT)])
    assert out.ok == [] and list(out.errors) == [0]


def test_run_one_raises_image_error(pipe):
    with pytest.raises(ImageError, match="cannot decode"):
        pipe.run_one(Sample(encoded=BAD_TEXT))


def test_batch_larger_than_batch_size_is_a_value_error(pipe):
    with pytest.raises(ValueError, match="exceeds"):
        pipe.run([Sample(encoded=BAD_TEXT)] * (pipe.batch_size + 1))
    with pytest.raises(ValueError, match="empty"):
        pipe.run([])


def test_bad_device_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="'cpu' or 'gpu'"):
        Preprocessor(tiny, device="cuda", batch_size=1, threads=1)


# A real message (DALI 2.4, truncated PNG), as str(RuntimeError) from Pipeline.run().
DALI_ERROR = (
    "Critical error in pipeline:\nCritical error in pipeline:\n"
    "Error in CPU operator `nvidia.dali.fn.decoders.image`,\n"
    "which was used in the pipeline definition with the following traceback:\n\n"
    '  File "/work/main/engine/pipeline.py", line 76, in preprocess\n'
    "    image = fn.decoders.image(\n\nencountered:\n\n"
    "nvImageCodec failure: '#17'\n"
    "Current pipeline object is no longer valid.\nCurrent pipeline object is no longer valid."
)


def test_decoder_message_keeps_the_informative_line():
    assert decoder_message(RuntimeError(DALI_ERROR)) == "nvImageCodec failure: '#17'"
    # a truncated JPEG: DALI names its batch slot, which means nothing to the user
    truncated_jpeg = DALI_ERROR.replace(
        "nvImageCodec failure: '#17'", "Failed to decode sample #0 :"
    )
    msg = decoder_message(RuntimeError(truncated_jpeg))
    assert msg and "sample #" not in msg
    # no "encountered:" part: the first line that is not DALI boilerplate
    assert (
        decoder_message(RuntimeError("Critical error in pipeline:\n  bad header\n")) == "bad header"
    )
    for text in ("", "Critical error in pipeline:\nCurrent pipeline object is no longer valid."):
        msg = decoder_message(RuntimeError(text))
        assert msg and "pipeline" not in msg  # never empty, never boilerplate
    assert len(decoder_message(RuntimeError("encountered: " + "x" * 1000))) == 300
