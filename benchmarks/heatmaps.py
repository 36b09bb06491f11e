"""What Grad-CAM maps cost: CPU-seconds per explained image, and end-to-end images/s with maps off, for 10%
of the images and for all of them, in one run.

Rows (``deepcovid.pipeline.score_chunk`` over the files as a worker runs it: decode pool, batching, the
``Ensemble`` as the worker loads it, maps written to a local artifact store), interleaved round by round:

- off: ``DEEPCOVID_HEATMAPS=none``.
- 10% flagged: ``DEEPCOVID_HEATMAPS=flagged`` with the ensemble threshold set so that 10% of the images
  are flagged (the random bundle's scores are close together; the threshold is their 90th percentile).
- 100%: ``DEEPCOVID_HEATMAPS=all``.

Then the cost of one map on its own (a pre-scored batch): the closed-form maps from the scoring pass
(``explain_scored``) plus encoding and storing the artifact, against captum's ``LayerGradCam`` (a forward
and a backward pass per network), which is what the closed form replaced.

Images: real chest X-rays from ../shared/data/cxr resized to --size, or synthetic ones (as
``ensemble_throughput.py``). Weights are random: timing does not depend on them.

    .venv/bin/python benchmarks/heatmaps.py [--images 40] [--repeats 3] [--size 1024] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ensemble_throughput import make_images, random_bundle  # noqa: E402
from machine import describe, interleaved, median  # noqa: E402

from deepcovid.artifacts import LocalArtifacts  # noqa: E402
from deepcovid.batches import collate  # noqa: E402
from deepcovid.ensemble import Ensemble  # noqa: E402
from deepcovid.explain import gradcam  # noqa: E402
from deepcovid.heatmaps import attach_heatmaps  # noqa: E402
from deepcovid.pipeline import score_chunk  # noqa: E402
from deepcovid.preprocess import load_image  # noqa: E402
from deepcovid.settings import HeatmapMode, Settings  # noqa: E402
from deepcovid.storage import open_storage  # noqa: E402

FLAG_RATE = 0.10


def chunk_runner(
    ensemble: Ensemble, uris: list[str], settings: Settings, store: LocalArtifacts, expect: int
) -> Callable[[], float]:
    """Images/s of one chunk through the worker's path; checks how many maps were stored."""
    storage = open_storage(settings)

    def run() -> float:
        start = time.perf_counter()
        results = score_chunk(uris, storage=storage, ensemble=ensemble, settings=settings, artifacts=store)
        elapsed = time.perf_counter() - start
        made = sum(r.heatmap is not None and r.heatmap.key is not None for r in results)
        if made != expect or any(not r.scored for r in results):
            raise SystemExit(f"expected {expect} maps and every image scored; got {made} maps")
        return len(uris) / elapsed

    return run


def per_map_cpu(ensemble: Ensemble, batch: torch.Tensor, store: LocalArtifacts, uris: list[str]) -> float:
    """CPU-seconds per image for the maps of a pre-scored batch, encoded and stored."""
    scored = ensemble.score(batch, keep_activations=True)
    results = [scored.to_result(i, uri) for i, uri in enumerate(uris)]
    sizes = [(224, 224)] * len(uris)
    start = time.process_time()
    attach_heatmaps(ensemble, scored, results, sizes, HeatmapMode.all, store)
    return (time.process_time() - start) / len(uris)


def captum_cpu(ensemble: Ensemble, batch: torch.Tensor) -> float:
    """CPU-seconds per image for captum's LayerGradCam on the four networks (maps only, not stored)."""
    inputs = ensemble._prepare(batch)
    start = time.process_time()
    for arch in ensemble.architectures:
        gradcam(ensemble.networks[arch], arch, inputs, ensemble.autocast_dtype, ensemble.temperatures[arch])
    return (time.process_time() - start) / batch.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--map-images", type=int, default=8, help="images of the per-map rows")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="deepcovid-bench-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        paths, origin = make_images(root / "images", args.images, args.size)
        uris = [str(p) for p in paths]
        bundle = random_bundle(root / "bundle")
        settings = Settings(storage_roots=[root / "images"], device="cpu", batch_size=args.batch_size)
        ensemble = Ensemble.from_bundle(bundle, device="cpu", settings=settings)
        store = LocalArtifacts(root / "artifacts")

        print(describe("cpu"))
        print(f"images  : {len(paths)} x {args.size}x{args.size} 8-bit gray PNG ({origin})")
        print(f"ensemble: {', '.join(ensemble.architectures)}, {ensemble.precision}, batch {args.batch_size}")

        inputs = [load_image(p.read_bytes())[0] for p in paths]
        scores = np.concatenate(
            [ensemble.score(collate(inputs[i : i + 16])).ensemble_score for i in range(0, len(inputs), 16)]
        )
        flagging = copy.copy(ensemble)
        flagging.ensemble_threshold = float(np.quantile(scores, 1 - FLAG_RATE))
        flagged = int((scores >= flagging.ensemble_threshold).sum())

        variants = {
            "off": chunk_runner(
                ensemble, uris, settings.model_copy(update={"heatmaps": HeatmapMode.none}), store, 0
            ),
            f"{flagged / len(uris):.0%} flagged": chunk_runner(
                flagging, uris, settings.model_copy(update={"heatmaps": HeatmapMode.flagged}), store, flagged
            ),
            "100%": chunk_runner(
                ensemble, uris, settings.model_copy(update={"heatmaps": HeatmapMode.all}), store, len(uris)
            ),
        }
        cpu: dict[str, list[float]] = {}
        rates = interleaved(variants, args.repeats, log=print, cpu_seconds=cpu)

        batch = collate(inputs[: args.map_images])
        closed_form = median([per_map_cpu(ensemble, batch, store, uris[: args.map_images]) for _ in range(3)])
        captum = median([captum_cpu(ensemble, batch) for _ in range(2)])

    # On a shared machine wall time swings with the other jobs; process CPU time per image does not,
    # and with the cores busy (as they are while a worker scores) it is what bounds images/s.
    off, off_cpu = median(rates["off"]), median(cpu["off"])
    print()
    print(f"| heatmaps | images/s (median of {args.repeats}) | vs off | CPU-s per image | vs off, by CPU |")
    print("|---|---|---|---|---|")
    for name, values in rates.items():
        rate, spent = median(values), median(cpu[name])
        print(f"| {name} | {rate:.2f} | {rate / off:.0%} | {spent / len(uris):.3f} | {off_cpu / spent:.0%} |")
    extra = (median(cpu["100%"]) - median(cpu["off"])) / len(uris)
    print()
    print("| one map (4 networks + ensemble) | CPU-s per explained image |")
    print("|---|---|")
    print(f"| end to end: (100% - off) / images | {extra:.4f} |")
    print(f"| closed form from the scoring pass, encoded and stored | {closed_form:.4f} |")
    print(f"| captum LayerGradCam (forward + backward), maps only | {captum:.4f} |")


if __name__ == "__main__":
    main()
