"""The task body in-process against the real PostgreSQL: idempotence and crash isolation bookkeeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from db.models import Image, JobImage, Prediction
from db.queries import iter_results
from deepcovid.settings import Settings
from tests.fixtures.images import xray_png_bytes
from worker.tasks import retryable_errors, run_chunk

postgresql_only = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def make_chunk(engine: Any, root: Path, bundle_id: str, count: int = 4) -> tuple[int, list[str]]:
    from db.jobs import create_job
    from db.rows import ImageRef
    from db.writes import register_images

    root.mkdir(exist_ok=True)
    uris = []
    for i in range(count):
        (root / f"{i}.png").write_bytes(xray_png_bytes(64, seed=i))
        uris.append(str(root / f"{i}.png"))
    job_id = create_job(engine, source=str(root), bundle_id=bundle_id, options={})
    register_images(engine, job_id, bundle_id, [ImageRef(uri=u) for u in uris])
    return job_id, uris


def settings_for(url: str, root: Path, bundles_dir: Path, **kw: Any) -> Settings:
    return Settings(
        database_url=url,  # type: ignore[arg-type]
        storage_roots=[root],
        bundles_dir=bundles_dir,
        device="cpu",
        batch_size=2,
        decode_threads=2,
        **kw,
    )


def rows(engine: Any, uris: list[str]) -> dict[str, tuple[str, str | None, int, int]]:
    """uri -> (state, failure reason, attempt count, prediction count) in the chunk's job."""
    with engine.connect() as conn:
        result = conn.execute(
            sa.select(
                Image.uri,
                JobImage.state,
                JobImage.failure_reason,
                JobImage.attempts,
                sa.func.count(Prediction.id),
            )
            .join(JobImage, JobImage.image_id == Image.id)
            .outerjoin(Prediction, Prediction.image_id == Image.id)
            .where(Image.uri.in_(uris))
            .group_by(Image.id, JobImage.state, JobImage.failure_reason, JobImage.attempts)
        )
        return {uri: (state.value, reason, attempts, n) for uri, state, reason, attempts, n in result}


@postgresql_only
def test_first_delivery_scores_in_batches_and_a_repeat_is_skipped(
    migrated_engine: Any, migrated_url: str, tmp_path: Path, bundles_dir: Path, tiny_bundle_id: str
) -> None:
    root = tmp_path / "archive"
    job_id, uris = make_chunk(migrated_engine, root, tiny_bundle_id)
    settings = settings_for(migrated_url, root, bundles_dir)

    summary = run_chunk(job_id, tiny_bundle_id, uris, settings=settings)
    assert summary == {
        "job_id": job_id,
        "images": 4,
        "skipped": 0,
        "scored": 4,
        "failed": 0,
        "isolated": False,
        "resent": 0,
    }
    assert {v for v in rows(migrated_engine, uris).values()} == {("scored", None, 0, 1)}

    again = run_chunk(job_id, tiny_bundle_id, uris, settings=settings, redelivered=True)
    assert again["skipped"] == 4 and again["scored"] == 0
    assert {v for v in rows(migrated_engine, uris).values()} == {("scored", None, 0, 1)}


@postgresql_only
def test_redelivered_chunk_is_scored_one_image_at_a_time(
    migrated_engine: Any, migrated_url: str, tmp_path: Path, bundles_dir: Path, tiny_bundle_id: str
) -> None:
    root = tmp_path / "archive"
    job_id, uris = make_chunk(migrated_engine, root, tiny_bundle_id)
    settings = settings_for(migrated_url, root, bundles_dir, max_attempts=3)
    # As after two crashes on image 2 in isolation: it is the one the next attempt gives up on.
    with migrated_engine.begin() as conn:
        image_id = conn.execute(sa.select(Image.id).where(Image.uri == uris[2])).scalar_one()
        conn.execute(
            sa.update(JobImage)
            .where(JobImage.job_id == job_id, JobImage.image_id == image_id)
            .values(attempts=2)
        )

    summary = run_chunk(job_id, tiny_bundle_id, uris, settings=settings, redelivered=True)
    assert summary["isolated"] is True
    assert (summary["scored"], summary["failed"]) == (3, 1)
    state = rows(migrated_engine, uris)
    assert state[uris[2]] == ("failed", "crashed_worker", 3, 0)
    for uri in (uris[0], uris[1], uris[3]):
        assert state[uri] == ("scored", None, 1, 1)


@postgresql_only
def test_redelivery_skips_what_an_earlier_isolated_delivery_finished(
    migrated_engine: Any, migrated_url: str, tmp_path: Path, bundles_dir: Path, tiny_bundle_id: str
) -> None:
    from db.writes import write_results
    from deepcovid.results import ImageResult

    root = tmp_path / "archive"
    job_id, uris = make_chunk(migrated_engine, root, tiny_bundle_id)
    settings = settings_for(migrated_url, root, bundles_dir)
    # The earlier delivery wrote image 0 before dying on image 1.
    write_results(
        migrated_engine, job_id=job_id, bundle_id=tiny_bundle_id,
        results=[ImageResult.failed(uris[0], "corrupt", "x")], worker_host="h", device="cpu",
    )  # fmt: skip
    summary = run_chunk(job_id, tiny_bundle_id, uris, settings=settings, redelivered=True)
    assert summary["skipped"] == 1 and summary["scored"] == 3
    assert rows(migrated_engine, uris)[uris[0]][:2] == ("failed", "corrupt")


def test_database_unreachable_is_retryable() -> None:
    from db.engine import make_engine
    from db.schema import ensure_schema_current
    from tests.fixtures.services import free_port

    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing?connect_timeout=2")
    with pytest.raises(retryable_errors()):
        ensure_schema_current(engine)
    with pytest.raises(retryable_errors()), engine.connect():
        pass


@postgresql_only
def test_a_redelivered_chunk_rewrites_the_same_heatmaps(
    migrated_engine: Any, migrated_url: str, tmp_path: Path, bundles_dir: Path, tiny_bundle_id: str
) -> None:
    """The worker's PostgreSQL write path: one heatmap row and one artifact per (image, bundle), however
    often the chunk is delivered."""
    root = tmp_path / "archive"
    job_id, uris = make_chunk(migrated_engine, root, tiny_bundle_id, count=3)
    settings = settings_for(migrated_url, root, bundles_dir, heatmaps="all", data_dir=tmp_path / "data")

    def stored() -> tuple[dict[str, str], list[Path]]:
        with migrated_engine.connect() as conn:
            keys = dict(
                conn.execute(
                    sa.text("SELECT i.uri, h.key FROM heatmaps h JOIN images i ON i.id = h.image_id")
                ).all()
            )
        return keys, sorted(p for p in (tmp_path / "data" / "artifacts").rglob("*") if p.is_file())

    run_chunk(job_id, tiny_bundle_id, uris, settings=settings)
    first_keys, first_files = stored()
    assert set(first_keys) == set(uris) and len(first_files) == 3
    with migrated_engine.begin() as conn:  # as if the worker died before the message was acknowledged
        conn.execute(sa.text("UPDATE job_images SET state = 'queued' WHERE job_id = :j"), {"j": job_id})
    summary = run_chunk(job_id, tiny_bundle_id, uris, settings=settings, redelivered=True)
    assert summary["scored"] == 3
    assert stored() == (first_keys, first_files)
    exported = {row["uri"]: row["heatmap"] for row in iter_results(migrated_engine, job_id)}
    assert exported == first_keys
