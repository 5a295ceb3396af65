"""Image bytes to a validated uint8 array at the spec's size: the one path every image takes.

The HTTP service, the batch scorer and the training data loaders all call these
functions, so a picture is decoded, oriented, converted and resized the same way
wherever it enters. Normalisation is not here: it lives inside the ONNX graph.

``decode`` fully decodes (so a truncated file fails here, alone, and not inside a
batch), enforces byte, pixel and format limits, honours EXIF orientation, takes the
first frame of animations, and uses JPEG draft mode when the target is far smaller.
``to_array`` converts any mode to the spec's channels and resizes by its policy.

No torch, no model code: this module ships in the serving container.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnserve.spec import ModelSpec

DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"})
RESAMPLE = Image.Resampling.BILINEAR


class ImageError(ValueError):
    """An image that cannot be used. ``status`` is the HTTP status it deserves, ``code`` a short reason."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Limits:
    """What an image may be. Over ``max_bytes``: 413; over ``max_pixels``: 413 (a decompression
    bomb is refused from its header, before any pixel is decoded); a format not in ``formats``: 415."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    formats: frozenset[str] = field(default=DEFAULT_FORMATS)


DEFAULT_LIMITS = Limits()


def open_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """Bytes to a PIL image whose header passed the limits; no pixel is decoded yet (cheap)."""
    if not data:
        raise ImageError("the image is empty (0 bytes)", 400, "empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is {len(data):,} bytes; the limit is {limits.max_bytes:,}", 413, "too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("the data is not an image Pillow can read", 400, "not_an_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image has too many pixels ({e})", 413, "too_many_pixels") from None
    except Exception as e:  # Pillow raises a zoo of types for damaged headers
        raise ImageError(f"the image header is damaged: {e}", 400, "bad_image") from None
    if img.format not in limits.formats:
        raise ImageError(f"format {img.format} is not accepted; accepted: {', '.join(sorted(limits.formats))}",
                         415, "unsupported_format")
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageError(f"the image is {w}x{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,}",
                         413, "too_many_pixels")
    if w < 1 or h < 1:
        raise ImageError(f"the image has no pixels ({w}x{h})", 400, "bad_image")
    return img


def load_image(img: Image.Image, target: tuple[int, int] | None = None) -> Image.Image:
    """An opened image fully decoded, upright and single-frame.

    ``target`` (width, height) lets JPEG decoding use draft mode: the decoder scales by
    1/2, 1/4 or 1/8 while decoding, never below twice the target, which is far cheaper
    than decoding every pixel and resizing afterwards.
    """
    try:
        if img.format == "JPEG" and target is not None:
            # Draft needs the size after orientation is undone: EXIF rotations swap the axes.
            tw, th = target
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                tw, th = th, tw
            img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (2 * tw, 2 * th))
        img.seek(0)  # first frame of an animation
        img.load()  # decode every pixel now: a truncated file fails here, not in a batch
        return ImageOps.exif_transpose(img)
    except Exception as e:
        raise ImageError(f"the image data is damaged or truncated: {e}", 400, "truncated") from None


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, target: tuple[int, int] | None = None) -> Image.Image:
    """Bytes to a fully decoded, upright, single-frame PIL image (``open_image`` then ``load_image``)."""
    return load_image(open_image(data, limits), target)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey modes scaled (not clipped) to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        hi = 1.0 if a.size and float(a.max()) <= 1.0 else 255.0
        return Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    return img


def convert(img: Image.Image, channels: int) -> Image.Image:
    """Any mode to "L" (1 channel) or "RGB" (3). Transparency is flattened onto black
    (alpha-premultiplied), so a transparent background reads as the dark background of
    digit-style data sets."""
    img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    want = "L" if channels == 1 else "RGB"
    return img if img.mode == want else img.convert(want)


def resize(img: Image.Image, spec: ModelSpec) -> Image.Image:
    """Resize by the spec's policy (see ``cnnserve.spec.RESIZE_POLICIES``)."""
    w, h = spec.width, spec.height
    if img.size == (w, h):
        return img
    if spec.resize == "stretch":
        return img.resize((w, h), RESAMPLE, reducing_gap=3.0)
    # center-crop: shorter side to size / crop_pct, then the centre
    scale = max(w, h) / spec.crop_pct / min(img.size)
    sw, sh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((sw, sh), RESAMPLE, reducing_gap=3.0)
    left, top = (sw - w) // 2, (sh - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_array(img: Image.Image, spec: ModelSpec) -> np.ndarray:
    """A decoded image as uint8 C x H x W at the spec's size and channels."""
    a = np.asarray(resize(convert(img, spec.channels), spec), dtype=np.uint8)
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def draft_target(spec: ModelSpec) -> tuple[int, int]:
    """The smallest decode size (width, height) the spec's resize can start from without losing detail."""
    if spec.resize == "center-crop":
        side = round(max(spec.width, spec.height) / spec.crop_pct)
        return side, side
    return spec.width, spec.height


def preprocess(data: bytes | Image.Image, spec: ModelSpec, limits: Limits = DEFAULT_LIMITS,
               timings: dict | None = None) -> np.ndarray:
    """Image bytes (or an image from ``open_image``) to the uint8 C x H x W array the model takes.
    ``timings``, if given, gets the seconds spent in ``decode`` and in ``resize`` (mode conversion,
    resize, array layout)."""
    t0 = time.perf_counter()
    img = open_image(data, limits) if isinstance(data, bytes) else data
    img = load_image(img, draft_target(spec))
    t1 = time.perf_counter()
    out = to_array(img, spec)
    if timings is not None:
        timings["decode"], timings["resize"] = t1 - t0, time.perf_counter() - t1
    return out


def load_file(path: str | os.PathLike, spec: ModelSpec, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """An image file to the uint8 C x H x W array the model takes; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}", 400, "unreadable") from None
    try:
        return preprocess(data, spec, limits)
    except ImageError as e:
        raise ImageError(f"{path}: {e}", e.status, e.code) from None
