"""engine/models_cli.py: `cxr models init` and `cxr models pack` say what they wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import add_int8_variant, plain

from engine.models import init_models, load_models


@pytest.fixture
def models(tmp_path) -> Path:
    return init_models(tmp_path / "models", size="tiny", seed=0).classifier.directory


def test_models_init_writes_untrained_models_and_says_so(tmp_path, cli):
    out = tmp_path / "init"
    code, stdout, err = cli(["models", "init", "--out", out, "--tiny", "--seed", "3"])
    assert code == 0, err
    models = load_models(out)
    text = plain(stdout)
    for m in (models.segmenter, models.classifier):
        assert f"{m.role} {m.architecture}" in text and m.sha256[:16] in text
    assert "UNTRAINED" in text and not models.trained
    assert models.classifier.card["seed"] == 3


def test_models_init_refuses_an_empty_out(cli):
    code, _, err = cli(["models", "init", "--out", "", "--tiny"])
    assert code == 1 and "--out is empty" in plain(err)


def test_models_pack_cli_lists_every_shipped_file(models, tmp_path, cli):
    add_int8_variant(models, "classifier", "classifier.int8.onnx")
    out = tmp_path / "packed"
    code, stdout, err = cli(["models", "pack", "--models", models, "--out", out])
    assert code == 0, err
    text = "".join(stdout.split())  # the console wraps long lines
    for precision, name in (("int8", "classifier.int8.onnx"), ("w8", "classifier.w8.onnx")):
        assert f"{precision}{out / name}" in text
        assert (out / name).is_file()


def test_models_pack_without_an_int8_export_exits_1_naming_it(models, tmp_path, cli):
    code, _, err = cli(["models", "pack", "--models", models, "--out", tmp_path / "packed"])
    assert code == 1 and "the classifier has no int8 export to pack" in plain(err)
