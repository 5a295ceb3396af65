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
import stat
import struct
import time

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DEFAULTS, Limits
from .spec import ModelSpec

#: File name endings of images, for folders walked by training and batch scoring.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Modes that convert to "L" and "RGB" (LAB and the premultiplied "La" do not: Pillow refuses them).
MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV", "LA", "PA",
                   "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def pixel_bytes(mode: str) -> int:
    """Bytes one pixel takes in Pillow's memory: 1 for 1/L/P, 2 for 16-bit grey, 4 for the rest
    (Pillow stores RGB as RGBX, and 32-bit int and float grey take 4 bytes)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


class ImageError(ValueError):
    """An image that cannot be used. ``status`` is the HTTP status it deserves, ``code`` a short reason."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image"):
        super().__init__(message)
        self.status = status
        self.code = code


DEFAULT_LIMITS = DEFAULTS.limits


def count_chunks(data: bytes, limit: int) -> int:
    """PNG chunks (all of them) or JPEG marker segments up to the first scan; stops counting past
    ``limit``. Other formats: 0 (their structure is bounded through ``Image.tile``)."""
    n = 0
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        pos, end = 8, len(data)
        while pos + 8 <= end and n <= limit:
            length, kind = struct.unpack_from(">I4s", data, pos)
            n += 1
            pos += 12 + length
            if kind == b"IEND":
                break
    elif data[:2] == b"\xff\xd8":
        pos, end = 2, len(data)
        while pos + 4 <= end and n <= limit:
            if data[pos] != 0xFF:
                break
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            n += 1
            if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
                pos += 2
                continue
            if marker in (0xDA, 0xD9):  # start of scan: libjpeg (C) takes it from here
                break
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return n


def open_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """Bytes to a PIL image whose header passed the limits; no pixel is decoded yet.

    Costs time in proportion to the bytes (the chunk count is walked), never to the pixels."""
    if not data:
        raise ImageError("the image is empty (0 bytes)", 400, "empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is {len(data):,} bytes; the limit is {limits.max_bytes:,} (max_request_mb)",
                         413, "too_large")
    chunks = count_chunks(data, limits.max_chunks)
    if chunks > limits.max_chunks:
        raise ImageError(f"the image holds more than {limits.max_chunks:,} chunks or segments (max_chunks)",
                         400, "too_many_chunks")
    problem = None
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        problem = ("the data is not an image Pillow can read", 400, "not_an_image")
    except Image.DecompressionBombError as e:
        problem = (f"the image has too many pixels ({e})", 413, "too_many_pixels")
    except Exception as e:  # Pillow raises a zoo of types for damaged headers
        problem = (f"the image header is damaged: {_reason(e)}", 400, "bad_image")
    if problem:  # raised outside the handler: no traceback of Pillow's frames stays attached
        raise ImageError(*problem)
    try:
        check_header(img, limits)
        if any(_tile_past_end(tile, len(data)) for tile in img.tile):
            # a truncated file claiming 7000x7000 (a 186-byte TIFF): refused before the decoder
            # allocates the whole picture
            raise ImageError(f"the image data is truncated: its pixels cannot fit in the {len(data):,} bytes sent",
                             400, "truncated")
    except ImageError:
        img.close()
        raise
    return img


def check_header(img: Image.Image, limits: Limits) -> None:
    """Format, mode, size, aspect ratio and structure of an opened image against the limits."""
    if img.format not in limits.formats:
        raise ImageError(f"format {img.format} is not accepted; accepted: {', '.join(sorted(limits.formats))}",
                         415, "unsupported_format")
    if img.mode not in MODES:
        raise ImageError(f"pixel mode {img.mode} cannot be converted to grey or RGB", 415, "unsupported_mode")
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"the image has no pixels ({w}x{h})", 400, "bad_image")
    if w * h > limits.max_pixels:
        raise ImageError(f"the image is {w}x{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,} "
                         "(max_image_pixels)",
                         413, "too_many_pixels")
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise ImageError(f"the image is {w}x{h}: its aspect ratio passes the limit of "
                         f"{limits.max_aspect_ratio:g}:1 (max_aspect_ratio)", 400, "bad_aspect_ratio")
    if len(img.tile) > limits.max_chunks:
        raise ImageError(f"the image is stored in {len(img.tile):,} strips or tiles; the limit is "
                         f"{limits.max_chunks:,} (max_chunks)", 400, "too_many_chunks")


def _tile_past_end(tile, size: int) -> bool:
    """Whether a tile's pixel data cannot fit in the ``size`` bytes sent: it starts past the end, or
    it is uncompressed and needs more bytes than remain (at least one bit a pixel)."""
    try:
        codec, (x0, y0, x1, y1), offset = tile[0], tile[1], tile[2]
    except (TypeError, ValueError, IndexError):
        return False
    if not isinstance(offset, int):
        return False
    return offset >= size or (codec == "raw" and offset + (x1 - x0) * (y1 - y0) // 8 > size)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


def load_image(img: Image.Image, target: tuple[int, int] | None = None,
               limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """An opened image fully decoded, upright and single-frame.

    ``target`` (width, height) lets JPEG decoding use draft mode: the decoder scales by
    1/2, 1/4 or 1/8 while decoding, never below twice the target, which is far cheaper
    than decoding every pixel and resizing afterwards. The decoded size (after draft) is
    checked against ``limits.max_decoded_bytes`` before a pixel is allocated.
    """
    problem = None
    try:
        if img.format == "JPEG" and target is not None:
            # Draft needs the size after orientation is undone: EXIF rotations swap the axes.
            tw, th = target
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                tw, th = th, tw
            img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (2 * tw, 2 * th))
        need = img.width * img.height * pixel_bytes(img.mode)
        if need > limits.max_decoded_bytes:
            problem = (f"the image would take {need / 2**20:,.0f} MiB decoded ({img.width}x{img.height} "
                       f"{img.mode}); the limit is {limits.max_decoded_bytes / 2**20:,.0f} MiB (max_decoded_mb)",
                       413, "too_large_decoded")
        else:
            img.seek(0)  # first frame of an animation
            img.load()  # decode every pixel now: a truncated file fails here, not in a batch
            return ImageOps.exif_transpose(img)
    except MemoryError:
        problem = ("not enough memory to decode the image", 413, "too_large_decoded")
    except Exception as e:
        problem = (f"the image data is damaged or truncated: {_reason(e)}", 400, "truncated")
    img.close()  # its pixel buffer goes now, whatever still refers to the object
    raise ImageError(*problem)


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, target: tuple[int, int] | None = None) -> Image.Image:
    """Bytes to a fully decoded, upright, single-frame PIL image (``open_image`` then ``load_image``)."""
    return load_image(open_image(data, limits), target, limits)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit grey modes scaled (not clipped) to 8 bits, without a wider temporary."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8), "L")
    if img.mode == "I":
        a = np.asarray(img)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        hi = 1.0 if a.size and float(a.max()) <= 1.0 else 255.0
        return Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    return img


def convert(img: Image.Image, channels: int) -> Image.Image:
    """Any mode of ``MODES`` to "L" (1 channel) or "RGB" (3). Transparency is flattened onto black
    (alpha-premultiplied), so a transparent background reads as the dark background of
    digit-style data sets."""
    img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    want = "L" if channels == 1 else "RGB"
    return img if img.mode == want else img.convert(want)


def resize(img: Image.Image, spec: ModelSpec) -> Image.Image:
    """Resize by the spec's policy (see ``cnnserve.core.spec.RESIZE_POLICIES``). The output is the
    spec's size and nothing larger is allocated: the centre crop is taken from the source (a
    box), not from a resized copy of the whole image."""
    w, h = spec.width, spec.height
    if img.size == (w, h):
        return img
    if spec.resize == "stretch":
        return img.resize((w, h), RESAMPLE[spec.interpolation], reducing_gap=3.0)
    # center-crop: shorter side to size / crop_pct, then the centre, mapped back onto the source
    scale = max(w, h) / spec.crop_pct / min(img.size)
    sw, sh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    sx, sy = sw / img.width, sh / img.height
    left, top = (sw - w) // 2, (sh - h) // 2
    box = (left / sx, top / sy, (left + w) / sx, (top + h) / sy)
    return img.resize((w, h), RESAMPLE[spec.interpolation], box=box, reducing_gap=3.0)


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
    resize, array layout). Any failure is an ``ImageError``; the image is closed (its pixel buffer
    freed) whatever happens, so a rejected image holds no memory even while its error is alive."""
    t0 = time.perf_counter()
    img = open_image(data, limits) if isinstance(data, bytes) else data
    problem = None
    try:
        loaded = load_image(img, draft_target(spec), limits)
        t1 = time.perf_counter()
        out = to_array(loaded, spec)
        loaded.close()
    except ImageError as e:
        problem = (str(e), e.status, e.code)
    except MemoryError:
        problem = ("not enough memory to convert the image", 413, "too_large_decoded")
    except Exception as e:  # a mode or content Pillow cannot convert: the client's image, not our fault
        problem = (f"the image cannot be converted: {_reason(e)}", 400, "bad_image")
    finally:
        img.close()
    if problem:
        raise ImageError(*problem)
    if timings is not None:
        timings["decode"], timings["resize"] = t1 - t0, time.perf_counter() - t1
    return out


def read_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file, at most ``limit + 1`` of them (so a caller can tell "too large").

    Opened without blocking and checked to be a regular file before a byte is read: a FIFO, a
    device or a socket named in a manifest is an error, never a hang. Errors are ``ImageError``
    naming the file."""
    problem = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                        "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or
                        stat.S_ISBLK(mode) else "not a regular file")
                problem = (f"{os.fsdecode(path)}: not a regular file ({kind})", 400, "not_a_file")
            else:
                os.set_blocking(fd, True)
                with open(fd, "rb", closefd=False) as f:
                    return f.read(limit + 1)
        finally:
            os.close(fd)
    except OSError as e:
        problem = (f"{os.fsdecode(path)}: cannot read: {e.strerror or e}", 400, "unreadable")
    raise ImageError(*problem)


def load_file(path: str | os.PathLike, spec: ModelSpec, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """An image file to the uint8 C x H x W array the model takes; errors name the file."""
    data = read_file(path, limits.max_bytes)
    try:
        return preprocess(data, spec, limits)
    except ImageError as e:
        problem = (f"{os.fsdecode(path)}: {e}", e.status, e.code)
    raise ImageError(*problem)


def load_folder(folder: str | os.PathLike, spec: ModelSpec, limit: int | None = None) -> np.ndarray:
    """The images of a folder (recursively, sorted, at most ``limit``) as the model's uint8 input, decoded
    as the service decodes; files that are not images are skipped. A ValueError names a folder with none."""
    from pathlib import Path

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    out = []
    for p in paths[:limit]:
        try:
            out.append(load_file(p, spec))
        except ImageError:
            continue  # a file that is not an image is not an image of the data
    if not out:
        raise ValueError(f"{folder}: no readable images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return np.stack(out)
