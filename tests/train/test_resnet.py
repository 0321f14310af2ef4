"""engine.train.resnet: the classifiers in torch give (logit [N, 1], embedding [N, D]); the
per-image standardisation makes the output blind to each image's brightness and contrast."""

from __future__ import annotations

import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")

from engine.train.resnet import (  # noqa: E402
    TINY_WIDTHS,
    ResNet50Classifier,
    Standardized,
    TinyClassifier,
    build_classifier,
)


def test_tiny_classifier_gives_a_logit_and_its_embedding():
    torch.manual_seed(0)
    model = TinyClassifier(embedding_dim=12).eval()
    logit, embedding = model(torch.rand(3, 1, 32, 32))
    assert logit.shape == (3, 1) and embedding.shape == (3, 12)
    # the logit is the fc layer of the embedding it returns
    torch.testing.assert_close(logit, model.fc(embedding))
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(TINY_WIDTHS)
    assert all(c.stride == (2, 2) and c.bias is None for c in convs)


def test_tiny_classifier_matches_the_engine_architecture_widths():
    from engine.arch import TINY_CLASSIFIER_WIDTHS

    assert tuple(TINY_CLASSIFIER_WIDTHS) == TINY_WIDTHS


def test_build_classifier_picks_the_network_and_wraps_standardisation():
    plain = build_classifier("tiny-classifier", 16)
    assert isinstance(plain, TinyClassifier) and plain.proj.out_features == 16
    wrapped = build_classifier("tiny-classifier", 16, standardize=True)
    assert isinstance(wrapped, Standardized) and isinstance(wrapped.model, TinyClassifier)


def test_standardized_ignores_each_image_s_brightness_and_contrast():
    torch.manual_seed(0)
    inner = TinyClassifier(embedding_dim=8).eval()
    model = Standardized(inner, eps=1e-6).eval()
    x = torch.rand(4, 1, 16, 16)
    gain = torch.tensor([0.5, 2.0, 3.0, 1.0]).reshape(4, 1, 1, 1)
    offset = torch.tensor([0.1, -0.3, 0.0, 5.0]).reshape(4, 1, 1, 1)
    with torch.no_grad():
        a_logit, a_emb = model(x)
        b_logit, b_emb = model(x * gain + offset)
        # what the inner network sees: mean 0, std 1 per image
        z = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(
            dim=(1, 2, 3), keepdim=True, unbiased=False
        )
        c_logit, _ = inner(z)
    torch.testing.assert_close(a_logit, b_logit, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a_emb, b_emb, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a_logit, c_logit, atol=1e-4, rtol=1e-4)
    # a flat image does not divide by zero: eps keeps it finite
    with torch.no_grad():
        flat_logit, _ = model(torch.full((1, 1, 16, 16), 0.7))
    assert torch.isfinite(flat_logit).all()


def test_resnet50_takes_one_gray_channel_and_gives_a_2048_embedding():
    """Built only (25 M parameters) and run once on one small image: no training."""
    torch.manual_seed(0)
    model = build_classifier("resnet50", 2048)
    assert isinstance(model, ResNet50Classifier)
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 1
    model.eval()
    with torch.no_grad():
        logit, embedding = model(torch.rand(1, 1, 64, 64))
    assert logit.shape == (1, 1) and embedding.shape == (1, 2048)
    torch.testing.assert_close(logit, model.net.fc(embedding))
    # zero_init_residual: every block's last BN starts at zero (each block is the identity)
    last_bns = [b.bn3.weight for layer in (model.net.layer1, model.net.layer4) for b in layer]
    assert all(torch.count_nonzero(w) == 0 for w in last_bns)
