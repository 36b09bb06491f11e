"""Files and directories that hold URIs (patient data) are created readable by their owner only.

Modes are set at creation, before anything is written, whatever the process umask; existing paths are
left as the operator set them. A folder that cannot be made or written is a ``UserError`` (exit 21).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_private_dir(path: Path) -> None:
    """Create ``path`` and each missing parent with mode 0700."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # created by another process meanwhile: theirs to set
        os.chmod(directory, DIR_MODE)  # mkdir's mode passes through the umask


def make_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (an empty file is a valid SQLite database)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def writable_dir(
    path: Path, *, what: str, elsewhere: str, make: Callable[[Path], None] = make_private_dir
) -> None:
    """Make ``path`` (private, unless ``make`` says otherwise) if missing, then check this process may
    create files in it.

    Commands that write call it before any work, so a folder that is missing and cannot be made, or is
    read-only, is one line naming the fix (exit 21) rather than a traceback half-way through. ``what``
    names the folder ("data dir"); ``elsewhere`` is the other way out ("set DEEPCOVID_DATA_DIR to ...").
    """
    try:
        make(path)
    except OSError as exc:
        raise UserError(
            ExitCode.DATA_DIR_NOT_WRITABLE,
            f"{what} {path} does not exist and cannot be created ({exc.strerror or exc}): create it, "
            f"or {elsewhere}",
        ) from None
    if not path.is_dir():
        raise UserError(
            ExitCode.DATA_DIR_NOT_WRITABLE,
            f"{what} {path} is not a directory: {elsewhere}",
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(
            ExitCode.DATA_DIR_NOT_WRITABLE,
            f"{what} {path} is not writable: let this user write to it (e.g. `chmod u+w {path}` as its "
            f"owner), or {elsewhere}",
        )
