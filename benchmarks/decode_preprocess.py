"""Milliseconds per image for decode + preprocess: plain path (decode, then Resize+CenterCrop) vs
the pipeline's fast path (``preprocess.load_image``: JPEG DCT-scaled decode, box reduce).

Run: .venv/bin/python benchmarks/decode_preprocess.py [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from deepcovid.decode import decode
from deepcovid.preprocess import load_image, to_model_input


def _synthetic(side: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    img = 60 + 120 * np.sin(xx / 37.0) * np.cos(yy / 53.0) ** 2 + rng.normal(0, 8, (side, side))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG16":
        Image.fromarray(pixels.astype(np.uint16) * 16).save(buf, "PNG")
    elif fmt == "JPEG":
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _best_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'image':<22}{'bytes':>10}{'plain ms':>10}{'fast ms':>10}")
    for side in (1024, 2048):
        pixels = _synthetic(side)
        for fmt in ("PNG", "PNG16", "JPEG"):
            data = _encode(pixels, fmt)
            plain = _best_ms(lambda d=data: to_model_input(decode(d).pixels), args.repeat)
            fast = _best_ms(lambda d=data: load_image(d), args.repeat)
            print(f"{fmt + f' {side}x{side}':<22}{len(data):>10}{plain:>10.1f}{fast:>10.1f}")


if __name__ == "__main__":
    main()
