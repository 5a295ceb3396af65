"""cnnserve/core/preprocess.py on real images encoded by Pillow."""

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cnnserve.core.config import Settings
from cnnserve.core.preprocess import DEFAULT_LIMITS, ImageError, decode, load_file, preprocess, to_array
from cnnserve.core.spec import ModelSpec
from tests.conftest import encode

GREY = ModelSpec("lenet5", 1, 28, 28, (0.5,), (0.5,), labels=tuple("0123456789"))
RGB = ModelSpec("resnet18", 3, 32, 32, (0.5,) * 3, (0.5,) * 3, resize="center-crop", labels=("a", "b"))


def pil_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    return np.stack([x, x[::-1, ::-1], np.full_like(x, 128)], -1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "1"])
@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
def test_every_mode_converts_to_the_spec(mode, spec):
    base = Image.fromarray(gradient())
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = preprocess(pil_bytes(img, fmt), spec)
    assert out.dtype == np.uint8 and out.shape == spec.input_shape
    assert out.max() > 100  # content survived (16-bit is scaled, not clipped to white)
    if mode == "I;16":  # the same picture at 8 bits gives the same array, to rounding
        eight = preprocess(pil_bytes(base.convert("L")), spec)
        assert np.abs(out.astype(int) - eight.astype(int)).max() <= 1


def test_palette_transparency_and_alpha_flatten_onto_black():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[5:15, 5:15] = (255, 255, 255, 255)  # opaque white square on transparent
    rgba[..., :3][rgba[..., 3] == 0] = 255  # transparent pixels carry white colour values
    for img in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("P"),
                Image.fromarray(rgba, "RGBA").convert("LA")):
        if img.mode == "P":
            img.info["transparency"] = img.getpixel((0, 0))
        out = to_array(decode(pil_bytes(img)), GREY.__class__(**{**GREY.__dict__, "height": 20, "width": 20}))
        assert out[0, 0, 0] == 0 and out[0, 10, 10] == 255


def test_exif_orientation_is_honoured():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright = decode(pil_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.size == (20, 40)
    top = np.asarray(upright.convert("L"))
    assert top[:10].mean() > 200 and top[-10:].mean() < 50  # white half now on top


def test_first_frame_of_animation():
    frames = [Image.new("L", (16, 16), v) for v in (200, 10, 90)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = preprocess(buf.getvalue(), GREY)
    assert abs(int(out.mean()) - 200) <= 2


@pytest.mark.parametrize("data, status, code", [
    (b"", 400, "empty"),
    (b"hello, I am not an image", 400, "not_an_image"),
])
def test_bad_bytes(data, status, code):
    with pytest.raises(ImageError) as e:
        preprocess(data, GREY)
    assert (e.value.status, e.value.code) == (status, code)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_fail_at_decode(fmt):
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), fmt)
    with pytest.raises(ImageError) as e:
        decode(data[: len(data) // 2])
    assert e.value.status == 400


def test_limits():
    png = encode(gradient(100, 100))
    with pytest.raises(ImageError) as e:
        decode(png, replace(DEFAULT_LIMITS, max_bytes=100))
    assert e.value.status == 413
    with pytest.raises(ImageError) as e:
        decode(png, replace(DEFAULT_LIMITS, max_pixels=99 * 99))
    assert e.value.status == 413 and e.value.code == "too_many_pixels"
    with pytest.raises(ImageError) as e:
        decode(encode(gradient(), "BMP"), Settings(formats="PNG").limits)
    assert e.value.status == 415


def test_decompression_bomb_refused_from_header():
    # A 1-bit 20000x20000 PNG compresses to a few kB but would decode to 400 M pixels.
    bomb = pil_bytes(Image.new("1", (20000, 20000)))
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as e:
        decode(bomb)
    assert e.value.status == 413


def test_jpeg_draft_mode_matches_full_decode():
    big = np.asarray(Image.fromarray(gradient(64, 48)).resize((2400, 1800), Image.Resampling.BILINEAR))
    data = encode(big, "JPEG", quality=92)
    drafted = preprocess(data, RGB)
    full = to_array(decode(data), RGB)  # decoded at full size, resized afterwards
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3
    assert decode(data, target=(32, 32)).size[0] < 2400  # draft really decoded fewer pixels


def test_resize_policies():
    wide = Image.fromarray(gradient(200, 100))
    assert to_array(wide, RGB).shape == (3, 32, 32)  # centre crop keeps the aspect ratio
    assert to_array(wide, GREY).shape == (1, 28, 28)  # stretch


def test_load_file_names_the_file(tmp_path):
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8\xff" + b"\x00" * 10)
    with pytest.raises(ImageError, match="broken.jpg"):
        load_file(p, GREY)
    with pytest.raises(ImageError, match="missing.png: cannot read"):
        load_file(tmp_path / "missing.png", GREY)
