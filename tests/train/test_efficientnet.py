"""The ImageNet-pretrained EfficientNet-Lite0 comparison classifier (`--arch efficientnet-lite0`)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the train extra (torch)")

from engine.errors import ConfigError  # noqa: E402
from engine.models import architecture_spec, classifier_manifest  # noqa: E402
from engine.train.efficientnet import IMAGENET_MEAN, IMAGENET_STD, fold_gray_stem  # noqa: E402
from engine.train.specs import CLASSIFIER_ARCHS  # noqa: E402


def test_gray_stem_folding_is_exact_away_from_the_border():
    """conv(u; folded) + const == conv(ImageNet-normalised gray replicated to RGB; original)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, generator=g)
    x = torch.rand(2, 1, 20, 20, generator=g)  # gray in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = torch.nn.functional.conv2d((x.expand(-1, 3, -1, -1) - mean) / std, w)  # no padding
    gray, const = fold_gray_stem(w)
    got = torch.nn.functional.conv2d((x - 0.5) / 0.25, gray) + const.view(1, -1, 1, 1)
    assert gray.shape == (8, 1, 3, 3) and const.shape == (8,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_spec_is_train_only_with_the_full_family_inputs():
    assert "efficientnet-lite0" in CLASSIFIER_ARCHS
    spec, _ = architecture_spec("classifier", "efficientnet-lite0")
    assert spec["embedding_dim"] == 1280
    m = classifier_manifest("efficientnet-lite0")
    full = classifier_manifest("resnet50")
    assert m.output("embedding").shape == ("N", 1280)
    assert m.input.shape == full.input.shape and m.crop == full.crop
    assert m.preprocess == full.preprocess
    with pytest.raises(Exception, match="efficientnet-lite0"):
        architecture_spec("classifier", "efficientnet-b7")


def test_pretrained_model_exports_and_matches_torch_under_onnx_runtime():
    pytest.importorskip("efficientnet_lite_pytorch", reason="train extra (efficientnet-lite)")
    from engine.train.export import check_parity, to_onnx
    from engine.train.resnet import build_classifier

    model = build_classifier("efficientnet-lite0", 1280).eval()
    x = np.random.default_rng(0).normal(size=(2, 1, 224, 224)).astype(np.float32)
    with torch.no_grad():
        logit, emb = model(torch.from_numpy(x))
    assert logit.shape == (2, 1) and emb.shape == (2, 1280)
    assert float(emb.min()) >= 0.0  # ReLU6 head, average-pooled
    proto = to_onnx(
        model,
        torch.from_numpy(x),
        output_names=["logit", "embedding"],
        architecture="efficientnet-lite0",
        doc="test",
    )
    diffs = check_parity(model, proto, x, threads=1, where=__import__("pathlib").Path("t"))
    assert max(diffs.values()) < 1e-4


def test_pretrained_features_differ_from_random_init():
    """The ImageNet weights are really loaded (a fresh init would give other features)."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="train extra (efficientnet-lite)")
    from engine.train.efficientnet import EfficientNetLite0Classifier

    a = EfficientNetLite0Classifier(pretrained=True).net._blocks[3]._project_conv.weight
    b = EfficientNetLite0Classifier(pretrained=True).net._blocks[3]._project_conv.weight
    c = EfficientNetLite0Classifier(pretrained=False).net._blocks[3]._project_conv.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_arch_is_a_config_error(tmp_path):
    from engine.train.classifier import ClassifierTrainConfig

    with pytest.raises(ConfigError, match="efficientnet-lite0"):
        ClassifierTrainConfig(
            labels=tmp_path, images=tmp_path, segmenter=tmp_path, out=tmp_path, arch="vgg16"
        )
