"""Images per second of ``Ensemble.score`` (all four networks) at a given batch size and precision,
plus the largest COVID-probability difference of each reduced precision against fp32.

Uses a random-weight bundle (timing does not depend on the weights) unless --bundle is given.
Run: .venv/bin/python benchmarks/ensemble_score.py [--device cpu] [--batch 16] [--repeat 3] [--bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.fixtures
from deepcovid.bundle import load_bundle, save_bundle  # noqa: E402
from deepcovid.devices import resolve_device  # noqa: E402
from deepcovid.ensemble import Ensemble  # noqa: E402
from deepcovid.networks import ARCHITECTURES, build_network  # noqa: E402
from tests.fixtures.images import synthetic_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="also time bf16 on CPU")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle = load_bundle(args.bundle)
        else:
            torch.manual_seed(0)
            bundle = save_bundle(Path(tmp) / "b", {a: build_network(a, "none") for a in ARCHITECTURES})
        device = resolve_device(args.device)
        precisions = ["fp32"]
        if device.type == "cuda":
            precisions += ["fp16", "bf16"]
        elif args.bf16:
            precisions.append("bf16")
        batch = torch.from_numpy(synthetic_batch(args.batch))
        reference: dict[str, np.ndarray] | None = None
        print(
            f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
            f"torch threads {torch.get_num_threads()}, batch {args.batch}, best of {args.repeat}"
        )
        print(f"{'precision':<10}{'images/s':>10}{'ms/batch':>10}{'max |dp| vs fp32':>18}")
        for precision in precisions:
            ensemble = Ensemble.from_bundle(bundle, device=str(device), precision=precision)
            probs = ensemble.probabilities(batch)  # warm-up
            best = float("inf")
            for _ in range(args.repeat):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                ensemble.score(batch)
                best = min(best, time.perf_counter() - start)
            if reference is None:
                reference = probs
            diff = max(float(np.abs(probs[a] - reference[a]).max()) for a in probs)
            print(f"{precision:<10}{args.batch / best:>10.1f}{best * 1000:>10.0f}{diff:>18.4f}")


if __name__ == "__main__":
    main()
