"""Decode and preprocess each training image once, into a uint8 memory-mapped array reused across runs.

Layout under ``<data_dir>/cache/train/v<PREPROCESS_VERSION>-<side>/``: ``pixels.u8``, rows of
``side x side x 3`` uint8 (NHWC, so a row viewed as CHW is already channels_last), appended as new images
arrive, and ``index.json``, mapping the sha256 of each file's bytes to its row (or to the reason it could
not be decoded, so a broken file is not decoded again every run). Keyed by content, not by path: a moved or
renamed file is a hit, an edited one a miss, and no path (patient data) is stored. Other versions or sides
are deleted when a cache is opened, so a preprocessing change rebuilds it.

The crop is the inference crop (shorter side, centre square), only at ``side``: at 224 the cached pixels
are exactly what the screener scores; at 256 there is room for random crops down to 224.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from deepcovid import defaults
from deepcovid.decode import decode, read_file
from deepcovid.errors import ImageError
from deepcovid.preprocess import REDUCING_GAP, to_model_input

log = logging.getLogger(__name__)

INDEX = "index.json"
PIXELS = "pixels.u8"


def cache_root(data_dir: Path) -> Path:
    """Where training caches live: ``<data_dir>/cache/train``."""
    return Path(data_dir) / "cache" / "train"


def _version_dir(root: Path, side: int) -> Path:
    return root / f"v{defaults.PREPROCESS_VERSION}-{side}"


@dataclass
class CachedSet:
    """Rows of a cache for some files: ``images`` uint8 [N, 3, side, side] backed by the memory map (the
    pages are shared between DataLoader workers), ``kept`` the indices of the files that decoded,
    ``skipped`` (index, reason) for those that did not, and ``hits`` how many were already cached."""

    images: torch.Tensor
    kept: list[int]
    skipped: list[tuple[int, str]]
    hits: int


class TrainingCache:
    """One preprocessing (version, side) of the training cache; safe for concurrent runs (file lock)."""

    def __init__(self, root: Path, side: int = defaults.TRAIN_CACHE_SIDE) -> None:
        self.side = side
        self.dir = _version_dir(Path(root), side)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._drop_stale(Path(root))

    @property
    def row_bytes(self) -> int:
        return self.side * self.side * 3

    def _drop_stale(self, root: Path) -> None:
        """Delete caches of older preprocessing versions at this side."""
        for other in root.glob(f"v*-{self.side}"):
            if other != self.dir and other.is_dir():
                log.info("removing training cache of an older preprocessing version: %s", other.name)
                shutil.rmtree(other, ignore_errors=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.dir / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_index(self) -> dict[str, int | str]:
        path = self.dir / INDEX
        if not path.is_file():
            return {}
        index = json.loads(path.read_text(encoding="utf-8"))
        rows = (self.dir / PIXELS).stat().st_size // self.row_bytes if (self.dir / PIXELS).exists() else 0
        # A row the index names but the pixel file lacks (a run killed mid-write) is decoded again.
        return {k: v for k, v in index.items() if not isinstance(v, int) or v < rows}

    def _write_index(self, index: dict[str, int | str]) -> None:
        tmp = self.dir / f"{INDEX}.tmp"
        tmp.write_text(json.dumps(index, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, self.dir / INDEX)

    def _preprocess(self, data: bytes, max_pixels: int | None) -> np.ndarray:
        """The inference decode and crop at ``side``, as HxWx3 uint8; raises ``ImageError``."""
        transform = partial(to_model_input, reducing_gap=REDUCING_GAP, size=self.side)
        pixels = decode(data, max_pixels=max_pixels, min_side=2 * self.side, transform=transform).pixels
        return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels

    def load(self, paths: Sequence[Path], *, max_pixels: int | None = None) -> CachedSet:
        """The rows for ``paths``, decoding and appending the files not cached yet."""
        hashes = [hashlib.sha256(read_file(p)).hexdigest() for p in paths]
        with self._locked():
            index = self._read_index()
            hits = sum(h in index for h in hashes)
            missing = [(h, p) for h, p in dict(zip(hashes, paths, strict=True)).items() if h not in index]
            if missing:
                self._append(missing, index, max_pixels)
                self._write_index(index)
        if missing:
            log.info("training cache: %d image(s) decoded, %d reused", len(missing), hits)
        return self._rows(hashes, index, hits)

    def _append(
        self, missing: list[tuple[str, Path]], index: dict[str, int | str], max_pixels: int | None
    ) -> None:
        pixels_path = self.dir / PIXELS
        with pixels_path.open("ab") as out:
            out.truncate((out.tell() // self.row_bytes) * self.row_bytes)  # drop a torn last row
            row = out.tell() // self.row_bytes
            for digest, path in missing:
                try:
                    pixels = self._preprocess(read_file(path), max_pixels)
                except ImageError as exc:
                    index[digest] = exc.reason
                    continue
                out.write(np.ascontiguousarray(pixels).tobytes())
                index[digest] = row
                row += 1
            out.flush()
            os.fsync(out.fileno())

    def _rows(self, hashes: Sequence[str], index: dict[str, int | str], hits: int) -> CachedSet:
        kept = [i for i, h in enumerate(hashes) if isinstance(index[h], int)]
        skipped = [(i, str(index[h])) for i, h in enumerate(hashes) if not isinstance(index[h], int)]
        rows = np.array([index[hashes[i]] for i in kept], dtype=np.int64)
        if rows.size == 0:
            empty = torch.empty((0, 3, self.side, self.side), dtype=torch.uint8)
            return CachedSet(images=empty, kept=kept, skipped=skipped, hits=hits)
        # Copy-on-write: the tensor is writable (torch wants that) while the file never changes.
        table = np.memmap(self.dir / PIXELS, dtype=np.uint8, mode="c").reshape(-1, self.side, self.side, 3)
        if np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
            selected = table[rows[0] : rows[0] + rows.size]  # contiguous: a view, nothing read yet
        else:
            selected = table[rows]  # fancy indexing copies, once per run
        return CachedSet(
            images=torch.from_numpy(selected).permute(0, 3, 1, 2), kept=kept, skipped=skipped, hits=hits
        )
