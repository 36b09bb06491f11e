"""List the images of an archive (a local directory, an S3 prefix or a PACS) as a stream of ``ImageRef``.

Archives hold millions of files, so nothing here builds a list: the local walk keeps one directory's
entries at a time and S3 is read page by page. Every regular, non-hidden file is accounted for: what is
not listed is counted by extension in ``not_listed``, for the command to report.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from db.rows import ImageRef
from deepcovid.dicomweb import is_dicomweb
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.formats import ARCHIVE_SUFFIXES, SNIFF_BYTES, looks_like_archive_image
from deepcovid.settings import Settings, get_settings
from deepcovid.storage import s3_client

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Include:
    """Which files of an archive are images: by extension, and optionally by sniffing the content."""

    extensions: frozenset[str] = frozenset(ARCHIVE_SUFFIXES)
    sniff: bool = False  # files whose extension is not listed are kept when their first bytes are an image
    everything: bool = False  # every non-hidden file (failures are then recorded per file)
    # Files without an extension are kept when their first bytes are an image: PACS exports name DICOMs
    # ``IM000001``. On by default; an explicit --include lists only what it names (add ``sniff``).
    sniff_extensionless: bool = True

    def describe(self) -> str:
        if self.everything:
            return "all"
        parts = sorted(e.lstrip(".") for e in self.extensions)
        if self.sniff:
            parts.append("sniff")
        elif self.sniff_extensionless:
            parts.append("sniff-extensionless")
        return ",".join(parts)


def parse_include(spec: str | None) -> Include:
    """Parse ``--include``: ``png,jpg``, ``sniff`` (default extensions + sniffing), ``dcm,sniff``, ``all``."""
    if spec is None or not spec.strip():
        return Include()
    words = [w.strip().lower() for w in spec.split(",") if w.strip()]
    if "all" in words or "*" in words:
        return Include(everything=True)
    sniff = "sniff" in words
    # ``sniff-extensionless`` is what ``describe`` writes for the default: a job's recorded include
    # parses back to the same listing when the job is resumed.
    extensionless = sniff or "sniff-extensionless" in words
    extensions = frozenset("." + w.lstrip(".") for w in words if w not in ("sniff", "sniff-extensionless"))
    if not extensions:
        extensions = frozenset(ARCHIVE_SUFFIXES)
    return Include(extensions=extensions, sniff=sniff, sniff_extensionless=extensionless)


def first_batch(batches: Iterator[list[T]], source: str, not_listed: Counter[str]) -> Iterator[list[T]]:
    """``batches`` again once one is known to exist; a source with no image is refused before any job
    is made for it, saying what the listing left out."""
    first = next(batches, None)
    if first is None:
        skipped = describe_not_listed(not_listed)
        raise UserError(
            ExitCode.NO_IMAGES, f"no images found in {source}" + (f" ({skipped})" if skipped else "")
        )
    return itertools.chain([first], batches)


def describe_not_listed(not_listed: Counter[str]) -> str:
    """``skipped 3 files: .gif 1, .tif 2 — see --include`` (empty when nothing was left out)."""
    total = sum(not_listed.values())
    if not total:
        return ""
    parts = [f"{ext} {count:,}" for ext, count in sorted(not_listed.items()) if ext]
    if not_listed.get(""):
        parts.append(f"no extension {not_listed['']:,}")
    noun = "file" if total == 1 else "files"
    return f"skipped {total:,} {noun}: {', '.join(parts)} — see --include"


def _extension(name: str) -> str:
    """The lower-case extension (``.tif``), or "" for none (a leading dot does not start one)."""
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _entry_name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _included(extension: str, include: Include, sniff: Callable[[], bool]) -> bool:
    """Listed extension, or (when sniffing) image content; ``sniff`` reads the file only if needed."""
    if include.everything or extension in include.extensions:
        return True
    return (include.sniff or (include.sniff_extensionless and not extension)) and sniff()


# ----------------------------------------------------------------------------------------------------------
# Local directories


def _sniff_file(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return looks_like_archive_image(fh.read(SNIFF_BYTES))
    except OSError:
        return False


def walk_local(
    root: Path | str,
    include: Include | None = None,
    *,
    on_error: Callable[[str, OSError], None] | None = None,
    not_listed: Counter[str] | None = None,
) -> Iterator[ImageRef]:
    """Yield the images under ``root`` depth first, sorted by name within each directory.

    Hidden files and directories are skipped; symlinked directories are not followed (no cycles, no
    escaping the archive), symlinked files are yielded and left to the storage roots to accept or refuse.
    A subdirectory that cannot be read is reported to ``on_error`` and skipped. Files left out are
    counted by extension in ``not_listed``.
    """
    include = include or Include()
    extensions, everything = include.extensions, include.everything
    skipped = not_listed if not_listed is not None else Counter()
    utc = timezone.utc
    stack: list[str] = [os.fspath(root)]
    while stack:  # this loop runs once per file of the archive: kept lean on purpose
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=_entry_name)
        except OSError as exc:
            if on_error is None:
                log.warning("skipping unreadable directory %s: %s", directory, exc.strerror or exc)
            else:
                on_error(directory, exc)
            continue
        subdirs: list[str] = []
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                    continue
                if not entry.is_file():  # sockets, fifos, broken links, symlinked directories
                    continue
                if not everything:
                    dot = name.rfind(".")
                    extension = name[dot:].lower() if dot > 0 else ""
                    if extension not in extensions and not _included(
                        extension, include, lambda path=entry.path: _sniff_file(path)
                    ):
                        skipped[extension] += 1
                        continue
                st = entry.stat()
            except OSError as exc:
                if on_error is not None:
                    on_error(entry.path, exc)
                continue
            yield ImageRef(entry.path, "file", st.st_size, datetime.fromtimestamp(st.st_mtime, utc), None)
        stack.extend(reversed(subdirs))


# ----------------------------------------------------------------------------------------------------------
# S3


def parse_s3_source(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket`` or ``s3://bucket/prefix`` into ``(bucket, prefix)`` (the prefix may be empty)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError("an S3 source needs a bucket: s3://bucket/prefix")
    return bucket, prefix


def s3_prefix(prefix: str) -> str:
    """A source prefix names a folder: ``scans`` lists ``scans/...``, never ``scans-old/...``."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def walk_s3(
    bucket: str,
    prefix: str,
    include: Include | None = None,
    *,
    client: Any = None,
    settings: Settings | None = None,
    page_size: int = 1000,
    not_listed: Counter[str] | None = None,
) -> Iterator[ImageRef]:
    """Yield the images under ``s3://bucket/prefix`` one listing page at a time (S3 returns keys sorted).

    Keys with a hidden path component below the prefix and folder markers are skipped. Sniffing costs one
    ranged GET per object sniffed. Keys left out are counted by extension in ``not_listed``.
    """
    include = include or Include()
    skipped = not_listed if not_listed is not None else Counter()
    if client is None:
        client = s3_client(settings or get_settings())
    prefix = s3_prefix(prefix)
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}):
        for obj in page.get("Contents", ()):
            key: str = obj["Key"]
            relative = key[len(prefix) :]
            if not relative or key.endswith("/"):
                continue
            if any(_hidden(part) for part in relative.split("/")):
                continue
            extension = _extension(relative.rsplit("/", 1)[-1])
            if not _included(extension, include, lambda key=key: _sniff_s3(client, bucket, key)):
                skipped[extension] += 1
                continue
            yield ImageRef(
                uri=f"s3://{bucket}/{key}",
                storage="s3",
                size=int(obj.get("Size", 0)),
                mtime=obj.get("LastModified"),
                etag=(obj.get("ETag") or "").strip('"') or None,
            )


def _sniff_s3(client: Any, bucket: str, key: str) -> bool:
    try:
        response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{SNIFF_BYTES - 1}")
        return looks_like_archive_image(response["Body"].read())
    except Exception:  # an object we cannot read is not listed; scoring it would only fail the same way
        return False


def list_source(
    source: str,
    include: Include | None = None,
    *,
    settings: Settings | None = None,
    on_error: Callable[[str, OSError], None] | None = None,
    not_listed: Counter[str] | None = None,
) -> Iterator[ImageRef]:
    """Stream the images of ``source``: an ``s3://bucket/prefix`` URI, a ``dicomweb://`` PACS (a
    ``pacs.crawl.Crawl``: tell it with ``registered`` what was registered), a local directory, or one
    local file (listed whatever its name: it was named on purpose)."""
    if is_dicomweb(source):
        from pacs.crawl import Crawl  # the PACS role: only for dicomweb:// sources

        return Crawl(source, settings or get_settings())
    if source.startswith("s3://"):
        bucket, prefix = parse_s3_source(source)
        return walk_s3(bucket, prefix, include, settings=settings, not_listed=not_listed)
    if os.path.isfile(source):
        return _single_file(source)
    return walk_local(Path(source), include, on_error=on_error, not_listed=not_listed)


def registered(refs: Iterable[ImageRef], count: int) -> None:
    """Tell a listing that keeps a checkpoint (a PACS crawl) that its first ``count`` images are
    registered; other listings start again from the top and keep nothing."""
    mark = getattr(refs, "registered", None)
    if mark is not None:
        mark(count)


def _single_file(path: str) -> Iterator[ImageRef]:
    st = os.stat(path)
    yield ImageRef(path, "file", st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc), None)
