"""A different --threshold on an existing output: decisions at two thresholds in one table.

Refused before anything is written, with the directory's threshold and the way forward.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import dev_images, plain, run_cli

from engine.io import parquet


def _add_images(inp: Path, skip: int, n: int) -> None:
    inp.mkdir(parents=True, exist_ok=True)
    for src in dev_images(skip + n)[skip:]:
        shutil.copyfile(src, inp / src.name)


def test_another_threshold_on_an_existing_output_is_refused(tmp_path, tiny_models_dir):
    """issue 16 (smaller): a different --threshold on an existing --out was accepted silently,
    and its rows then held decisions at two thresholds."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _add_images(inp, 0, 2)
    base = ["screen", inp, "--out", out, "--models", tiny_models_dir]
    assert run_cli(base)[0] == 0  # the model's threshold: 0.5
    _add_images(inp, 2, 2)  # new images: an unchecked rerun would write rows for them

    code, stdout, stderr = run_cli([*base, "--threshold", "0.3"])

    assert code == 1, stdout + stderr
    message = plain(stderr)
    assert "threshold 0.5" in message and "0.3" in message
    assert "--threshold 0.5" in message and "new --out" in message
    assert parquet.read_predictions(out).height == 2

    code, stdout, stderr = run_cli([*base, "--threshold", "0.5"])  # the same value, explicit
    assert code == 0, stdout + stderr
    df = parquet.read_predictions(out)
    assert df.height == 4 and df["threshold"].n_unique() == 1


def test_a_rerun_without_threshold_on_a_custom_threshold_output_is_refused(
    tmp_path, tiny_models_dir
):
    """issue 16 (smaller): leaving --threshold out means the model's, which differs here."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _add_images(inp, 0, 2)
    base = ["screen", inp, "--out", out, "--models", tiny_models_dir]
    assert run_cli([*base, "--threshold", "0.25"])[0] == 0
    _add_images(inp, 2, 1)

    code, stdout, stderr = run_cli(base)

    assert code == 1, stdout + stderr
    assert "--threshold 0.25" in plain(stderr)
    assert parquet.read_predictions(out).height == 2
