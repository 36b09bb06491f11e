"""Local reads stay beneath the storage roots even while the tree under them changes.

The race: a path is checked, then opened. Another process that swaps a parent directory for a symlink
between the two steps used to get reads of a file outside the root through.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deepcovid import beneath
from deepcovid.errors import StorageError
from deepcovid.settings import Settings
from deepcovid.storage import open_storage

READS = 20_000
INSIDE = b"inside the archive"
SECRET = b"SECRET outside the archive"

# Exchanges the directory and a symlink to the outside atomically (renameat2 RENAME_EXCHANGE), so the
# parent is always one or the other; falls back to rename + symlink where renameat2 is missing.
SWAPPER = r"""
import ctypes, os, sys
parent, link, stop = sys.argv[1:4]
libc = ctypes.CDLL(None, use_errno=True)
exchange = getattr(libc, "renameat2", None)
AT_FDCWD, EXCHANGE = -100, 2
swaps = 0
while not os.path.exists(stop):
    if exchange is not None and exchange(AT_FDCWD, parent.encode(), AT_FDCWD, link.encode(), EXCHANGE) == 0:
        swaps += 1
        continue
    exchange = None
    os.rename(parent, parent + ".real")
    os.symlink(os.readlink(link), parent)
    os.unlink(parent)
    os.rename(parent + ".real", parent)
    swaps += 1
print(swaps)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("resolver", ["openat2", "walk"])
def test_swapping_a_parent_for_a_symlink_never_reads_outside_the_root(
    tmp_path: Path, resolver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of opening beneath a root: openat2, and the walk used where the kernel lacks it."""
    if resolver == "openat2" and not beneath.openat2_available():
        pytest.skip("this kernel has no openat2")
    monkeypatch.setattr(beneath, "OPENAT2", resolver == "openat2")
    root = tmp_path / "archive"
    parent = root / "patient"
    parent.mkdir(parents=True)
    (parent / "image.png").write_bytes(INSIDE)
    outside = tmp_path / "elsewhere" / "patient"
    outside.mkdir(parents=True)
    (outside / "image.png").write_bytes(SECRET)
    link = root / "patient.swap"
    link.symlink_to(outside)
    stop = tmp_path / "stop"

    storage = open_storage(Settings(storage_roots=[root]))  # type: ignore[arg-type]
    uri = str(parent / "image.png")
    outcomes: dict[str, int] = {}
    unexpected: list[BaseException] = []
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(parent), str(link), str(stop)], stdout=subprocess.PIPE, text=True
    )
    try:
        for _ in range(READS):
            try:
                data = storage.read(uri)
            except StorageError as exc:
                outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
                continue
            except Exception as exc:  # noqa: BLE001 - counted: a race must map to a storage reason
                unexpected.append(exc)
                continue
            key = "secret" if data == SECRET else "inside" if data == INSIDE else "other"
            outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        stop.touch()
        out, _ = swapper.communicate(timeout=30)
    swaps = int(out.strip() or 0)

    kinds = sorted({repr(exc) for exc in unexpected})[:3]
    summary = f"{outcomes}, {len(unexpected)} unexpected exceptions {kinds}, {swaps} swaps"
    print(summary)  # shown with -s: how often the swap was caught mid-read
    assert swaps > 100, f"the swapping process barely ran, the test proves nothing: {summary}"
    escaped = outcomes.get("secret", 0)
    assert escaped == 0, f"{escaped} of {READS} reads escaped the root: {summary}"
    assert not unexpected, summary
    assert set(outcomes) <= {"inside", "not_found", "outside_storage_root"}, summary
    assert outcomes.get("inside", 0) > 0, summary
