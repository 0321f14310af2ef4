"""engine.serve.images: the review page reads an image back from where it was screened (a file,
a zip or tar member), refusing what changed or is unsafe, and renders it as a PNG."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from conftest import dev_images, dicom_file
from PIL import Image

from engine.serve.images import Unavailable, mask_overlay, render_png


def test_read_recorded_members_of_zip_and_tar_gz_and_refusals(tmp_path):
    import hashlib
    import zipfile

    from engine.serve.images import Unavailable, read_recorded

    image = dev_images(1)[0]
    data = image.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    zipped = tmp_path / "a.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("x/one.png", data)
    tgz = tmp_path / "a.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(image, arcname="y/one.png")
        link = tarfile.TarInfo("y/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    for source, member in ((zipped, "x/one.png"), (tgz, "y/one.png"), (image, None)):
        row = {"source": str(source), "member": member, "sha256": sha}
        assert read_recorded(row) == data
    refused = [
        ({"source": str(tgz), "member": "y/link.png", "sha256": sha}, 404),
        ({"source": str(tgz), "member": "y/none.png", "sha256": sha}, 404),
        ({"source": str(zipped), "member": "../x/one.png", "sha256": sha}, 404),
        ({"source": str(tmp_path / "gone.png"), "member": None, "sha256": sha}, 404),
        ({"source": str(tmp_path), "member": None, "sha256": sha}, 404),
        ({"source": str(image), "member": None, "sha256": "0" * 64}, 409),
        ({"source": str(image), "member": None, "sha256": None}, 404),
    ]
    for row, status in refused:
        with pytest.raises(Unavailable) as caught:
            read_recorded(row)
        assert caught.value.status == status, row
    with pytest.raises(Unavailable) as caught:
        read_recorded({"source": str(image), "member": None, "sha256": sha}, max_bytes=100)
    assert caught.value.status == 413


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def shown(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_render_png_stretches_16_bit_gray_and_keeps_colour():
    sixteen = np.full((20, 30), 1000, np.uint16)
    sixteen[:, 15:] = 3000
    im = shown(render_png(png(sixteen), max_pixels=10_000))
    assert (im.format, im.mode, im.size) == ("PNG", "L", (30, 20))
    assert np.asarray(im).min() == 0 and np.asarray(im).max() == 255  # min..max onto 0..255
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    im = shown(render_png(png(rgb), max_pixels=10_000))
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (200, 0, 0)


def test_render_png_of_dicom_pixels_and_a_constant_image():
    pixels = np.arange(24 * 16, dtype=np.uint16).reshape(24, 16)
    data = dicom_file(pixels, sop_uid="1.2.3.4", study_uid="1.2.3", patient_id="P")
    im = shown(render_png(data, max_pixels=10_000))
    assert (im.mode, im.size) == ("L", (16, 24))
    assert np.asarray(im)[0, 0] == 0 and np.asarray(im)[-1, -1] == 255
    flat = shown(render_png(png(np.full((8, 8), 7, np.uint16)), max_pixels=10_000))
    assert not np.asarray(flat).any()  # a constant image is black, not a division by zero


def test_render_png_refuses_what_it_cannot_show():
    for data, max_pixels in (
        (b"not an image at all", 10_000),
        (png(np.zeros((50, 50), np.uint8)), 100),
    ):
        with pytest.raises(Unavailable) as caught:
            render_png(data, max_pixels=max_pixels)
        assert caught.value.status == 422 and "cannot render the image" in str(caught.value)


def test_mask_overlay_colours_the_lung_and_leaves_the_rest_transparent():
    mask = np.zeros((6, 8), bool)
    mask[2:5, 1:4] = True
    buf = io.BytesIO()
    Image.fromarray(mask).convert("1").save(buf, "PNG")
    im = shown(mask_overlay(buf.getvalue(), rgba=(1, 2, 3, 4)))
    assert (im.mode, im.size) == ("RGBA", (8, 6))
    rgba = np.asarray(im)
    assert (rgba[mask] == (1, 2, 3, 4)).all() and not rgba[~mask].any()
