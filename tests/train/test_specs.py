"""engine.train.specs: a trained model's sizes come from the architecture specs `cxr models init`
uses, looked up by architecture name; an unknown --arch is a usage error naming the choices."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.models import INIT_SPECS, TRAIN_ONLY_CLASSIFIERS, UNET_SEGMENTERS
from engine.train.specs import (
    CLASSIFIER_ARCHS,
    SEGMENTER_ARCHS,
    classifier_for_segmenter,
    classifier_manifest,
    segmenter_manifest,
    work_size,
)


def test_architecture_lists_cover_every_family_and_the_train_only_classifiers():
    assert set(SEGMENTER_ARCHS) == set(UNET_SEGMENTERS)  # the one table of segmenters
    assert {"unet", "tiny-unet"} <= set(SEGMENTER_ARCHS)
    assert set(CLASSIFIER_ARCHS) == {"resnet50", "tiny-classifier", *TRAIN_ONLY_CLASSIFIERS}
    assert "efficientnet-lite0" in CLASSIFIER_ARCHS
    assert len(set(CLASSIFIER_ARCHS)) == len(CLASSIFIER_ARCHS)  # each once


def test_work_size_and_classifier_are_the_segmenter_family_s():
    assert work_size("unet") == INIT_SPECS["full"]["classifier"]["source_size"] == 512
    assert work_size("tiny-unet") == INIT_SPECS["tiny"]["classifier"]["source_size"] == 128
    assert classifier_for_segmenter("unet") == "resnet50"
    assert classifier_for_segmenter("tiny-unet") == "tiny-classifier"
    # the classifier of that family crops from a work image of the same side
    for seg in SEGMENTER_ARCHS:
        clf = classifier_manifest(classifier_for_segmenter(seg), trained=False)
        assert clf.crop is not None and clf.crop.source_size == work_size(seg)


@pytest.mark.parametrize("call", [work_size, classifier_for_segmenter])
def test_unknown_segmenter_is_a_usage_error_naming_the_choices(call):
    with pytest.raises(ConfigError, match="unknown segmenter architecture 'resnet50'") as info:
        call("resnet50")  # a classifier is not a segmenter
    assert "tiny-unet" in str(info.value) and "unet" in str(info.value)


def test_manifests_have_the_init_specs_shapes():
    seg = segmenter_manifest("tiny-unet", trained=False)
    assert seg.role == "segmenter" and not seg.trained
    assert seg.preprocess.size == (64, 64) and seg.outputs[0].name == "mask_logit"
    clf = classifier_manifest("resnet50", threshold=0.3, card={"status": "x"})
    assert clf.trained and clf.threshold == 0.3 and clf.card == {"status": "x"}
    assert clf.preprocess.size == (224, 224)
    assert clf.output("embedding").shape[-1] == 2048
