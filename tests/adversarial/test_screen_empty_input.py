"""Inputs that hold no image at all: a run that found nothing must say so, not exit 0 silently.

An INPUT that yields no image (an empty directory, one of READMEs only, an empty archive) is
warned about by name; when no INPUT yielded anything, the exit code is 4 (documented).
"""

from __future__ import annotations

import shutil
import tarfile

from conftest import dev_images, plain, run_cli

from engine.cli import EXIT_NO_IMAGES
from engine.io import parquet


def test_an_empty_directory_alone_warns_and_exits_4(tmp_path, tiny_models_dir):
    """issue 16 (smaller): an empty input directory alone exited 0 with no rows, no warning."""
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()

    code, stdout, stderr = run_cli(["screen", empty, "--out", out, "--models", tiny_models_dir])

    assert EXIT_NO_IMAGES == 4 and code == EXIT_NO_IMAGES, stdout + stderr
    text = plain(stdout + stderr)
    assert f"{empty} holds no image" in text
    assert "no images found" in text
    assert parquet.list_parts(out) == []


def test_inputs_with_only_non_images_warn_and_exit_4(tmp_path, tiny_models_dir):
    """issue 16 (smaller): a directory of text files and an empty .tar count as nothing found."""
    notes, out = tmp_path / "notes", tmp_path / "out"
    notes.mkdir()
    (notes / "README").write_text("not an image\n")
    (notes / "labels.csv").write_text("path,label\n")
    tar = tmp_path / "empty.tar"
    tarfile.open(tar, "w").close()

    code, stdout, stderr = run_cli(
        ["screen", notes, tar, "--out", out, "--models", tiny_models_dir]
    )

    assert code == EXIT_NO_IMAGES, stdout + stderr
    text = plain(stdout + stderr)
    assert f"{notes} holds no image" in text and f"{tar} holds no image" in text
    assert "non-image files ignored 2 " in text


def test_an_empty_directory_beside_images_is_warned_about(tmp_path, tiny_models_dir):
    """issue 16 (smaller): the run goes on (exit 0) but names the input that gave nothing."""
    empty, good, out = tmp_path / "empty", tmp_path / "good", tmp_path / "out"
    empty.mkdir()
    good.mkdir()
    for src in dev_images(2):
        shutil.copyfile(src, good / src.name)
    args = ["screen", empty, good, "--out", out, "--models", tiny_models_dir]

    code, stdout, stderr = run_cli(args)

    assert code == 0, stdout + stderr
    text = plain(stdout + stderr)
    assert f"{empty} holds no image" in text and f"{good} holds" not in text
    # a rerun finds the same images already screened: found, so not "nothing found"
    code, stdout, stderr = run_cli(args)
    assert code == 0 and "no images found" not in plain(stdout + stderr)
