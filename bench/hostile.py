"""Hostile inputs, generated (nothing is stored): the images and Open Inference Protocol bodies
that once cost gigabytes, froze a worker or answered 500, each with the answer it must get now.

Used by the reliability tests (each case over HTTP and in-process under a memory cap) and by
the benchmark's soak. Some of these take tens of GB if a limit regresses: run them only in a
process with an address-space cap (``RLIMIT_AS``).
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib

from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w: int, h: int, idat: bytes = b"\0" * 40, mode_byte: int = 2, depth: int = 8) -> bytes:
    """A PNG claiming w x h whose compressed data is whatever ``idat`` holds (40 zero bytes: 69 bytes)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, mode_byte, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(idat)) + _chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def chunk_flood(kind: bytes = b"tEXt", count: int = 1_330_000) -> bytes:
    """A 28x28 PNG padded with ``count`` tiny ancillary chunks before its pixels (about 16 MB)."""
    png = _encode(Image.new("L", (28, 28), 128), "PNG")
    filler = _chunk(kind, b"k\0v" if kind == b"tEXt" else b"xx") * count
    return png[:33] + filler + png[33:]  # after the 8-byte signature and the 25-byte IHDR chunk


def com_flood(count: int = 3_300_000) -> bytes:
    """A 28x28 JPEG with ``count`` empty comment segments before its frame (about 13 MB)."""
    jpeg = _encode(Image.new("L", (28, 28), 128), "JPEG")
    return jpeg[:2] + b"\xff\xfe\x00\x02" * count + jpeg[2:]


def truncated_tiff(side: int = 7000) -> bytes:
    """The first 186 bytes of an uncompressed side x side RGB TIFF: a header claiming 147 MB of pixels."""
    return _encode(Image.new("RGB", (side, side)), "TIFF")[:186]


def truncated_png(side: int = 3000) -> bytes:
    """A PNG claiming side x side RGB (a few kB) whose data stops half-way: the decoder allocates
    and fills half the picture (18 MB), then fails. Refused after the allocation, so it tests
    that rejections free their memory."""
    whole = png_header_only(side, side, (b"\0" + b"\0" * side * 3) * side)
    return whole[:len(whole) // 2]


def lab_tiff() -> bytes:
    return _encode(Image.new("LAB", (28, 28)), "TIFF")


def rgba16_png(side: int = 7000) -> bytes:
    """A 16-bit RGBA PNG of side x side that compresses to a few hundred kB: a legal image whose
    decode costs side**2 x 4 bytes."""
    row = b"\0" + b"\0" * (side * 8)
    z = zlib.compressobj(9)  # row by row: the 392 MB of raw pixels are never held at once
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


@functools.cache
def images() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, HTTP status, error code) for every hostile image (made once a process:
    about 3 s and 60 MB; do not modify the result)."""
    return {
        "png 1x10000 (69 bytes, center-crop once took 2.9 GB)": (png_header_only(1, 10000), 400, "bad_aspect_ratio"),
        "png 1x49999999": (png_header_only(1, 49_999_999), 400, "bad_aspect_ratio"),
        "png 100000x1": (png_header_only(100_000, 1), 400, "bad_aspect_ratio"),
        "tiff 7000x7000 truncated to 186 bytes": (truncated_tiff(), 400, "truncated"),
        "png 3000x3000 truncated half-way": (truncated_png(), 400, "truncated"),
        "tiff in LAB mode": (lab_tiff(), 415, "unsupported_mode"),
        "png with 1.33 M tEXt chunks": (chunk_flood(b"tEXt"), 400, "too_many_chunks"),
        "png with 1.33 M unknown chunks": (chunk_flood(b"quIx"), 400, "too_many_chunks"),
        "jpeg with 3.3 M COM segments": (com_flood(), 400, "too_many_chunks"),
        "png 8000x8000 (64 M pixels)": (png_header_only(8000, 8000), 413, "too_many_pixels"),
        "png 7000x7000 16-bit RGBA (187 MiB decoded)": (rgba16_png(), 413, "too_large_decoded"),
    }


def v2_bodies(shape: list[int]) -> dict[str, tuple[bytes, int, str]]:
    """name -> (JSON body, status, code) of Open Inference Protocol requests that once answered 500."""
    good = {"name": "pixels", "datatype": "UINT8", "shape": shape, "data": [0] * (shape[0] * shape[1] *
                                                                                 shape[2] * shape[3])}

    def req(**tensor) -> bytes:
        return json.dumps({"inputs": [{**good, **tensor}]}).encode()

    return {
        "shape with a bool": (req(shape=[True, *shape[1:]]), 400, "bad_shape"),
        "parameters a list": (req(parameters=[1]), 400, "bad_parameters"),
        "parameters a string": (req(parameters="x"), 400, "bad_parameters"),
        "binary_data_size a float": (req(parameters={"binary_data_size": 784.0}), 400, "bad_binary"),
        "an integer of 5,000 digits": (b'{"inputs": [{"name": "pixels", "shape": [' + b"9" * 5000 + b"]}]}",
                                       400, "bad_json"),
        "JSON nested 10,000 deep": (b"[" * 10_000 + b"]" * 10_000, 400, "bad_json"),
        "outputs a string": (json.dumps({"inputs": [good], "outputs": "logits"}).encode(), 400, "bad_output"),
        "id a number": (json.dumps({"inputs": [good], "id": 7}).encode(), 400, "bad_request"),
        "data of strings": (req(data=["a"] * 4), 400, "bad_data"),
    }
