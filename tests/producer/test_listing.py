"""Listing an archive: order, filters, hidden files, symlinks, sniffing, unreadable directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepcovid.formats import looks_like_archive_image as looks_like_image
from producer.listing import Include, parse_include, parse_s3_source, walk_local

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
DICOM = b"\x00" * 128 + b"DICM" + b"\x00" * 100


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def names(refs) -> list[str]:
    return [r.uri for r in refs]


def test_walk_is_sorted_depth_first_and_skips_hidden_and_other_extensions(tmp_path: Path) -> None:
    for rel in [
        "b/2.png",
        "b/1.JPG",
        "a.dcm",
        "c/d/e.dicom",
        "z.jpeg",
        "notes.txt",
        ".hidden.png",
        ".git/x.png",
    ]:
        touch(tmp_path / rel)
    refs = list(walk_local(tmp_path))
    assert names(refs) == [
        str(tmp_path / "a.dcm"),
        str(tmp_path / "z.jpeg"),
        str(tmp_path / "b/1.JPG"),
        str(tmp_path / "b/2.png"),
        str(tmp_path / "c/d/e.dicom"),
    ]
    assert {r.storage for r in refs} == {"file"}
    assert all(r.size == 0 and r.mtime is not None and r.etag is None for r in refs)


def test_walk_yields_symlinked_files_but_does_not_follow_symlinked_directories(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    touch(outside / "secret.png", PNG)
    archive = tmp_path / "archive"
    touch(archive / "real.png", PNG)
    os.symlink(outside, archive / "linked_dir")
    os.symlink(outside / "secret.png", archive / "linked.png")
    os.symlink(archive, archive / "loop")  # a cycle must not hang the walk
    refs = list(walk_local(archive))
    assert names(refs) == [str(archive / "linked.png"), str(archive / "real.png")]
    assert refs[0].size == len(PNG)


def test_include_by_extension_sniff_and_all(tmp_path: Path) -> None:
    touch(tmp_path / "series" / "IM0001", DICOM)  # DICOM without an extension
    touch(tmp_path / "series" / "IM0002", PNG)
    touch(tmp_path / "series" / "README", b"just text, long enough " * 10)
    touch(tmp_path / "x.png", b"corrupt but listed: the worker records it as failed")

    # By default files without an extension are sniffed (PACS exports); README is text, so left out.
    assert names(walk_local(tmp_path)) == [
        str(tmp_path / "x.png"),
        str(tmp_path / "series/IM0001"),
        str(tmp_path / "series/IM0002"),
    ]
    sniffed = names(walk_local(tmp_path, parse_include("sniff")))
    assert sniffed == [
        str(tmp_path / "x.png"),
        str(tmp_path / "series/IM0001"),
        str(tmp_path / "series/IM0002"),
    ]
    assert names(walk_local(tmp_path, parse_include("dcm"))) == []
    assert len(names(walk_local(tmp_path, parse_include("all")))) == 4


def test_parse_include() -> None:
    assert parse_include(None) == Include()
    assert parse_include("png, .JPG").extensions == frozenset({".png", ".jpg"})
    assert not parse_include("png").sniff
    sniff = parse_include("sniff")
    assert sniff.sniff and sniff.extensions == Include().extensions
    assert parse_include("dcm,sniff").describe() == "dcm,sniff"
    assert parse_include("all").everything


@pytest.mark.parametrize("spec", [None, "png", "png,jpg", "sniff", "dcm,sniff", "all"])
def test_described_include_parses_back_to_the_same_listing(spec: str | None) -> None:
    """A job records ``describe()``; resuming it parses that back and must list the same files."""
    include = parse_include(spec)
    assert parse_include(include.describe()) == include


def test_looks_like_image() -> None:
    assert looks_like_image(PNG[:132])
    assert looks_like_image(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    assert looks_like_image(DICOM[:132])
    assert not looks_like_image(b"GIF89a")
    assert not looks_like_image(b"")


def test_parse_s3_source() -> None:
    assert parse_s3_source("s3://bucket") == ("bucket", "")
    assert parse_s3_source("s3://bucket/a/b/") == ("bucket", "a/b/")
    with pytest.raises(ValueError):
        parse_s3_source("s3:///key")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads directories whatever their mode")
def test_unreadable_subdirectory_is_reported_and_skipped(tmp_path: Path) -> None:
    touch(tmp_path / "ok" / "a.png")
    locked = tmp_path / "locked"
    touch(locked / "b.png")
    locked.chmod(0)
    try:
        errors: list[str] = []
        refs = list(walk_local(tmp_path, on_error=lambda path, exc: errors.append(path)))
    finally:
        locked.chmod(0o755)
    assert names(refs) == [str(tmp_path / "ok/a.png")]
    assert errors == [str(locked)]


def test_walk_is_lazy(tmp_path: Path) -> None:
    for i in range(3):
        touch(tmp_path / f"d{i}" / "a.png")
    walker = walk_local(tmp_path)
    first = next(walker)
    assert first.uri == str(tmp_path / "d0/a.png")
