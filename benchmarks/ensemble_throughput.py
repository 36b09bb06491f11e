"""Ensemble images/s: the original Deep-COVID inference style vs the worker's scoring path vs the ceilings.

Rows, all measured in one process and interleaved round by round (so load changes hit every row alike):

- reference: the style of the original Deep-COVID test code: batch 1, fp32, autograd on (no
  ``no_grad``), the four networks one after the other, and each image decoded again for each network
  from its file with PIL + torchvision ``Resize(224)/CenterCrop(224)/ToTensor/Normalize``.
- worker: ``deepcovid.pipeline.score_chunk`` over the files (local storage, decode thread pool,
  batching, ``Ensemble`` as the worker loads it) at each batch size.
- compute ceiling: a pre-made uint8 batch through ``Ensemble.score`` (normalise + four networks +
  combine), no reading or decoding; ``eager`` is the same with the bundle's networks as plain eval-mode
  modules (no BatchNorm folding), to show what loading buys.
- decode ceiling: read + decode + preprocess only, with the pipeline's decode thread pool.
- with ``--precision int8`` (OpenVINO, the ``openvino`` extra): the bundle gains int8 networks (forced on:
  random weights), and at the largest batch size the same run also measures the worker and compute
  ceiling in bf16 and the reference "OpenVINO int8 (NNCF default)" compute-only and end to end
  (benchmarks/int8_rows.py); the last line gives the two ratios the int8 path is judged by.
  ``--compare-cpu-streams N ...`` adds worker and ceiling rows with other CPU stream counts.

Images: real chest X-rays from ../shared/data/cxr, resized to --size (default 1024x1024, 8-bit gray PNG),
or synthetic X-ray-like images when that folder is absent. Weights are random (a 4-network bundle built
with ``build_network(arch, "none")``): timing does not depend on the weights.

    .venv/bin/python benchmarks/ensemble_throughput.py [--device cpu] [--images 16] \
        [--batch-sizes 1 8 16] [--repeats 3] [--size 1024]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_rows import (  # noqa: E402
    REFERENCE,
    int8_bundle,
    reference_compute_runner,
    reference_end_to_end_runner,
    reference_models,
)
from machine import SHARED_DATA, describe, interleaved, median  # noqa: E402

from deepcovid.batches import collate, normalize  # noqa: E402
from deepcovid.bundle import Bundle, load_networks, save_bundle  # noqa: E402
from deepcovid.devices import resolve_device  # noqa: E402
from deepcovid.ensemble import Ensemble  # noqa: E402
from deepcovid.networks import ARCHITECTURES, COVID_INDEX, build_network  # noqa: E402
from deepcovid.pipeline import score_chunk  # noqa: E402
from deepcovid.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image  # noqa: E402
from deepcovid.settings import Settings  # noqa: E402
from deepcovid.storage import open_storage  # noqa: E402

SHARED_CXR = SHARED_DATA / "cxr"
DISTINCT = 16


def make_images(out: Path, count: int, size: int, fmt: str = "PNG") -> tuple[list[Path], str]:
    """``count`` gray ``size``x``size`` images in ``out``; says whether they came from real X-rays.

    At most ``DISTINCT`` different images are encoded; the rest are copies under other names
    (decoding cost does not depend on the name, and encoding hundreds of 2048x2048 PNGs takes minutes).
    """
    sources = sorted(SHARED_CXR.glob("*/*.png")) if SHARED_CXR.is_dir() else []
    suffix = ".png" if fmt == "PNG" else ".jpg"
    encoded: list[bytes] = []
    for i in range(min(count, DISTINCT)):
        if sources:
            image = Image.open(sources[(i * 37) % len(sources)]).convert("L")
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        else:
            image = Image.fromarray(synthetic_xray(size, seed=i))
        buf = io.BytesIO()
        image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        encoded.append(buf.getvalue())
    paths = []
    for i in range(count):
        path = out / f"img{i:04d}{suffix}"
        path.write_bytes(encoded[i % len(encoded)])
        paths.append(path)
    origin = f"real CXRs from {SHARED_CXR.resolve()}" if sources else "synthetic X-ray-like images"
    return paths, f"{origin}, {len(encoded)} distinct"


def synthetic_xray(size: int, seed: int = 0) -> np.ndarray:
    """Smooth body-like intensity with two darker lung fields, ribs and noise (PNG-compresses like a CXR)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = 170 - 90 * ((xx - 0.5) ** 2 * 3 + (yy - 0.55) ** 2 * 1.5)
    lungs = sum(np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.25) ** 2)) for cx in (0.32, 0.68))
    ribs = 12 * np.sin(yy * 60 + 3 * np.abs(xx - 0.5)) * lungs
    image = body - 80 * lungs + ribs + rng.normal(0, 4, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def random_bundle(out: Path) -> Bundle:
    torch.manual_seed(0)
    return save_bundle(out, {arch: build_network(arch, "none") for arch in ARCHITECTURES})


# --- the rows ----------------------------------------------------------------------------------------


def reference_runner(bundle: Bundle, paths: list[Path], device: torch.device) -> Callable[[], float]:
    """Images/s of the original code's style (see module doc)."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    models = [m.to(device).eval() for m in load_networks(bundle).values()]

    def run() -> float:
        start = time.perf_counter()
        for path in paths:
            for model in models:
                image = transform(Image.open(path).convert("RGB")).unsqueeze(0).to(device)
                probability = torch.softmax(model(image), dim=1)[0, COVID_INDEX].item()
                assert 0.0 <= probability <= 1.0
        return len(paths) / (time.perf_counter() - start)

    return run


def worker_runner(
    ensemble: Ensemble, paths: list[Path], settings: Settings, batch_size: int
) -> Callable[[], float]:
    chunk_settings = settings.model_copy(update={"batch_size": batch_size})
    storage = open_storage(chunk_settings)
    uris = [str(p) for p in paths]

    def run() -> float:
        start = time.perf_counter()
        results = score_chunk(uris, storage=storage, ensemble=ensemble, settings=chunk_settings)
        elapsed = time.perf_counter() - start
        failed = [r for r in results if r.status != "scored"]
        if failed:
            raise SystemExit(
                f"worker path failed {len(failed)} images: {failed[0].reason} {failed[0].detail}"
            )
        return len(paths) / elapsed

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling_runner(ensemble: Ensemble, batch: torch.Tensor, count: int) -> Callable[[], float]:
    """Ensemble.score on a pre-made uint8 batch, enough calls to cover ``count`` images."""
    calls = max(1, -(-count // batch.shape[0]))

    def run() -> float:
        _sync(ensemble.device)
        start = time.perf_counter()
        for _ in range(calls):
            ensemble.score(batch)
        _sync(ensemble.device)
        return calls * batch.shape[0] / (time.perf_counter() - start)

    return run


def eager_runner(
    bundle: Bundle, batch: torch.Tensor, count: int, device: torch.device
) -> Callable[[], float]:
    """The four networks as plain eval-mode channels_last modules (no folding), same batch."""
    models = [
        m.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
        for m in load_networks(bundle).values()
    ]
    calls = max(1, -(-count // batch.shape[0]))

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(calls):
                inputs = normalize(batch.to(device))
                probs = [torch.softmax(m(inputs), dim=1)[:, COVID_INDEX] for m in models]
                torch.stack(probs).cpu()
        _sync(device)
        return calls * batch.shape[0] / (time.perf_counter() - start)

    return run


def with_torch_threads(threads: int, run: Callable[[], float]) -> Callable[[], float]:
    """Run with ``torch.set_num_threads(threads)``, restoring the previous count after."""

    def wrapped() -> float:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run()
        finally:
            torch.set_num_threads(previous)

    return wrapped


def decode_runner(paths: list[Path], threads: int) -> Callable[[], float]:
    """Read + decode + preprocess only, ``threads`` at a time, as the pipeline's pool does it."""

    def one(path: Path) -> np.ndarray:
        return load_image(path.read_bytes(), name=path.name)[0]

    def run() -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, paths))
        return len(paths) / (time.perf_counter() - start)

    return run


# --- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 16 (CPU), 64 128 256 (CUDA)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="side of the square test images")
    parser.add_argument("--format", choices=("PNG", "JPEG"), default="PNG")
    parser.add_argument(
        "--precision", default="auto", help="Ensemble precision: auto, fp32, fp16, bf16, int8"
    )
    parser.add_argument(
        "--compare-cpu-streams",
        type=int,
        nargs="*",
        default=[],
        help="also run worker and ceiling at the largest batch size with these DEEPCOVID_CPU_STREAMS",
    )
    parser.add_argument("--decode-threads", type=int, default=None, help="default: Settings (cores)")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: Settings / torch's own")
    parser.add_argument(
        "--compare-decode-threads",
        type=int,
        nargs="*",
        default=[],
        help="also run the worker at the largest batch size with these decode_threads",
    )
    parser.add_argument(
        "--compare-torch-threads",
        type=int,
        nargs="*",
        default=[],
        help="also run worker and ceiling at the largest batch size with these torch threads",
    )
    parser.add_argument("--reference-images", type=int, default=None, help="images for the reference row")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    sizes = args.batch_sizes or ([64, 128, 256] if device.type == "cuda" else [1, 8, 16])
    with tempfile.TemporaryDirectory(prefix="deepcovid-bench-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        paths, origin = make_images(root / "images", args.images, args.size, args.format)
        bundle = random_bundle(root / "bundle")
        uint8 = [load_image(p.read_bytes())[0] for p in paths]
        int8 = args.precision == "int8"
        if int8:
            bundle = int8_bundle(bundle, root / "bundle-int8", collate(uint8[:DISTINCT]))
        overrides: dict[str, object] = {"storage_roots": [root / "images"], "device": str(device)}
        if int8:
            overrides["cpu_int8"] = "on"
        if args.decode_threads:
            overrides["decode_threads"] = args.decode_threads
        if args.torch_threads is not None:
            overrides["torch_threads"] = args.torch_threads
        if args.compile:
            overrides["compile"] = True
        settings = Settings(**overrides)  # type: ignore[arg-type]
        torch_default_threads = torch.get_num_threads()  # what the original code ran with
        ensemble = Ensemble.from_bundle(
            bundle, device=str(device), precision=args.precision, settings=settings
        )

        print(describe(str(device)))
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(
            f"images  : {len(paths)} x {args.size}x{args.size} 8-bit gray {args.format} ({origin}), "
            f"mean {mean_kb:.0f} KiB"
        )
        print(
            f"worker  : decode_threads {settings.decode_threads}, torch threads {torch.get_num_threads()}, "
            f"precision {ensemble.precision}, compile {settings.compile}; medians of {args.repeats} "
            "interleaved rounds"
        )
        variants: dict[str, Callable[[], float]] = {}
        if not args.no_reference:
            ref_paths = paths[: args.reference_images] if args.reference_images else paths
            variants["reference"] = with_torch_threads(
                torch_default_threads, reference_runner(bundle, ref_paths, device)
            )
        variants["decode"] = decode_runner(paths, settings.decode_threads)
        for size in sizes:
            batch = collate([uint8[i % len(uint8)] for i in range(size)])
            if device.type == "cuda":
                batch = batch.pin_memory()
            variants[f"worker/{size}"] = worker_runner(ensemble, paths, settings, size)
            variants[f"ceiling/{size}"] = ceiling_runner(ensemble, batch, len(paths))
            for threads in args.compare_decode_threads if size == max(sizes) else []:
                variants[f"worker/{size}/dt{threads}"] = worker_runner(
                    ensemble, paths, settings.model_copy(update={"decode_threads": threads}), size
                )
            for threads in args.compare_torch_threads if size == max(sizes) else []:
                variants[f"worker/{size}/torch{threads}"] = with_torch_threads(
                    threads, worker_runner(ensemble, paths, settings, size)
                )
                variants[f"ceiling/{size}/torch{threads}"] = with_torch_threads(
                    threads, ceiling_runner(ensemble, batch, len(paths))
                )
                if not args.no_eager:
                    variants[f"eager/{size}/torch{threads}"] = with_torch_threads(
                        threads, eager_runner(bundle, batch, len(paths), device)
                    )
            if not args.no_eager and size == max(sizes):
                variants[f"eager/{size}"] = eager_runner(bundle, batch, len(paths), device)
            for streams in args.compare_cpu_streams if size == max(sizes) else []:
                other_settings = settings.model_copy(update={"cpu_streams": streams})
                other = Ensemble.from_bundle(bundle, str(device), args.precision, settings=other_settings)
                variants[f"worker/{size}/streams{streams}"] = worker_runner(other, paths, settings, size)
                variants[f"ceiling/{size}/streams{streams}"] = ceiling_runner(other, batch, len(paths))
            if int8 and size == max(sizes):
                bf16 = Ensemble.from_bundle(bundle, str(device), "bf16", settings=settings)
                variants[f"bf16-worker/{size}"] = worker_runner(bf16, paths, settings, size)
                variants[f"bf16-ceiling/{size}"] = ceiling_runner(bf16, batch, len(paths))
                models = reference_models(bundle, collate(uint8[:DISTINCT]))
                variants[f"ov-reference-compute/{size}"] = reference_compute_runner(models, batch, len(paths))
                variants[f"ov-reference-e2e/{size}"] = reference_end_to_end_runner(
                    models, paths, size, settings.decode_threads
                )
        # Warm-up (allocators, oneDNN kernels, cuDNN autotuning, torch.compile): one batch per size.
        for size in sizes:
            warm = collate([uint8[i % len(uint8)] for i in range(size)])
            ensemble.score(warm)
            if f"eager/{size}" in variants:
                eager_runner(bundle, warm, 1, device)()
        cpu: dict[str, list[float]] = {}
        rates = interleaved(
            variants, args.repeats, log=lambda line: print(line, file=sys.stderr, flush=True), cpu_seconds=cpu
        )
        counts = {name: len(paths) for name in variants}
        if "reference" in variants:
            counts["reference"] = len(ref_paths)
        for name in variants:
            if name.startswith(("ceiling", "eager", "bf16-ceiling", "ov-reference-compute")):
                batch_size = int(name.split("/")[1])
                counts[name] = max(1, -(-len(paths) // batch_size)) * batch_size
        cpu_per_image = {name: [t / counts[name] for t in times] for name, times in cpu.items()}
        cores = (os.cpu_count() or 1) if device.type == "cpu" else None
        print_table(rates, sizes, len(paths), cpu_per_image, cores)


def print_table(
    rates: dict[str, list[float]],
    sizes: list[int],
    count: int,
    cpu_per_image: dict[str, list[float]],
    cores: int | None = None,
) -> None:
    """The table; with ``cores`` (CPU runs) also the rate the cores allow when they decode and compute."""
    ref = median(rates["reference"]) if "reference" in rates else float("nan")
    decode_rate = median(rates["decode"])
    int8_last: tuple[float, float] | None = None
    print()
    print(
        f"{'path':<44}{'batch':>6}{'images/s':>10}{'min..max':>16}{'x reference':>13}{'of ceiling':>12}"
        f"{'of decode':>11}{'CPU s/img':>11}"
    )

    def row(label: str, batch: str, key: str, ceiling: float | None = None) -> None:
        values = rates[key]
        value = median(values)
        spread = f"{min(values):.2f}..{max(values):.2f}"
        ratio = f"{value / ref:.2f}x" if ref == ref else "-"
        share = f"{value / ceiling:.0%}" if ceiling else ""
        of_decode = f"{value / decode_rate:.0%}" if key.startswith("worker") else ""
        cpu = f"{median(cpu_per_image[key]):.3f}" if key in cpu_per_image else ""
        print(
            f"{label:<44}{batch:>6}{value:>10.2f}{spread:>16}{ratio:>13}{share:>12}{of_decode:>11}{cpu:>11}"
        )

    if "reference" in rates:
        row("reference (original style, decode x4)", "1", "reference")
    row("decode+preprocess only (pipeline pool)", "-", "decode")
    for size in sizes:
        ceiling = median(rates[f"ceiling/{size}"])
        row("worker: pipeline.score_chunk end to end", str(size), f"worker/{size}", ceiling)
        for key in sorted(k for k in rates if k.startswith(f"worker/{size}/dt")):
            row(f"  worker with decode_threads {key.rsplit('/dt', 1)[1]}", str(size), key, ceiling)
        row("compute ceiling: Ensemble.score, no decode", str(size), f"ceiling/{size}")
        if cores and f"ceiling/{size}" in cpu_per_image and "decode" in cpu_per_image:
            # On CPU decoding shares the cores with the networks: this is the most end to end can reach.
            both = median(cpu_per_image[f"ceiling/{size}"]) + median(cpu_per_image["decode"])
            worker = median(rates[f"worker/{size}"])
            print(
                f"{'  cores ceiling: cores / (compute + decode CPU s)':<44}{size:>6}{cores / both:>10.2f}"
                f"{'':>16}{'':>13}{worker / (cores / both):>12.0%}  (worker's share)"
            )
        for key in sorted(k for k in rates if k.startswith(f"worker/{size}/streams")):
            streams = key.rsplit("/streams", 1)[1]
            streams_ceiling = median(rates[f"ceiling/{size}/streams{streams}"])
            row(f"  worker with {streams} CPU stream(s)", str(size), key, streams_ceiling)
            row(f"  ceiling with {streams} CPU stream(s)", str(size), f"ceiling/{size}/streams{streams}")
        for key in sorted(k for k in rates if k.startswith(f"worker/{size}/torch")):
            threads = key.rsplit("/torch", 1)[1]
            thread_ceiling = median(rates[f"ceiling/{size}/torch{threads}"])
            row(f"  worker with {threads} torch thread(s)", str(size), key, thread_ceiling)
            row(f"  ceiling with {threads} torch thread(s)", str(size), f"ceiling/{size}/torch{threads}")
            if f"eager/{size}/torch{threads}" in rates:
                label = f"  eager, no BN folding, {threads} torch thread(s)"
                row(label, str(size), f"eager/{size}/torch{threads}", thread_ceiling)
        if f"eager/{size}" in rates:
            row("  eager networks (no BN folding)", str(size), f"eager/{size}", ceiling)
        if f"bf16-worker/{size}" in rates:
            bf16_ceiling = median(rates[f"bf16-ceiling/{size}"])
            row("bf16 worker: score_chunk end to end", str(size), f"bf16-worker/{size}", bf16_ceiling)
            row("bf16 compute ceiling: Ensemble.score", str(size), f"bf16-ceiling/{size}")
            row(f"{REFERENCE}, end to end", str(size), f"ov-reference-e2e/{size}")
            row(f"{REFERENCE}, compute only", str(size), f"ov-reference-compute/{size}")
            int8_last = (
                median(rates[f"ceiling/{size}"]) / median(rates[f"ov-reference-compute/{size}"]),
                median(rates[f"worker/{size}"]) / median(rates[f"bf16-worker/{size}"]),
            )
    print(
        f"(images per round: {count}; 'of ceiling': share of the compute ceiling at the same batch size; "
        "'of decode': share of the decode-only rate; 'CPU s/img': process CPU time per image, all threads; "
        "'cores ceiling': the rate the CPU cores allow when they both decode and run the networks)"
    )
    if int8_last is not None:
        print(
            f"int8 compute vs OpenVINO int8 reference: {int8_last[0]:.2f}x; "
            f"int8 end to end vs bf16 end to end: {int8_last[1]:.2f}x"
        )


if __name__ == "__main__":
    main()
