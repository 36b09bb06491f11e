"""Decompression bombs: small files whose headers declare huge images are refused from the header or decoded
within a bounded memory, alone and several at once.

Each case decodes in a fresh child process (``decode_path``, what ``deepcovid inspect`` runs) and reports
its peak resident memory (``VmHWM``). The child's address space is capped, so a regression fails the test
instead of exhausting the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.faults import (
    float_tiff_of_zeros,
    j2k_dicom_declaring,
    png_of_zeros,
    rle_dicom_declaring,
    webp_of_zeros,
)
from tests.fixtures.services import REPO_ROOT, service_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PEAK_LIMIT_MB = 600  # the target for `deepcovid inspect` on such files
# Three decode threads keep freed memory in their own malloc arenas, so the peak of images decoded one
# after another still varies with scheduling (518-705 MB measured); without the shared budget: 1,944 MB.
SHARED_PEAK_LIMIT_MB = 900
ADDRESS_SPACE_CAP = 4 << 30  # the child's safety net: a MemoryError there is still a failed test
SIDE = 8000

CHILD = """
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor

resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from deepcovid.decode import decode_path
from deepcovid.errors import DecodeError


def outcome(path):
    try:
        return ["decoded", list(decode_path(path).pixels.shape)]
    except DecodeError as exc:
        return [exc.reason, exc.detail]


with ThreadPoolExecutor(len(sys.argv) - 2) as pool:
    outcomes = list(pool.map(outcome, sys.argv[2:]))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"outcomes": outcomes, "peak_mb": int(status["VmHWM"].split()[0]) // 1024}))
"""

BOMBS: dict[str, Callable[[], bytes]] = {
    # 12 MB of RLE declaring 8000 x 8000 RGB at 32 bits per sample: 768 MB decoded.
    "rle-rgb32.dcm": lambda: rle_dicom_declaring(SIDE, samples=3, bits=32),
    # Under 1 KB of JPEG 2000 declaring 8000 x 8000 RGB: OpenJPEG works in 32-bit integers, 768 MB.
    "j2k-rgb8.dcm": lambda: j2k_dicom_declaring(SIDE, components=3, precision=8),
    # Under 1 KB of JPEG 2000 declaring 8000 x 8000 16-bit gray: 256 MB in OpenJPEG's integers.
    "j2k-gray16.dcm": lambda: j2k_dicom_declaring(SIDE, components=1, precision=16),
    # About 250 KB of PNG each, 8000 x 8000: RGBA, 16-bit RGB, 16-bit gray.
    "rgba.png": lambda: png_of_zeros(SIDE, color_type=6, bit_depth=8),
    "rgb48.png": lambda: png_of_zeros(SIDE, color_type=2, bit_depth=16),
    "gray16.png": lambda: png_of_zeros(SIDE, color_type=0, bit_depth=16),
    # 34 bytes of lossless WebP declaring 8000 x 8000: libwebp decodes to RGBA, then Pillow copies it twice.
    "black.webp": lambda: webp_of_zeros(SIDE),
    # About 250 KB of TIFF, 8000 x 8000 32-bit floats: in one strip (libtiff decodes the whole strip
    # before Pillow copies it), and in strips of 64 rows.
    "float.tif": lambda: float_tiff_of_zeros(SIDE),
    "float-strips.tif": lambda: float_tiff_of_zeros(SIDE, rows_per_strip=64),
}

# What each file must come to with the default DEEPCOVID_MAX_DECODED_BYTES: refused from its header, or
# decoded (RGB and RGBA to HxWx3, the rest to HxW).
EXPECTED = {
    "rle-rgb32.dcm": "too_large",
    "j2k-rgb8.dcm": "too_large",
    "j2k-gray16.dcm": [SIDE, SIDE],
    "rgba.png": [SIDE, SIDE, 3],
    "rgb48.png": [SIDE, SIDE, 3],
    "gray16.png": [SIDE, SIDE],
    "black.webp": "too_large",
    "float.tif": "too_large",
    "float-strips.tif": [SIDE, SIDE],
}


def decode_in_child(paths: list[Path]) -> tuple[list[object], int]:
    command = [sys.executable, "-c", CHILD, str(ADDRESS_SPACE_CAP), *map(str, paths)]
    env = service_env(OPENBLAS_NUM_THREADS="1")
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outcomes = [o[1] if o[0] == "decoded" else o[0] for o in report["outcomes"]]
    return outcomes, report["peak_mb"]


def write_bombs(directory: Path, names: list[str]) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        path = directory / f"{i}-{name}"
        path.write_bytes(BOMBS[name]())
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_bomb_is_refused_or_decoded_in_bounded_memory(tmp_path: Path, name: str) -> None:
    outcomes, peak_mb = decode_in_child(write_bombs(tmp_path, [name]))
    assert outcomes == [EXPECTED[name]]
    assert peak_mb < PEAK_LIMIT_MB, f"{name}: peak RSS {peak_mb} MB"


def test_three_large_images_at_once_share_one_budget(tmp_path: Path) -> None:
    """Each of these fits the limit alone; decoded by three threads at once they must not add up."""
    names = ["j2k-gray16.dcm", "rgba.png", "float-strips.tif"]
    outcomes, peak_mb = decode_in_child(write_bombs(tmp_path, names))
    assert outcomes == [EXPECTED[name] for name in names]
    assert peak_mb < SHARED_PEAK_LIMIT_MB, f"peak RSS {peak_mb} MB"


def test_three_rle_bombs_at_once_are_all_refused(tmp_path: Path) -> None:
    outcomes, peak_mb = decode_in_child(write_bombs(tmp_path, ["rle-rgb32.dcm"] * 3))
    assert outcomes == ["too_large"] * 3
    assert peak_mb < PEAK_LIMIT_MB, f"peak RSS {peak_mb} MB"
