import pytest
import torch
import torch.nn.functional as F

from sdlight.conditioning.concat import InpaintingConcat, LowResConcat, random_masks


def test_random_masks_are_boxes_or_full():
    gen = torch.Generator().manual_seed(0)
    masks = random_masks(400, 32, gen, p_full=0.25, min_frac=0.1, max_frac=0.6)
    assert masks.shape == (400, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    full = (masks.flatten(1).mean(1) == 1).float().mean().item()
    assert 0.18 < full < 0.32  # p_full = 0.25 (binomial, n=400: 4.6 sigma band)
    for m in masks[masks.flatten(1).mean(1) < 1]:
        rows, cols = m[0].any(1).nonzero(), m[0].any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert m.sum() == h * w  # one filled rectangle
        assert 3 <= h <= 20 and 3 <= w <= 20  # 0.1..0.6 of 32, rounded
    again = random_masks(400, 32, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_inpainting_concat_blanks_the_masked_region_and_stacks_the_mask():
    seen = {}

    def encode(x):  # a stand-in for the VAE: 4x average pooling of the first channel, 4 channels
        seen["x"] = x
        return F.avg_pool2d(x, 4).repeat(1, 2, 1, 1)[:, :4]

    concat = InpaintingConcat(latent_channels=4)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :16, :] = 1
    out = concat(image, mask, encode)
    assert out.shape == (2, 5, 8, 8) and concat.channels == 5
    assert torch.equal(out[:, :1], F.interpolate(mask, size=(8, 8), mode="nearest"))
    assert (seen["x"][..., :16, :] == 0).all() and torch.equal(seen["x"][..., 16:, :], image[..., 16:, :])
    with pytest.raises(ValueError, match="differ in size"):
        concat(image, mask[..., :16, :16], encode)


def test_inpainting_training_inputs_prefer_the_batch_mask():
    concat = InpaintingConcat()
    image = torch.zeros(3, 3, 16, 16)
    given = torch.ones(3, 1, 16, 16)
    assert torch.equal(concat.training_inputs({"image": image, "mask": given})["mask"], given)
    drawn = concat.training_inputs({"image": image}, torch.Generator().manual_seed(1))["mask"]
    assert drawn.shape == (3, 1, 16, 16)


def test_lowres_concat_is_lossless_pixel_unshuffle():
    concat = LowResConcat(image_size=32, lowres_size=16, downsample_factor=4)
    assert concat.channels == 12
    image = torch.rand(2, 3, 32, 32)
    low = concat.degrade(image)
    # area downsampling = mean of 2x2 blocks
    assert torch.allclose(low, image.reshape(2, 3, 16, 2, 16, 2).mean((3, 5)), atol=1e-6)
    out = concat(low)
    assert out.shape == (2, 12, 8, 8)
    assert torch.equal(F.pixel_shuffle(out, 2), low)  # nothing of the low-res image is lost
    with pytest.raises(ValueError, match="multiple"):
        LowResConcat(image_size=32, lowres_size=12, downsample_factor=4)


def test_lowres_noise_augmentation_has_the_set_strength():
    concat = LowResConcat(image_size=64, lowres_size=16, downsample_factor=4, noise_level=0.2)
    low = torch.zeros(64, 3, 16, 16)
    out = concat(low, draws=torch.Generator().manual_seed(0))
    assert abs(out.std().item() - 0.2) < 0.01
