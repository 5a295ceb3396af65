"""What the network looks at, from the ONNX model alone (no training framework at serving time).

- **Occlusion** (Zeiler and Fergus, the ZFNet paper): a square of the data set's mean colour slides
  over the model's input; each occluded copy is classified, and the fall of the target class's
  probability is the sensitivity of the pixels it covered (the mean over the patches covering a
  pixel). Only forward passes: the copies go through the model's batcher like any other images.
- **CAM** (class activation maps, Zhou et al. 2016): for networks that end in global average pooling
  and one linear layer, the class's weights applied to the last convolution's feature maps.
  ``cnnserve export`` adds those maps (output ``features``) and the layer's weights (``cam_weights``)
  to such models; one forward pass gives the map.

The maps are pure numpy and Pillow. A request's flow, ``explain_image``: checked against its model, its image
decoded, then the image with its occluded copies (once, for CAM) through the model's batcher like any request
(``engine.py`` decodes and runs), and the map and the answer made of what came back.
"""

from __future__ import annotations

import io
import time

import anyio
import numpy as np
from PIL import Image

from cnnserve.core import onnxmeta
from cnnserve.core.confidence import assess

from .batching import Overloaded
from .engine import Call, Engine
from .errors import APIError
from .registry import Served

METHODS = ("occlusion", "cam")


def check_request(model, method: str, target: int | None, patch: int | None, stride: int | None,
                  max_occlusions: int) -> dict:
    """An explanation request's method, target, patch and stride checked against ``model`` (a 400
    ``APIError`` naming the problem); for occlusion, the patch, stride and count of occluded copies."""
    spec = model.spec
    if method not in METHODS:
        raise APIError(400, "bad_method", f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if target is not None and not 0 <= target < spec.num_classes:
        raise APIError(400, "bad_target", f"target must be a class index from 0 to {spec.num_classes - 1} "
                                          f"for model {model.name!r}, got {target}")
    h, w = spec.height, spec.width
    extra: dict = {}
    if method == "cam":
        if model.cam_weights is None:
            raise APIError(400, "cam_unavailable", f"model {model.name!r} ({spec.arch}) has no class activation "
                           "outputs: cnnserve adds them when it exports or imports a network that ends in global "
                           "average pooling and one linear layer (ResNet, GoogLeNet, DenseNet, MobileNet), and "
                           "found no such head in this one; use method=occlusion")
    else:
        # 0 is a value (refused below), not "unset"
        patch = default_patch(h, w) if patch is None else patch
        stride = max(1, patch // 2) if stride is None else stride
        if not 1 <= patch <= min(h, w) or not 1 <= stride <= min(h, w):
            raise APIError(400, "bad_patch", f"patch and stride must be between 1 and {min(h, w)} pixels of the "
                                             f"model's {h}x{w} input, got patch {patch}, stride {stride}")
        n = occlusion_count(h, w, patch, stride)
        if n > max_occlusions:
            raise APIError(400, "too_many_occlusions", f"patch {patch} and stride {stride} make {n} occluded "
                           f"copies of the {h}x{w} input; the limit is {max_occlusions} "
                           "(max_occlusions): use a larger stride")
        extra = {"patch": patch, "stride": stride, "occlusions": n}
    return extra


async def explain_image(engine: Engine, call: Call, data: bytes, method: str = "occlusion",
                        target: int | None = None, patch: int | None = None, stride: int | None = None,
                        timings: dict | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Where the model looks for ``target`` (default: its top class) in one image: the answer (with the
    image's ``ood_score`` as /classify gives it), the model's input (C x H x W) and the sensitivity map
    (H x W), of the probabilities /classify answers (``calibrated=False``: of the raw softmax). The image and
    its occluded copies are the engine's to decode and run."""
    model, spec = call.model, call.model.spec
    extra = check_request(model, method, target, patch, stride, engine.config.max_occlusions)
    patch, stride = extra.get("patch"), extra.get("stride")
    h, w = spec.height, spec.width
    n = 1 if method == "cam" else 1 + extra["occlusions"]
    try:  # shed now, before the decode and the copies are paid for
        call.served.batcher.check_room(n, call.ticket.priority)
    except Overloaded as e:
        raise APIError(503, "overloaded", str(e), {"Retry-After": str(e.retry_after)}) from None
    pixels = await engine.decode(model, data, timings, call.ticket)
    # Both methods go through the model's batcher like any request (bulk unless the request says
    # otherwise): counted against max_queue, shed with 503, bound by the deadline, and run in slices
    # that let interactive requests in between.
    job = explanation_job(call.served, method)
    if method == "cam":
        logits, raw, features = await engine.run(call, pixels[None], timings, job)
        t = time.perf_counter()
        probs, rows = assess(model.info, logits, raw, call.calibrated)
        tgt = int(probs[0].argmax()) if target is None else target
        heat = cam(features[0], model.cam_weights, tgt, (h, w))
    else:
        fill = np.array([round(m * 255) for m in spec.mean], np.uint8)

        def stacked() -> tuple[np.ndarray, list]:  # the image, then its occluded copies
            copies, boxes = occluded(pixels, patch, stride, fill)
            return np.concatenate([pixels[None], copies]), boxes

        # tens of MB for a 224-px model: copied in a thread, not on the event loop that serves the others
        big = extra["occlusions"] * pixels.nbytes > 2**20
        batch, boxes = await anyio.to_thread.run_sync(stacked) if big else stacked()
        logits, raw = await engine.run(call, batch, timings, job)
        del batch
        t = time.perf_counter()
        probs, rows = assess(model.info, logits, raw, call.calibrated)
        tgt = int(probs[0].argmax()) if target is None else target
        heat = sensitivity(float(probs[0, tgt]), probs[1:, tgt], boxes, patch, (h, w))
    if engine.monitor:  # the image explained is an answer; its occluded copies are not
        engine.monitor.record(model, logits[:1], raw[:1])
    result = {"model": model.name, "version": model.version, "method": method,
              "target": {"index": tgt, "label": spec.labels[tgt]}, "probability": float(probs[0, tgt]),
              "predictions": model.top_k(probs[:1], call.top_k)[0], **rows[0], **extra,
              "map_shape": [h, w], "map": np.round(heat, 5).tolist()}
    if timings is not None:
        timings["explain"] = time.perf_counter() - t
    return result, pixels, heat


def explanation_job(served: Served, method: str):
    """The batcher job of an explanation (one function per version and method, so that those requests batch
    together): logits and probabilities, for CAM with the last feature maps, not counted by the drift
    monitor (the occluded copies are no one's answers: ``explain_image`` counts the image itself)."""
    job = served.jobs.get(method)
    if job is None:
        model = served.model
        outputs = [*onnxmeta.OUTPUTS, onnxmeta.FEATURES] if method == "cam" else list(onnxmeta.OUTPUTS)
        job = served.jobs[method] = lambda pixels: model.run(pixels, outputs)
    return job


def positions(size: int, patch: int, stride: int) -> list[int]:
    """Patch offsets along one axis: every ``stride`` pixels, plus one flush with the far edge."""
    out = list(range(0, size - patch + 1, stride))
    if out[-1] != size - patch:
        out.append(size - patch)
    return out


def default_patch(height: int, width: int) -> int:
    """About a seventh of the shorter side (4 px at 28, 32 px at 224)."""
    return max(2, round(min(height, width) / 7))


def occlusion_count(height: int, width: int, patch: int, stride: int) -> int:
    return len(positions(height, patch, stride)) * len(positions(width, patch, stride))


def occluded(pixels: np.ndarray, patch: int, stride: int, fill: np.ndarray) -> tuple[np.ndarray, list]:
    """Copies of ``pixels`` (C x H x W uint8), one per patch position, with that patch set to ``fill``
    (per channel); and the (top, left) of each patch."""
    _, h, w = pixels.shape
    boxes = [(y, x) for y in positions(h, patch, stride) for x in positions(w, patch, stride)]
    copies = np.repeat(pixels[None], len(boxes), axis=0)
    for i, (y, x) in enumerate(boxes):
        copies[i, :, y:y + patch, x:x + patch] = fill[:, None, None]
    return copies, boxes


def sensitivity(base: float, probs: np.ndarray, boxes: list, patch: int, shape: tuple[int, int]) -> np.ndarray:
    """H x W: per pixel, the mean fall of the target's probability (``base`` minus the occluded copy's)
    over the patches that covered it. Positive: the pixel supported the class."""
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    for p, (y, x) in zip(probs, boxes):
        total[y:y + patch, x:x + patch] += base - float(p)
        count[y:y + patch, x:x + patch] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def cam(features: np.ndarray, weights: np.ndarray, target: int, shape: tuple[int, int]) -> np.ndarray:
    """H x W in [0, 1]: the target's weights over the feature maps (C x h x w), rectified, resized
    bilinearly to the input and scaled by its maximum."""
    m = np.maximum(np.tensordot(weights[target].astype(np.float32), features.astype(np.float32), axes=1), 0)
    up = np.asarray(Image.fromarray(m.astype(np.float32), "F").resize((shape[1], shape[0]), Image.BILINEAR))
    top = float(up.max())
    return (up / top if top > 0 else up).astype(np.float32)


# A perceptually ordered colour map (dark blue, purple, orange, yellow: like matplotlib's "plasma"),
# by linear interpolation between a few of its colours.
_ANCHORS = np.array([[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137], [219, 92, 104],
                     [244, 136, 73], [254, 188, 43], [240, 249, 33]], np.float32)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                 for c in range(3)], axis=1).astype(np.uint8)


CAPTIONS = {"occlusion": ("fall in probability", "brighter: the class's probability fell more when that part "
                                                    "was hidden"),
            "cam": ("relative weight", "brighter: feature maps that weigh more for the class (class activation map)")}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (FreeType)
    except (TypeError, OSError):  # Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels in ``font``."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def heatmap_png(pixels: np.ndarray, heat: np.ndarray, min_side: int = 224, label: str | None = None,
                probability: float | None = None, method: str = "occlusion") -> bytes:
    """A PNG of ``heat`` (H x W; its positive part, scaled by the maximum) in colour over the model's
    input ``pixels`` (C x H x W uint8) in grey, enlarged (nearest) to at least ``min_side``; above it the
    class it explains (``label``, ``probability``) and what brightness means, below it the colour scale
    from 0 to the map's largest value. The same text is in the PNG's Title and Description."""
    from PIL import ImageDraw, PngImagePlugin

    grey = pixels.mean(axis=0) if pixels.shape[0] == 3 else pixels[0].astype(np.float32)
    pos = np.maximum(heat, 0)
    top_value = float(pos.max())
    norm = pos / top_value if top_value > 0 else pos
    colour = _LUT[(norm * 255).astype(np.uint8)].astype(np.float32)
    alpha = (0.25 + 0.6 * norm)[..., None]
    out = (1 - alpha) * grey[..., None] + alpha * colour
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    scale = max(1, -(-min_side // min(img.size)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)

    unit, meaning = CAPTIONS.get(method, CAPTIONS["occlusion"])
    title = (f'{method} map for "{label}"' + (f" (p = {probability:.3f})" if probability is not None else "")
             if label is not None else f"{method} map")
    big, small, pad = _font(13), _font(10), 4
    width = img.width
    lines = ([(line, big) for line in _wrap(title, big, width - 2 * pad)]
             + [(line, small) for line in _wrap(meaning, small, width - 2 * pad)])
    heights = [f.getbbox("Ag")[3] + 3 for _, f in lines]
    top = pad + sum(heights) + pad
    bar_h, bottom = 10, pad + 10 + 3 + 14 + pad
    canvas = Image.new("RGB", (width, top + img.height + bottom), "white")
    canvas.paste(img, (0, top))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for (text, font), h in zip(lines, heights):
        draw.text((pad, y), text, fill=(20, 20, 20), font=font)
        y += h
    # the colour scale: the map's colours from 0 (left) to its largest value (right)
    y0, x0, x1 = top + img.height + pad, pad, width - pad
    ramp = _LUT[np.linspace(0, 255, x1 - x0).round().astype(np.uint8)]
    canvas.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0), "RGB"), (x0, y0))
    ty = y0 + bar_h + 3
    right = f"{top_value:.2g}" if method == "occlusion" else "1"  # 0.43, 0.0031: two significant digits
    draw.text((x0, ty), "0", fill=(60, 60, 60), font=small)
    draw.text((x1 - small.getlength(right), ty), right, fill=(60, 60, 60), font=small)
    draw.text(((width - small.getlength(unit)) / 2, ty), unit, fill=(60, 60, 60), font=small)

    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", f"{meaning}; colour scale 0 to {right} ({unit})")
    buf = io.BytesIO()
    canvas.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()
