"""The one image pipeline: every PIL mode to RGB, EXIF orientation, resize + crop, broken inputs."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdlight.data.transforms import BadImage, ImageTransform, open_image, to_rgb


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(to_rgb(rgba))
    assert out.shape == (8, 8, 3)
    assert tuple(out[4, 4]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    assert tuple(np.asarray(to_rgb(la))[0, 0]) == (255, 255, 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    p = Image.open(io.BytesIO(encode(p, "PNG")))
    out = np.asarray(to_rgb(p))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 200, 30)


@pytest.mark.parametrize("mode,value,expected", [("L", 100, 100), ("1", 1, 255), ("CMYK", (0, 0, 0, 0), 255),
                                                 ("I;16", 65535, 255), ("I;16", 32768, 128), ("F", 255.0, 255)])
def test_every_mode_becomes_8_bit_rgb(mode, value, expected):
    out = to_rgb(Image.new(mode, (5, 3), value))
    assert out.mode == "RGB" and out.size == (5, 3)
    assert np.asarray(out)[1, 1].tolist() == [expected] * 3


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = open_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    out = np.asarray(to_rgb(decoded)).astype(int)
    assert out.shape[:2] == (40, 20)  # portrait once rotated
    assert out[:15].mean() > 200 and out[25:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("size", [(64, 32), (32, 64), (17, 9), (33, 33)])
def test_resize_short_side_then_center_crop(size):
    t = ImageTransform(16)
    img = Image.new("RGB", size, (255, 0, 0))
    x = t(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))


def test_center_crop_keeps_the_middle_and_random_crop_moves():
    arr = np.zeros((16, 48, 3), np.uint8)
    arr[:, 16:32] = 255  # white middle third of a wide image
    img = Image.fromarray(arr)
    assert ImageTransform(16)(img).min() > 0.9
    random_crops = {ImageTransform(16, crop="random")(img).mean().item() for _ in range(20)}
    assert len(random_crops) > 1


def test_flip_is_off_by_default_and_flips_when_asked():
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255
    img = Image.fromarray(arr)
    assert all(ImageTransform(8)(img)[0, 0, 0] > 0 for _ in range(10))
    flipped = [ImageTransform(8, flip=True)(img)[0, 0, 0] < 0 for _ in range(40)]
    assert any(flipped) and not all(flipped)


def test_small_images_are_upscaled_or_dropped():
    tiny = Image.new("RGB", (6, 4), (0, 255, 0))
    assert ImageTransform(16)(tiny).shape == (3, 16, 16)
    with pytest.raises(BadImage, match="too small"):
        ImageTransform(16, min_size=8)(tiny)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_decode_from_bytes(fmt):
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    x = ImageTransform(16)(encode(img, fmt))
    assert x.shape == (3, 16, 16) and -1 <= x.min() <= x.max() <= 1


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 255, 255), (0, 0, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert ImageTransform(8)(data).mean() > 0.9


def test_broken_inputs_raise_bad_image(tmp_path):
    good = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for bad in [b"", b"not an image at all", good[: len(good) // 2], empty]:
        with pytest.raises(BadImage):
            ImageTransform(16)(bad)
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(16, crop="left")
