"""Milliseconds per image for decode + preprocess, per format: plain path vs the pipeline's fast path.

- plain: ``decode`` then ``to_model_input`` (exact Resize(224)+CenterCrop(224) of the full image).
- fast: ``preprocess.load_image`` (JPEG decoded at a reduced DCT scale, large images box-reduced before
  the final bilinear resize): what the worker runs.
- torchvision: the original code's per-image preprocessing (PIL open, ``convert("RGB")``, torchvision
  Resize/CenterCrop/ToTensor/Normalize), for scale; DICOM has no such path (shown as -).

Formats: 512x512 PNG, 2048x2048 8-bit and 16-bit PNG, 2048x2048 JPEG (q90), and 2048x2048-class DICOM
uncompressed, RLE Lossless and JPEG 2000 Lossless (re-encoded here with pydicom/pylibjpeg from
``../shared/data/dicom/966_fixed.dcm``, a real 2128x2000 12-bit DX; a synthetic 12-bit image when that
file is absent), plus the shared data's JPEG 2000 lossy and JPEG-LS files as they are, when present.
Medians of interleaved repeats (plain, fast, torchvision, plain, ...); one thread, so ms are per core.

    .venv/bin/python benchmarks/decode_preprocess.py [--repeat 5] [--only PNG]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import SHARED_DATA, describe, interleaved, median  # noqa: E402

from deepcovid.decode import decode  # noqa: E402
from deepcovid.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image, to_model_input  # noqa: E402

SHARED_DICOM = SHARED_DATA / "dicom"


def _synthetic(side: int, seed: int = 0) -> np.ndarray:
    """X-ray-like float image in 0..1: smooth body, darker lungs, ribs, noise (compresses like a CXR)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    lungs = sum(np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.25) ** 2)) for cx in (0.32, 0.68))
    body = 0.7 - 0.35 * ((xx - 0.5) ** 2 * 3 + (yy - 0.55) ** 2 * 1.5)
    image = body - 0.3 * lungs + 0.05 * np.sin(yy * 60) * lungs + rng.normal(0, 0.015, (side, side))
    return np.clip(image, 0, 1)


def _pil_bytes(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def pil_cases() -> dict[str, bytes]:
    small = (_synthetic(512) * 255).astype(np.uint8)
    big = _synthetic(2048, seed=1)
    big8 = (big * 255).astype(np.uint8)
    return {
        "PNG 512x512 8-bit": _pil_bytes(Image.fromarray(small), "PNG"),
        "PNG 2048x2048 8-bit": _pil_bytes(Image.fromarray(big8), "PNG"),
        "PNG 2048x2048 16-bit": _pil_bytes(Image.fromarray((big * 65535).astype(np.uint16)), "PNG"),
        "JPEG 2048x2048 q90": _pil_bytes(Image.fromarray(big8), "JPEG", quality=90),
    }


def _dicom_source() -> tuple[object, str]:
    """An uncompressed 12-bit DX dataset: the real 966_fixed.dcm when present, synthetic otherwise."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    real = SHARED_DICOM / "966_fixed.dcm"
    if real.is_file():
        ds = dcmread(real)
        ds.decompress()
        return ds, f"{ds.Columns}x{ds.Rows} {ds.BitsStored}-bit (966_fixed.dcm)"
    pixels = (_synthetic(2048, seed=2) * 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds, "2048x2048 12-bit (synthetic)"


def _dicom_bytes(ds: object) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


def dicom_cases() -> dict[str, bytes]:
    import copy

    from pydicom.uid import JPEG2000Lossless, RLELossless

    cases: dict[str, bytes] = {}
    source, label = _dicom_source()
    cases[f"DICOM {label} raw"] = _dicom_bytes(source)
    for name, uid in (("RLE", RLELossless), ("J2K lossless", JPEG2000Lossless)):
        ds = copy.deepcopy(source)
        try:
            ds.compress(uid)  # type: ignore[attr-defined]
        except Exception as exc:  # an encoder plugin is missing: say so, keep going
            print(f"skipping DICOM {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        cases[f"DICOM {label.split(' (')[0]} {name}"] = _dicom_bytes(ds)
    for filename, what in (("RG1_J2KI.dcm", "J2K lossy"), ("RG1_JLSN.dcm", "JPEG-LS near-lossless")):
        path = SHARED_DICOM / filename
        if path.is_file():
            cases[f"DICOM 1955x1841 15-bit {what}"] = path.read_bytes()
    return cases


def torchvision_path() -> Callable[[bytes], object]:
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return lambda data: transform(Image.open(io.BytesIO(data)).convert("RGB"))


def _ms(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the formats whose name contains this text")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # torchvision's Normalize; keep every column on one core
    print(describe("cpu"))
    print(f"one thread per image; medians of {args.repeat} interleaved repeats\n")
    cases = {**pil_cases(), **dicom_cases()}
    tv = torchvision_path()
    print(f"{'image':<46}{'KiB':>8}{'plain ms':>10}{'fast ms':>10}{'speed-up':>10}{'torchvision ms':>16}")
    for name, data in cases.items():
        if args.only and args.only.lower() not in name.lower():
            continue
        variants = {
            "plain": _ms(lambda d=data: to_model_input(decode(d).pixels)),
            "fast": _ms(lambda d=data: load_image(d)),
        }
        if not name.startswith("DICOM"):
            variants["torchvision"] = _ms(lambda d=data: tv(d))
        for run in variants.values():  # warm-up: codec plugins, imports
            run()
        times = interleaved(variants, args.repeat)
        plain, fast = median(times["plain"]), median(times["fast"])
        tv_ms = f"{median(times['torchvision']):.1f}" if "torchvision" in times else "-"
        print(
            f"{name:<46}{len(data) / 1024:>8.0f}{plain:>10.1f}{fast:>10.1f}{plain / fast:>9.1f}x{tv_ms:>16}"
        )


if __name__ == "__main__":
    main()
