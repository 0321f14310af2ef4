"""engine.models.modelset: load_models reads the two manifests into a ModelSet; its model_id
follows the weights, not the threshold; no models installed points at `cxr models init`."""

from __future__ import annotations

import pytest

from engine.errors import ModelError
from engine.models import (
    init_models,
    load_models,
)
from engine.models import modelset as models_mod


def test_load_models_round_trips(tiny_models, tiny_models_dir):
    loaded = load_models(tiny_models_dir)
    assert loaded == tiny_models
    assert loaded.classifier.output("embedding").shape == ("N", 64)
    assert loaded.segmenter.input.shape == ("N", 1, 64, 64)
    assert loaded.trained is False


def test_model_id_is_stable_and_follows_the_weights(tiny_models, tmp_path):
    ms = tiny_models
    mid = ms.model_id
    c, s = ms.classifier, ms.segmenter
    assert mid.startswith(c.architecture) and f"+{s.architecture}" in mid
    assert f"@{c.sha256[:8]}" in mid and f"@{s.sha256[:8]}" in mid
    again = init_models(tmp_path / "again", size="tiny", seed=0)
    assert again.model_id == ms.model_id  # same seed, same bytes
    other = init_models(tmp_path / "other", size="tiny", seed=1)
    assert other.model_id != ms.model_id
    assert other.classifier.sha256 != ms.classifier.sha256
    assert other.segmenter.sha256 != ms.segmenter.sha256


def test_model_id_names_the_box_rule_when_it_is_set(tiny_models):
    from dataclasses import replace

    ruled = replace(tiny_models, segmenter=replace(tiny_models.segmenter, box_min_region=0.0005))
    assert ruled.model_id == tiny_models.model_id + "/box0.0005"  # other boxes, other rows
    assert "/box" not in tiny_models.model_id


def test_model_id_names_the_test_time_crops_when_there_are_some(tiny_models):
    from dataclasses import replace

    two = ((1.05, 0.95, 0.02, -0.03), (0.94, 1.07, -0.04, 0.01))
    crops = replace(tiny_models, classifier=replace(tiny_models.classifier, tta=two))
    clf_part, seg_part = crops.model_id.split("+")
    assert clf_part.startswith(tiny_models.model_id.split("+")[0] + "/tta2@")
    assert seg_part == tiny_models.model_id.split("+")[1]
    other = replace(tiny_models, classifier=replace(tiny_models.classifier, tta=two[::-1]))
    assert other.model_id != crops.model_id  # other transforms, other rows
    assert "/tta" not in tiny_models.model_id


def test_with_threshold(tiny_models):
    ms = tiny_models
    assert ms.with_threshold(None) is ms
    changed = ms.with_threshold(0.8)
    assert changed.classifier.threshold == 0.8
    assert ms.classifier.threshold == 0.5  # frozen: the original is untouched
    assert changed.segmenter == ms.segmenter
    assert changed.model_id == ms.model_id  # the threshold is not part of the weights


def test_no_models_installed_points_at_models_init(tmp_path, monkeypatch):
    monkeypatch.setattr(models_mod, "PACKAGED_MODELS", tmp_path / "packaged")
    with pytest.raises(ModelError) as err:
        load_models(None)
    msg = str(err.value)
    assert "cxr models init" in msg and "--models" in msg
    assert str(tmp_path / "packaged") in msg
