"""engine/arch.py: the untrained ONNX graphs load, run, keep the I/O contract and are reproducible."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from engine.arch import (
    ARCHITECTURES,
    resnet50_classifier,
    segmenter_builder,
    tiny_classifier,
    tiny_segmenter,
    unet_segmenter,
)
from engine.models import UNET_SEGMENTERS

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-dev" / "images"

# torchvision.models.resnet50() has 25,557,032 parameters (BN weight+bias counted, running
# stats not). Folding BN leaves one bias per conv output channel instead of BN's two values:
# BN channels = 64 (stem) + sum over stages of blocks * 6 * width + 4 * width (downsample)
#             = 64 + 1,408 + 3,584 + 10,240 + 11,264 = 26,560.
# A 1-channel stem drops 64 * 2 * 7 * 7 = 6,272 weights; a 1-output fc keeps 2,048 + 1 of
# 2,048 * 1,000 + 1,000 = 2,049,000.
RESNET50_PARAMS = 25_557_032 - 26_560 - 6_272 - (2_049_000 - 2_049)

CLASSIFIERS = {"resnet50": 224, "tiny-classifier": 64}
SEGMENTERS = {name: shape.size for name, shape in UNET_SEGMENTERS.items()}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _real_images(size: int, count: int = 8) -> np.ndarray:
    files = sorted(p for p in IMAGES.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if len(files) < count:
        pytest.skip(f"needs {count} images in {IMAGES}")
    images = []
    for path in files[:count]:
        with Image.open(path) as im:
            gray = im.convert("L").resize((size, size), Image.Resampling.BILINEAR)
        images.append((np.asarray(gray, np.float32) / 255.0 - 0.5) / 0.25)
    return np.stack(images)[:, None]


def _cosines(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    pairs = np.triu_indices(len(unit), k=1)
    return (unit @ unit.T)[pairs]


def _param_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _sha256(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    return {name: build(seed=0) for name, build in ARCHITECTURES.items()}


@pytest.fixture(scope="module")
def sessions(models) -> dict[str, ort.InferenceSession]:
    return {name: _session(model) for name, model in models.items()}


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_model_is_valid_opset17_with_metadata(models, name):
    model = models[name]
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 9
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.producer_name == "cxr-engine"
    assert "cxr-engine" in model.doc_string
    assert {p.key: p.value for p in model.metadata_props}["cxr.architecture"] == name
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_io_contract(models, name):
    graph, size = models[name].graph, CLASSIFIERS[name]
    dim = 2048 if name == "resnet50" else 64
    assert [(v.name, _dims(v)) for v in graph.input] == [("image", ["N", 1, size, size])]
    assert [(v.name, _dims(v)) for v in graph.output] == [
        ("logit", ["N", 1]),
        ("embedding", ["N", dim]),
    ]


@pytest.mark.parametrize("name", sorted(SEGMENTERS))
def test_segmenter_io_contract(models, name):
    graph, size = models[name].graph, SEGMENTERS[name]
    assert [(v.name, _dims(v)) for v in graph.input] == [("image", ["N", 1, size, size])]
    assert [(v.name, _dims(v)) for v in graph.output] == [("mask_logit", ["N", 1, size, size])]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_runs_batch_1_and_3_with_batch_invariant_finite_outputs(models, sessions, name):
    size = {**CLASSIFIERS, **SEGMENTERS}[name]
    batch = np.random.default_rng(7).standard_normal((3, 1, size, size), dtype=np.float32)
    out_names = [o.name for o in models[name].graph.output]
    together = sessions[name].run(None, {"image": batch})
    for i in range(3):
        alone = sessions[name].run(None, {"image": batch[i : i + 1]})
        for out_name, row, single in zip(out_names, together, alone, strict=True):
            assert single.shape[0] == 1 and row.shape[0] == 3, out_name
            assert np.isfinite(row).all(), out_name
            np.testing.assert_allclose(row[i : i + 1], single, rtol=1e-4, atol=1e-4)
    expected = {
        "resnet50": [(3, 1), (3, 2048)],
        "tiny-classifier": [(3, 1), (3, 64)],
        **{seg: [(3, 1, size, size)] for seg in SEGMENTERS},
    }[name]
    assert [o.shape for o in together] == expected


def test_resnet50_parameter_count_matches_torchvision_with_bn_folded(models):
    assert RESNET50_PARAMS == 23_477_249
    assert _param_count(models["resnet50"]) == RESNET50_PARAMS


def test_resnet50_topology_is_torchvision_v1_5(models):
    convs = {n.name: n for n in models["resnet50"].graph.node if n.op_type == "Conv"}
    # stem + 16 bottlenecks x 3 convs + 4 projection shortcuts
    assert len(convs) == 1 + 16 * 3 + 4

    def stride(node: onnx.NodeProto) -> int:
        return next(a.ints[0] for a in node.attribute if a.name == "strides")

    assert stride(convs["conv1"]) == 2
    for stage in (2, 3, 4):
        assert stride(convs[f"layer{stage}.0.conv1"]) == 1
        assert stride(convs[f"layer{stage}.0.conv2"]) == 2  # v1.5: stride on the 3x3
        assert stride(convs[f"layer{stage}.0.downsample.0"]) == 2
    assert "layer1.0.downsample.0" in convs and "layer1.1.downsample.0" not in convs
    names = {t.name for t in models["resnet50"].graph.initializer}
    assert {"conv1.weight", "layer4.2.conv3.bias", "fc.weight", "fc.bias"} <= names


def test_every_segmenter_of_the_table_is_an_architecture_and_the_named_ones_are_unchanged():
    assert set(SEGMENTERS) <= set(ARCHITECTURES)
    assert SEGMENTERS["unet"] == 256 and SEGMENTERS["tiny-unet"] == 64
    for name, build in [("unet", unet_segmenter), ("tiny-unet", tiny_segmenter)]:
        assert _sha256(ARCHITECTURES[name](seed=5)) == _sha256(build(seed=5))


def _conv_weights(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [weights[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]


@pytest.mark.parametrize("name", ["unet-s8", "unet-128", "unet-s8-128"])
def test_cheaper_segmenters_are_the_unet_with_the_tables_widths_and_input(models, name):
    """Same topology as the shipped U-Net; only the widths (base channels) and the input side
    change, as UNET_SEGMENTERS says."""
    shape, unet = UNET_SEGMENTERS[name], UNET_SEGMENTERS["unet"]
    assert shape.family == "full" and shape.depth == unet.depth
    model, reference = models[name], models["unet"]
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in reference.graph.node]
    scale = unet.base_channels // shape.base_channels
    for got, ref in zip(_conv_weights(model), _conv_weights(reference), strict=True):
        # channel dims scale with the base (the image's 1 and the head's 1 stay); kernels stay
        assert [g if r == 1 else g * scale for g, r in zip(got[:2], ref[:2], strict=True)] == list(
            ref[:2]
        )
        assert got[2:] == ref[2:]
    assert _conv_weights(model)[0] == (shape.base_channels, 1, 3, 3)
    assert _param_count(model) * scale**2 == pytest.approx(_param_count(reference), rel=0.01)


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (tiny_classifier, {}),
        (tiny_segmenter, {}),
        (segmenter_builder("unet-s8-128"), {"size": 32}),
        (unet_segmenter, {"size": 64, "base_channels": 4, "depth": 3}),
        (resnet50_classifier, {}),
    ],
)
def test_same_seed_gives_identical_bytes_and_other_seeds_differ(build, kwargs):
    first = _sha256(build(seed=3, **kwargs))
    assert _sha256(build(seed=3, **kwargs)) == first
    assert _sha256(build(seed=4, **kwargs)) != first


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_embeddings_of_real_images_are_distinct(sessions, name):
    logits, embeddings = sessions[name].run(None, {"image": _real_images(CLASSIFIERS[name])})
    cosines = _cosines(embeddings)
    assert cosines.mean() < 0.9999
    assert cosines.max() < 0.99999
    assert cosines.std() > 1e-4
    assert np.ptp(logits) > 1e-3


def test_tiny_classifier_separates_a_real_image_from_its_mirror(sessions):
    image = _real_images(64, count=1)
    _, embeddings = sessions["tiny-classifier"].run(
        None, {"image": np.concatenate([image, image[..., ::-1]])}
    )
    assert _cosines(embeddings)[0] < 0.9999


@pytest.mark.parametrize("name", sorted(SEGMENTERS))
def test_segmenter_output_follows_the_image(sessions, name):
    images = _real_images(SEGMENTERS[name], count=4)
    (masks,) = sessions[name].run(None, {"image": images})
    assert np.isfinite(masks).all()
    assert (masks.std(axis=(2, 3)) > 1e-2).all(), "mask_logit is flat over the image"
    assert np.abs(masks[0] - masks[1]).mean() > 1e-2, "different images gave the same mask"


def test_classifier_variants_project_to_the_requested_embedding():
    for model, dim in [
        (resnet50_classifier(in_channels=3, size=64, embedding_dim=128), 128),
        (tiny_classifier(in_channels=3, size=32, embedding_dim=32), 32),
    ]:
        onnx.checker.check_model(model, full_check=True)
        image = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
        size = _dims(model.graph.input[0])[-1]
        logit, embedding = _session(model).run(None, {"image": image[..., :size, :size]})
        assert logit.shape == (2, 1) and embedding.shape == (2, dim)
        assert np.isfinite(embedding).all()


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (unet_segmenter, {"size": 100}),  # 100 is not a multiple of 2**4
        (unet_segmenter, {"size": 64, "depth": 7}),
        (tiny_segmenter, {"size": 30}),
        (unet_segmenter, {"depth": 0}),
        (unet_segmenter, {"base_channels": -1}),
        (resnet50_classifier, {"size": 0}),
        (tiny_classifier, {"embedding_dim": 1.5}),
        (tiny_classifier, {"in_channels": True}),
    ],
)
def test_bad_shapes_raise_value_error(build, kwargs):
    with pytest.raises(ValueError):
        build(**kwargs)


def test_unet_size_error_names_the_fix():
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 16"):
        unet_segmenter(size=100)
