"""What ``deepcovid inspect`` finds: which files are images, and what each decodes to or why it fails.

The decoder answers for every file in turn, so a folder can be checked before it is screened; nothing
here prints or returns patient data (DICOM tags beyond modality and view stay out).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from deepcovid.decode import decode_path
from deepcovid.errors import ImageError
from deepcovid.formats import IMAGE_SUFFIXES

SHOWN_DICOM_TAGS = ("Modality", "ViewPosition")


@dataclass(frozen=True)
class FileReport:
    """One file: what it decodes to (``reason`` None), or the failure reason and its detail."""

    path: Path
    reason: str | None
    text: str

    @property
    def ok(self) -> bool:
        return self.reason is None


def image_files(paths: Iterable[Path]) -> tuple[list[Path], int]:
    """The files to decode, and how many non-image files were skipped.

    Files given are taken as they are. Directories are walked recursively in sorted order, taking image
    suffixes and files without a suffix (extension-less DICOM); hidden files and folders are left out.
    """
    files: list[Path] = []
    skipped = 0
    for given in paths:
        if not given.is_dir():
            files.append(given)
            continue
        for found in sorted(given.rglob("*")):
            relative = found.relative_to(given).parts
            if any(part.startswith(".") for part in relative) or not found.is_file():
                continue
            if found.suffix.lower() in IMAGE_SUFFIXES or not found.suffix:
                files.append(found)
            else:
                skipped += 1
    return list(dict.fromkeys(files)), skipped


def describe_file(path: Path, *, max_pixels: int | None) -> FileReport:
    """Decode ``path`` and say what it is: format, size, bit depth, mode (and DICOM modality and view)."""
    try:
        info = decode_path(path, max_pixels=max_pixels).info
    except ImageError as exc:
        return FileReport(path, exc.reason, exc.detail)
    except Exception as exc:  # a bug, not the file: report it against this file and go on
        return FileReport(path, "internal_error", f"{type(exc).__name__}: {exc}")
    text = f"{info.format} {info.width}x{info.height} {info.bit_depth}-bit {info.mode}"
    if info.dicom:
        text += "".join(f" {info.dicom[k]}" for k in SHOWN_DICOM_TAGS if k in info.dicom)
    return FileReport(path, None, text)


def inspect_files(files: list[Path], *, max_pixels: int | None, threads: int) -> Iterator[FileReport]:
    """``describe_file`` for every file, decoded on ``threads`` threads, reported in the order given."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        yield from pool.map(lambda path: describe_file(path, max_pixels=max_pixels), files)
