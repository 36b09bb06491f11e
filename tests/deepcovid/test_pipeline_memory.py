"""A chunk's memory does not grow with its length (issue 12, item 5): decode work is submitted in bounded
windows and preprocessed images are released once scored.

Measured in a child process (peak RSS) with an instant stand-in ensemble, so only the pipeline's own
memory is measured, and a storage that serves the same RGB PNG for every URI.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.services import REPO_ROOT, service_env

CHILD = r"""
import io, json, resource, sys
from types import SimpleNamespace

import numpy as np
from PIL import Image

from deepcovid.ensemble import combine
from deepcovid.pipeline import score_chunk
from deepcovid.settings import Settings

count = int(sys.argv[1])
buffer = io.BytesIO()
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buffer, "PNG")
data = buffer.getvalue()


class Storage:
    def read(self, uri):
        return data


class Ensemble:
    device = SimpleNamespace(type="cpu")

    def score(self, batch):
        return combine({"resnet18": np.full(len(batch), 0.25)})


settings = Settings(batch_size=16, decode_threads=2)
warm_up = [f"/archive/x/{i}.png" for i in range(64)]
score_chunk(warm_up, storage=Storage(), ensemble=Ensemble(), settings=settings)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = score_chunk(
    [f"/archive/x/{i}.png" for i in range(count)], storage=Storage(), ensemble=Ensemble(), settings=settings
)
assert len(results) == count and all(r.scored for r in results)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"count": count, "baseline_mib": before / 1024, "peak_mib": peak / 1024}))
"""


def peak_rss(count: int) -> dict[str, float]:
    """Peak RSS (MiB) of a child that scores ``count`` URIs, and its baseline after a warm-up chunk."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(count)],
        cwd=REPO_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_long_chunk_needs_no_more_memory_than_a_short_one() -> None:
    measured = peak_rss(4000)
    growth = measured["peak_mib"] - measured["baseline_mib"]
    # 4,000 preprocessed 224x224 RGB images are 600 MB; a bounded window holds a few batches of them.
    assert growth < 200, measured
