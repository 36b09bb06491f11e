"""Every file of an archive is accounted for: what the listing leaves out is counted by extension and
reported by ``enqueue`` and ``screen``; extension-less DICOM/PNG/JPEG files are listed by default."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from producer.listing import describe_not_listed, parse_include, walk_local, walk_s3
from tests.fixtures.images import dicom_bytes, gif_bytes, xray_png_bytes

REPORT = "skipped 5 files: .gif 1, .tif 2, .txt 1, no extension 1 — see --include"


def flat(text: str) -> str:
    return " ".join(text.split())


def _mixed_files() -> dict[str, bytes]:
    return {
        "ward/chest.png": xray_png_bytes(64, seed=1),
        "ward/anim.gif": gif_bytes(frames=3),
        "ward/scan1.tif": b"II*\x00" + b"\x00" * 64,
        "ward/scan2.TIF": b"MM\x00*" + b"\x00" * 64,
        "ward/notes.txt": b"not an image",
        "ward/IM000001": dicom_bytes(size=(64, 64)),  # a PACS export: DICOM without an extension
        "ward/GARBAGE": b"\x01\x02 not an image at all " * 20,
        "ward/.DS_Store": b"hidden, not counted",
        ".trash/old.gif": gif_bytes(),
    }


@pytest.fixture
def mixed_archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    for rel, data in _mixed_files().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_local_listing_counts_what_it_skips_and_sniffs_extensionless_files(mixed_archive: Path) -> None:
    not_listed: Counter[str] = Counter()
    uris = [ref.uri for ref in walk_local(mixed_archive, not_listed=not_listed)]
    assert uris == [str(mixed_archive / "ward" / name) for name in ("IM000001", "chest.png")]
    assert not_listed == Counter({".gif": 1, ".tif": 2, ".txt": 1, "": 1})
    assert describe_not_listed(not_listed) == REPORT

    # An explicit --include lists exactly what it names, and counts the rest.
    only_png: Counter[str] = Counter()
    assert len(list(walk_local(mixed_archive, parse_include("png"), not_listed=only_png))) == 1
    assert only_png[""] == 2
    assert describe_not_listed(Counter()) == ""


def test_s3_listing_counts_what_it_skips_and_sniffs_extensionless_keys(s3_server, s3_bucket) -> None:
    client, bucket = s3_bucket
    for rel, data in _mixed_files().items():
        client.put_object(Bucket=bucket, Key=f"scans/{rel}", Body=data)
    not_listed: Counter[str] = Counter()
    refs = list(walk_s3(bucket, "scans", client=client, not_listed=not_listed))
    assert [ref.uri for ref in refs] == [f"s3://{bucket}/scans/ward/{n}" for n in ("IM000001", "chest.png")]
    assert describe_not_listed(not_listed) == REPORT


@pytest.mark.slow
def test_enqueue_reports_skipped_files_and_queues_the_extensionless_dicom(
    run_cli, producer_env, migrated_sqlite, redis_url: str, mixed_archive: Path, tiny_bundle_path: Path
) -> None:
    import uuid

    import redis

    from db.engine import make_engine
    from tests.producer.test_enqueue_worker import register_and_promote

    url = migrated_sqlite()
    queue = f"test-skipped-{uuid.uuid4().hex[:8]}"
    producer_env(
        database_url=url, broker_url=redis_url, queue=queue, storage_roots=mixed_archive, chunk_size=10
    )
    register_and_promote(url, tiny_bundle_path, Path(os.environ["DEEPCOVID_DATA_DIR"]) / "bundles")
    try:
        result = run_cli("enqueue", mixed_archive)
        assert result.exit_code == 0, result.output
        assert "listed 2, queued 2" in flat(result.stdout)
        assert REPORT in flat(result.output)
        with make_engine(url).connect() as conn:
            uris = set(conn.execute(sa.text("SELECT uri FROM images")).scalars())
        assert str(mixed_archive / "ward" / "IM000001") in uris and len(uris) == 2
        assert redis.Redis.from_url(redis_url).llen(queue) == 1
    finally:
        redis.Redis.from_url(redis_url).delete(queue)


@pytest.mark.slow
def test_screen_reports_skipped_files_and_scores_the_extensionless_dicom(
    run_cli, producer_env, mixed_archive: Path, tiny_bundle_path: Path
) -> None:
    result = run_cli("screen", mixed_archive, "--bundle", tiny_bundle_path)
    assert result.exit_code == 0, result.output
    assert "listed 2; already scored 0; scored now 2; failed 0" in flat(result.stdout)
    assert REPORT in flat(result.output)
