"""``inspect`` reads regular files only, with a bounded read: a FIFO or a device is refused at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepcovid.decode import read_file
from deepcovid.errors import StorageError
from tests.fixtures.services import REPO_ROOT


def _inspect(*paths: str) -> subprocess.CompletedProcess[str]:
    # A child process: a read that blocks must fail this test by its timeout, not hang the suite.
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "inspect", *paths],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200"},
    )


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    done = _inspect(str(fifo))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "unreadable" in done.stdout and "not a regular file" in done.stdout


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_refused_before_reading() -> None:
    with pytest.raises(StorageError) as caught:
        read_file("/dev/zero", max_bytes=1024)
    assert caught.value.reason == "unreadable"
    done = _inspect("/dev/zero")
    assert done.returncode == 1 and "not a regular file" in done.stdout


def test_read_errors_do_not_repeat_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "DOE^JOHN_12345" / "a.png"
    with pytest.raises(StorageError) as caught:
        read_file(missing)
    assert caught.value.reason == "not_found" and "DOE^JOHN" not in str(caught.value)
