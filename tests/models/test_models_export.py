"""engine.models.export: `cxr models init` exports the untrained architectures with manifests;
the architectures' specs and manifests."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import onnx
import pytest

from engine.errors import ModelError
from engine.models import (
    INIT_SPECS,
    UNET_SEGMENTERS,
    architecture_spec,
    classifier_manifest,
    export_model,
    init_models,
    load_manifest,
    segmenter_manifest,
)


def test_init_writes_onnx_and_manifests(tmp_path):
    out = tmp_path / "tiny"
    ms = init_models(out, size="tiny", seed=0)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["classifier.json", "classifier.onnx", "segmenter.json", "segmenter.onnx"]
    for m in (ms.segmenter, ms.classifier):
        assert m.onnx_path == out / f"{m.role}.onnx"
        assert m.sha256 == hashlib.sha256(m.onnx_path.read_bytes()).hexdigest()
        graph = onnx.load(str(m.onnx_path)).graph
        assert [i.name for i in graph.input] == [t.name for t in m.inputs]
        assert {o.name for o in graph.output} == {t.name for t in m.outputs}


def test_architecture_spec_knows_the_init_and_train_only_architectures():
    seg, clf = architecture_spec("segmenter", "unet")
    assert seg == INIT_SPECS["full"]["segmenter"] and clf == INIT_SPECS["full"]["classifier"]
    spec, family = architecture_spec("classifier", "tiny-classifier")
    assert spec == family == INIT_SPECS["tiny"]["classifier"]
    spec, family = architecture_spec("classifier", "efficientnet-lite0")  # `cxr train` only
    assert spec is family and spec["embedding_dim"] == 1280
    with pytest.raises(ModelError, match=r"unknown segmenter architecture 'efficientnet-lite0'"):
        architecture_spec("segmenter", "efficientnet-lite0")
    with pytest.raises(ModelError, match=r"choose one of \['resnet50', 'tiny-classifier', 'eff"):
        architecture_spec("classifier", "vgg16")


@pytest.mark.parametrize("arch", ["unet-s8", "unet-128", "unet-s8-128"])
def test_cheaper_segmenters_serve_the_full_familys_work_image_and_classifier(arch):
    """Their own input size (one table: UNET_SEGMENTERS), the full family's classifier, work
    image side and crop; everything else of the manifest as the shipped U-Net's."""
    from engine.train.specs import SEGMENTER_ARCHS, classifier_for_segmenter, work_size

    n = UNET_SEGMENTERS[arch].size
    seg, clf = architecture_spec("segmenter", arch)
    assert seg == {"architecture": arch, "size": n} and clf == INIT_SPECS["full"]["classifier"]
    assert arch in SEGMENTER_ARCHS
    assert (work_size(arch), classifier_for_segmenter(arch)) == (512, "resnet50")
    m, unet = segmenter_manifest(arch, trained=False), segmenter_manifest("unet", trained=False)
    assert m.preprocess.size == (n, n) and m.inputs[0].shape == ("N", 1, n, n)
    assert m.outputs[0].shape == ("N", 1, n, n)
    assert replace(m.preprocess, size=unet.preprocess.size) == unet.preprocess
    assert (m.threshold, m.crop, m.architecture) == (unet.threshold, None, arch)


def test_the_init_families_take_their_segmenter_size_from_the_table():
    for family in INIT_SPECS.values():
        seg = family["segmenter"]
        assert seg["size"] == UNET_SEGMENTERS[seg["architecture"]].size
    with pytest.raises(ModelError, match=r"choose one of \['tiny-unet', 'unet', 'unet-128'"):
        architecture_spec("segmenter", "unet-s4")


def test_manifests_of_the_full_architectures():
    seg = segmenter_manifest("unet", trained=False)
    assert seg.inputs[0].shape == ("N", 1, 256, 256) and seg.preprocess.size == (256, 256)
    assert [o.name for o in seg.outputs] == ["mask_logit"] and seg.crop is None
    assert (seg.sha256, seg.trained, seg.card) == ("", False, {})  # filled in by export_model
    clf = classifier_manifest("resnet50", threshold=0.3, card={"status": "trained"})
    assert clf.inputs[0].shape == ("N", 1, 224, 224) and clf.threshold == 0.3
    assert clf.output("embedding").shape == ("N", 2048)
    assert (clf.crop.source_size, clf.crop.margin) == (512, 0.05)
    assert clf.trained and clf.card == {"status": "trained"}


def test_export_model_writes_the_onnx_and_the_manifest_with_its_sha256(tiny_models, tmp_path):
    m = tiny_models.segmenter
    model = onnx.load(str(m.onnx_path))
    written = export_model(model, tmp_path / "new", m)
    assert written.directory == tmp_path / "new"
    assert written.sha256 == hashlib.sha256(written.onnx_path.read_bytes()).hexdigest()
    assert load_manifest(tmp_path / "new" / "segmenter.json") == written
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "segmenter.json",
        "segmenter.onnx",
    ]  # no temporary left
