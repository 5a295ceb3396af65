"""JPEG decode + resize to a 224-px model input: cnnserve's Pillow path against simplejpeg.

    python -m bench.jpeg [--out bench/results/DATE-jpeg.md]

Both decoders use DCT scaling (Pillow's ``draft``, simplejpeg's ``min_width``/``min_height``), so
each decodes at the smallest 1/1, 1/2, 1/4 or 1/8 scale that stays at least twice the target, then
the same Pillow resize and centre crop (``cnnserve.core.preprocess.to_array``) makes the model's
input. Images: synthetic photographs (smooth colour fields with texture and noise, so the entropy
coder has real work) at four camera-like sizes, quality 90, 4:2:0. One process, one thread, the
median of repeated passes; simplejpeg is measured only where it is installed (it is not a
dependency: see the report for why).
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time

import numpy as np
from PIL import Image

from cnnserve.core.preprocess import preprocess, to_array
from cnnserve.core.spec import ModelSpec

SIZES = [(320, 240), (640, 480), (1280, 960), (4000, 3000)]


def photo(w: int, h: int, seed: int = 0) -> bytes:
    """A JPEG that codes like a photograph: low-frequency colour, mid-frequency texture, sensor noise."""
    rng = np.random.default_rng(seed)
    small = rng.random((max(2, h // 64), max(2, w // 64), 3)) * 255
    base = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    texture = 30 * np.sin(xx / 7.0 + 3 * np.sin(yy / 23.0))[..., None]
    noise = rng.normal(0, 8, (h, w, 3))
    img = np.clip(base + texture + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def simplejpeg_preprocess(data: bytes, spec: ModelSpec) -> np.ndarray:
    import simplejpeg

    side = round(max(spec.width, spec.height) / spec.crop_pct)
    rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=2 * side, min_height=2 * side)
    return to_array(Image.fromarray(rgb), spec)


def timed(fns, data: bytes, spec: ModelSpec, seconds: float = 1.0, rounds: int = 7) -> list[float]:
    """Median milliseconds per image for each of ``fns``, their passes interleaved (so a noisy
    neighbour slows all of them alike), ``rounds`` passes of about ``seconds / rounds`` each."""
    per = [[] for _ in fns]
    for fn in fns:
        fn(data, spec)
    for _ in range(rounds):
        for fn, times in zip(fns, per):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / rounds:
                fn(data, spec)
                n += 1
            times.append((time.perf_counter() - t0) / n * 1000)
    return [statistics.median(t) for t in per]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the markdown table here as well")
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    spec = ModelSpec(arch="resnet18", channels=3, height=224, width=224, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225), resize="center-crop")
    try:
        import simplejpeg
        have = simplejpeg.__version__
    except ImportError:
        have = None
    rows = ["| JPEG | bytes | Pillow + draft ms | simplejpeg ms | Pillow / simplejpeg |", "|---|---|---|---|---|"]
    for w, h in SIZES:
        data = photo(w, h)
        fns = [lambda d, s: preprocess(d, s)] + ([simplejpeg_preprocess] if have else [])
        pil, sj = (timed(fns, data, spec, args.seconds) + [None])[:2]
        a = np.abs(preprocess(data, spec).astype(int) - simplejpeg_preprocess(data, spec)).max() if have else None
        rows.append(f"| {w}x{h} | {len(data):,} | {pil:.2f} | {f'{sj:.2f}' if sj else 'not installed'} | "
                    f"{f'{pil / sj:.2f}x (max pixel difference {a})' if sj else '-'} |")
        print(rows[-1], flush=True)
    head = (f"Pillow {Image.__version__}, simplejpeg {have or 'not installed'}, Python {platform.python_version()}, "
            f"{platform.machine()}; one thread; decode + resize + centre crop to 3x224x224.")
    text = head + "\n\n" + "\n".join(rows) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
