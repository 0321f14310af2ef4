"""engine.train.augment: acquisition augmentation is seeded, bounded, and off is the identity; the
context swap keeps each image's lungs and takes the rest from another image of the batch. (The
swap inside a training batch: test_train_multiset.py.)"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="training needs the train extra (torch): pip install -e '.[train]'"
)
pytest.importorskip("torchvision", reason="training needs the train extra (torchvision)")


def test_acquisition_is_seeded_bounded_and_off_is_identity():
    from engine.train.augment import Acquisition, acquisition

    x = torch.rand(6, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    src = np.array(["a", "a", "b", "b", "c", "c"])
    on = Acquisition(**{f: 1.0 for f in Acquisition.__dataclass_fields__ if f.endswith("_p")})
    y1 = acquisition(x, src, on, torch.Generator().manual_seed(1))
    y2 = acquisition(x, src, on, torch.Generator().manual_seed(1))
    assert torch.equal(y1, y2) and y1.min() >= 0 and y1.max() <= 1
    assert (y1 - x).abs().mean() > 0.02
    off = acquisition(x, src, Acquisition.off(), torch.Generator().manual_seed(1))
    assert torch.equal(off, x)


def test_context_swap_keeps_the_lungs_and_takes_the_rest_from_another_image():
    from engine.train.augment import ContextSwap, dilate_masks, swap_context

    n, side, m = 6, 64, 16
    work = np.stack([np.full((side, side), i / 10, np.float32) for i in range(n)])
    masks = np.zeros((n, m, m), np.uint8)
    masks[:, 4:12, 3:7] = 1  # one "lung" per image, 8 x 4 of 16 x 16
    same = swap_context(
        work, masks, ContextSwap(p=1.0, dilate=0.0), torch.Generator().manual_seed(0)
    )
    again = swap_context(
        work, masks, ContextSwap(p=1.0, dilate=0.0), torch.Generator().manual_seed(0)
    )
    np.testing.assert_array_equal(same, again)  # seeded
    lungs = np.zeros((side, side), bool)
    lungs[16:48, 12:28] = True
    for i in range(n):
        assert (same[i][lungs] == work[i, 0, 0]).all()  # its own lungs
        outside = np.unique(same[i][~lungs])
        assert len(outside) == 1 and outside[0] != work[i, 0, 0]  # one other image's context
    # p = 0 changes nothing and draws nothing from the generator
    gen = torch.Generator().manual_seed(5)
    assert swap_context(work, masks, ContextSwap(p=0.0), gen) is work
    assert torch.equal(
        torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(5))
    )
    # dilation grows the mask by round(share * m) pixels on each side
    grown = dilate_masks(masks, 1 / 16)
    assert grown[0, 3:13, 2:8].all() and grown[0].sum() == 10 * 6
    with pytest.raises(ValueError, match="context swap"):
        ContextSwap(p=1.5)


def test_augment_pair_warps_image_and_mask_alike_and_keeps_soft_masks_soft_when_asked():
    from engine.train.augment import Geometry, Photometry, augment_pair

    image = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    soft = torch.zeros(4, 1, 32, 32)
    soft[:, :, 8:24, 8:24] = 0.3  # below 0.5: binarising would erase it
    soft[:, :, 12:20, 12:20] = 0.9
    still = Photometry(gamma=0.0, contrast=0.0, brightness=0.0)
    kept_image, kept = augment_pair(
        image, soft, torch.Generator().manual_seed(3), Geometry(), still, binarize=False
    )
    _, hard = augment_pair(image, soft, torch.Generator().manual_seed(3), Geometry(), still)
    assert torch.equal(hard, (kept >= 0.5).to(hard.dtype))  # the same warp, thresholded
    middle = kept[(kept > 0.05) & (kept < 0.45)]
    assert middle.numel() > 100  # the 0.3 ring survives as soft values
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert kept_image.shape == image.shape
