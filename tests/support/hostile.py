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
import socket
import struct
import zlib

from PIL import Image

from cnnserve.core.onnxmeta import LOGITS


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


# --- files within every limit whose decoding is slow (Python-level or repeated work): only a CPU budget stops them

def gif_comment_blocks(size: int = 19_000_000) -> bytes:
    """A 28x28 GIF whose comment extension is ``size`` bytes of 1-byte sub-blocks: Pillow reads each
    sub-block in a Python loop (measured: 2.3 s of Python for a 19 MB file)."""
    gif = _encode(Image.new("L", (28, 28), 128), "GIF")
    head = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)  # header, screen descriptor, colour table
    return gif[:head] + b"\x21\xfe" + b"\x01c" * (size // 2) + b"\x00" + gif[head:]


def bmp_rle4(side: int = 7000) -> bytes:
    """A side x side 4-bit run-length-encoded BMP (about 400 kB at 7000): Pillow expands its runs in a
    Python loop, pixel by pixel (measured: 2.5-5.7 s)."""
    row = b"".join(bytes([min(255, side - x), 0x12]) for x in range(0, side, 255)) + b"\x00\x00"
    data = row * side + b"\x00\x01"
    palette = b"".join(bytes([i * 16, i * 16, i * 16, 0]) for i in range(16))
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 4, 2, len(data), 2835, 2835, 16, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def jpeg_repeated_scans(side: int = 7000, scans: int = 3000) -> bytes:
    """A side x side grey progressive JPEG whose first AC scan is repeated ``scans`` times (about 500 kB):
    every scan is a pass over every block of the picture, in C, whatever the draft scale (measured:
    17-23 s for 3,000 at 7000 x 7000)."""
    jpeg = _encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    pos, segments = 2, []
    while pos < len(jpeg):  # walk the markers; a scan runs to the next marker that is not RSTn or a stuffed 0
        marker = jpeg[pos + 1]
        if marker == 0xD9:
            break
        length = struct.unpack_from(">H", jpeg, pos + 2)[0]
        end = pos + 2 + length
        if marker == 0xDA:
            while not (jpeg[end] == 0xFF and jpeg[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        segments.append((marker, jpeg[pos:end]))
        pos = end
    ac = next(seg for marker, seg in segments if marker == 0xDA and seg[4 + 2 * seg[4] + 1] > 0)  # Ss > 0
    out = b"".join(seg for _, seg in segments)
    return jpeg[:2] + out + ac * scans + b"\xff\xd9"


def grey_png(side: int = 7000) -> bytes:
    """A legal side x side 8-bit grey PNG of one colour (about 50 kB at 7000, 49 MB decoded)."""
    return png_header_only(side, side, (b"\0" + b"\x80" * side) * side, mode_byte=0)


@functools.cache
def slow_images() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, status, code) of files within every limit whose decoding takes seconds: the
    decode budget (``decode_cpu_ms``) is what answers them (made once a process; about 30 MB)."""
    return {
        "gif, 19 MB of 1-byte comment sub-blocks": (gif_comment_blocks(), 413, "decode_too_costly"),
        "bmp 7000x7000 RLE4 (400 kB)": (bmp_rle4(), 413, "decode_too_costly"),
        "jpeg 7000x7000 progressive, 3,000 AC scans": (jpeg_repeated_scans(), 413, "decode_too_costly"),
    }


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
        "outputs a string": (json.dumps({"inputs": [good], "outputs": LOGITS}).encode(), 400, "bad_output"),
        "id a number": (json.dumps({"inputs": [good], "id": 7}).encode(), 400, "bad_request"),
        "data of strings": (req(data=["a"] * 4), 400, "bad_data"),
    }


# -- hostile models: an export whose metadata lies, or whose graph never ends or answers NaN ------------------
# Written straight into a model store by a test (as someone with write access to the store could): every one
# must be refused by a load, in words, while the server keeps serving, and none may cost more than its trial.

def _model(src):
    import onnx

    return onnx.load(str(src))


def _set_meta(model, **changes) -> None:
    from cnnserve.core import onnxmeta

    props = {p.key: p for p in model.metadata_props}
    spec = json.loads(props[onnxmeta.KEY_SPEC].value)
    spec.update(changes)
    props[onnxmeta.KEY_SPEC].value = json.dumps(spec)
    if "labels" in changes:
        props[onnxmeta.KEY_LABELS].value = json.dumps(changes["labels"])


def _save(model, out) -> str:
    import onnx

    onnx.save(model, str(out))
    return str(out)


def model_with_labels(src, out, n: int = 5) -> str:
    """The export at ``src`` whose metadata names ``n`` labels for the graph's own number of output columns."""
    model = _model(src)
    _set_meta(model, labels=[f"class-{i}" for i in range(n)])
    return _save(model, out)


def model_claiming_input(src, out, height: int, width: int) -> str:
    """The export at ``src`` whose metadata claims a ``height`` x ``width`` input, its graph's input left free in
    both (so that only running it can tell)."""
    model = _model(src)
    _set_meta(model, height=height, width=width)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    return _save(model, out)


def _add_to_outputs(model, term_nodes, term: str) -> None:
    """``logits`` and ``probabilities`` become themselves plus the scalar ``term`` (made by ``term_nodes``)."""
    from onnx import helper

    from cnnserve.core import onnxmeta

    g = model.graph
    for node in g.node:
        node.output[:] = [f"{o}_raw" if o in onnxmeta.OUTPUTS else o for o in node.output]
        node.input[:] = [f"{i}_raw" if i in onnxmeta.OUTPUTS else i for i in node.input]
    g.node.extend(term_nodes)
    g.node.extend(helper.make_node("Add", [f"{o}_raw", term], [o]) for o in onnxmeta.OUTPUTS)


def model_giving_nan(src, out) -> str:
    """The export at ``src`` whose outputs are all NaN, whatever the image."""
    from onnx import TensorProto, helper

    model = _model(src)
    nan = helper.make_node("Constant", [], ["nan_term"],
                           value=helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]))
    _add_to_outputs(model, [nan], "nan_term")
    return _save(model, out)


def model_never_ending(src, out) -> str:
    """The export at ``src`` whose outputs wait for an ONNX ``Loop`` of 2^62 iterations over a value taken from
    the input (so that no optimiser can fold it away)."""
    from onnx import TensorProto, helper

    from cnnserve.core import onnxmeta

    model = _model(src)
    f32 = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one_v", f32, [], [1.0])),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "forever",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", f32, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", f32, [])])
    nodes = [
        helper.make_node("Cast", [onnxmeta.INPUT], ["pixels_f"], to=f32),
        helper.make_node("ReduceSum", ["pixels_f"], ["v0"], keepdims=0),
        helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("trips_v", TensorProto.INT64, [], [2**62])),
        helper.make_node("Constant", [], ["go"], value=helper.make_tensor("go_v", TensorProto.BOOL, [], [True])),
        helper.make_node("Loop", ["trips", "go", "v0"], ["v_end"], body=body),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero_v", f32, [], [0.0])),
        helper.make_node("Mul", ["v_end", "zero"], ["loop_term"]),
    ]
    _add_to_outputs(model, nodes, "loop_term")
    return _save(model, out)


def raw_http(srv, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> tuple:
    """One request on a connection of its own, written byte for byte (a client library would refuse or tidy some
    of these headers): (status, [(name, value)], body), or an AssertionError when no whole answer came back."""
    head = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close",
            b"Content-Length: %d" % len(body), *(k + b": " + v for k, v in headers)]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    raw_head, sep, rest = answer.partition(b"\r\n\r\n")
    assert sep, f"no whole answer (connection dropped?): {answer[:200]!r}"
    status_line, *lines = raw_head.split(b"\r\n")
    status = int(status_line.split()[1])
    fields = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]
    length = next((int(v) for k, v in fields if k == b"content-length"), None)
    assert length is None or len(rest) == length, f"answer cut short: {len(rest)} of {length} bytes"
    return status, fields, rest
