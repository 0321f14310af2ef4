"""engine.train.unet: the lung U-Net in torch: the widths and depth of each architecture name,
one mask logit per input pixel, and BatchNorm after every 3x3 conv (folded away on export)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)

from torch import nn  # noqa: E402

from engine.train.unet import UNET_SHAPES, UNet, build_unet, double_conv  # noqa: E402


def test_double_conv_is_two_unbiased_convs_each_with_bn_and_relu():
    block = double_conv(3, 5)
    kinds = [type(m) for m in block]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    conv_a, conv_b = block[0], block[3]
    assert (conv_a.in_channels, conv_a.out_channels, conv_b.out_channels) == (3, 5, 5)
    assert conv_a.bias is None and conv_b.bias is None  # BN carries the bias
    assert conv_a.padding == (1, 1)  # same size out as in
    assert block(torch.zeros(2, 3, 6, 6)).shape == (2, 5, 6, 6)


@pytest.mark.parametrize("name", sorted(UNET_SHAPES))
def test_build_unet_has_the_widths_and_depth_of_its_name(name):
    base, depth = UNET_SHAPES[name]
    net = build_unet(name)
    assert len(net.enc) == len(net.dec) == len(net.up) == depth
    assert [blk[0].out_channels for blk in net.enc] == [base * 2**i for i in range(depth)]
    assert net.bottleneck[0].out_channels == base * 2**depth
    assert net.head.out_channels == 1 and net.enc[0][0].in_channels == 1


def test_one_logit_per_pixel_at_any_side_divisible_by_two_to_the_depth():
    torch.manual_seed(0)
    net = UNet(base_channels=2, depth=2).eval()
    for side in (4, 8, 12):
        out = net(torch.rand(3, 1, side, side))
        assert out.shape == (3, 1, side, side)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # eval mode: deterministic


def test_skip_connections_reach_the_output():
    """A change in one input pixel moves the logit at that pixel (through the full-resolution
    skip), and gradients reach every parameter."""
    torch.manual_seed(0)
    net = build_unet("tiny-unet").eval()
    x = torch.rand(1, 1, 16, 16)
    y = x.clone()
    y[0, 0, 5, 7] += 1.0
    with torch.no_grad():
        diff = (net(y) - net(x)).abs()[0, 0]
    assert diff[5, 7] > 0
    net.train()
    net(torch.rand(2, 1, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_unknown_architecture_is_refused():
    with pytest.raises(KeyError):
        build_unet("resnet50")
