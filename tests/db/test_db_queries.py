"""Read side: progress, flagged images, streamed exports and the per-image audit on a known fixture."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from collections.abc import Callable

import pytest
from sqlalchemy.engine import Engine

from db.jobs import create_job, finish_job_if_done
from db.queries import (
    RESULT_FIELDS,
    UnknownJob,
    chunk_state,
    export_results,
    flagged_images,
    image_audit,
    iter_results,
    job_progress,
    list_jobs,
)
from db.rows import ImageRef
from db.writes import register_images, write_results
from deepcovid.results import ImageResult
from deepcovid.status import ImageStatus, JobStatus

MakeScored = Callable[..., ImageResult]


@pytest.fixture
def known_job(migrated_engine: Engine, make_scored: MakeScored) -> int:
    """10 images: 5 scored (2 flagged: 0.9 and 0.7), 3 failed (2 corrupt, 1 not_found), 2 queued."""
    job = create_job(migrated_engine, source="/archive", bundle_id="b1", options={"note": "fixture"})
    uris = register_images(migrated_engine, job, "b1", [ImageRef(uri=f"/archive/{i}.png") for i in range(10)])
    results = [
        make_scored(uris[0], 0.1),
        make_scored(uris[1], 0.9, dicom={"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"}),
        make_scored(uris[2], 0.3),
        make_scored(uris[3], 0.7),
        make_scored(uris[4], 0.2),
        ImageResult.failed(uris[5], "corrupt", "bad huffman table"),
        ImageResult.failed(uris[6], "corrupt"),
        ImageResult.failed(uris[7], "not_found"),
    ]
    write_results(migrated_engine, job_id=job, bundle_id="b1", results=results, worker_host="w", device="cpu")
    # The same images scored by another bundle must not leak into this job's view.
    write_results(
        migrated_engine,
        job_id=job,
        bundle_id="other",
        results=[make_scored(uris[0], 0.99)],
        worker_host="w",
        device="cpu",
    )
    return job


def test_job_progress(migrated_engine: Engine, known_job: int) -> None:
    progress = job_progress(migrated_engine, known_job)
    assert progress.total == 10
    assert progress.counts == {"queued": 2, "scored": 5, "failed": 3, "cancelled": 0}
    assert (progress.queued, progress.scored, progress.failed, progress.done) == (2, 5, 3, 8)
    assert progress.failed_by_reason == {"corrupt": 2, "not_found": 1}
    assert progress.flagged == 2
    assert progress.state == JobStatus.running
    assert progress.options == {"note": "fixture"}
    assert progress.created_at.tzinfo is not None
    assert progress.rate_per_s > 0  # 8 images finished within the last minute
    assert progress.eta_s is not None and progress.eta_s > 0


def test_progress_of_finished_job(migrated_engine: Engine, known_job: int, make_scored: MakeScored) -> None:
    write_results(
        migrated_engine,
        job_id=known_job,
        bundle_id="b1",
        results=[make_scored("/archive/8.png"), make_scored("/archive/9.png")],
        worker_host="w",
        device="cpu",
    )
    assert finish_job_if_done(migrated_engine, known_job)
    progress = job_progress(migrated_engine, known_job)
    assert progress.state == JobStatus.finished and progress.finished_at is not None
    assert progress.queued == 0
    # No live activity: no rate, no ETA.
    assert progress.rate_per_s is None and progress.eta_s is None


def test_unknown_job(migrated_engine: Engine) -> None:
    with pytest.raises(UnknownJob):
        job_progress(migrated_engine, 999)
    with pytest.raises(UnknownJob):
        list(iter_results(migrated_engine, 999))


def test_list_jobs_newest_first(migrated_engine: Engine, known_job: int) -> None:
    newer = create_job(migrated_engine, source="s3://bucket/x", bundle_id="b1")
    jobs = list_jobs(migrated_engine)
    assert [j.job_id for j in jobs] == [newer, known_job]
    assert jobs[0].total == 0 and jobs[1].total == 10
    assert [j.job_id for j in list_jobs(migrated_engine, limit=1)] == [newer]


def test_flagged_images(migrated_engine: Engine, known_job: int) -> None:
    flagged = flagged_images(migrated_engine, known_job)
    assert [f.uri for f in flagged] == ["/archive/1.png", "/archive/3.png"]
    assert flagged[0].ensemble_score == pytest.approx(0.9)
    assert flagged[0].probabilities["densenet121"] == pytest.approx(0.9)
    assert (flagged[0].study_uid, flagged[0].series_uid) == ("1.2", "1.2.3")
    assert [f.uri for f in flagged_images(migrated_engine, known_job, limit=1)] == ["/archive/1.png"]


def test_iter_results_includes_failed_and_queued(migrated_engine: Engine, known_job: int) -> None:
    rows = list(iter_results(migrated_engine, known_job))
    assert [r["uri"] for r in rows] == [f"/archive/{i}.png" for i in range(10)]
    assert all(tuple(r) == RESULT_FIELDS for r in rows)
    by_uri = {r["uri"]: r for r in rows}
    assert by_uri["/archive/0.png"]["ensemble_score"] == pytest.approx(0.1)  # b1's, not the other bundle's
    assert by_uri["/archive/0.png"]["bundle_id"] == "b1"
    assert by_uri["/archive/5.png"]["status"] == "failed"
    assert by_uri["/archive/5.png"]["reason"] == "corrupt"
    assert by_uri["/archive/5.png"]["ensemble_score"] is None
    assert by_uri["/archive/9.png"]["status"] == "queued"
    flagged = list(iter_results(migrated_engine, known_job, flagged_only=True))
    assert [r["uri"] for r in flagged] == ["/archive/1.png", "/archive/3.png"]


def test_export_csv(migrated_engine: Engine, known_job: int) -> None:
    out = io.StringIO()
    assert export_results(migrated_engine, known_job, out, "csv") == 10
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 10 and tuple(rows[0]) == RESULT_FIELDS
    assert rows[1]["ensemble_decision"] == "true" and rows[0]["ensemble_decision"] == "false"
    assert rows[5]["reason"] == "corrupt" and rows[5]["ensemble_score"] == ""


def test_export_jsonl_flagged(migrated_engine: Engine, known_job: int) -> None:
    out = io.StringIO()
    assert export_results(migrated_engine, known_job, out, "jsonl", flagged_only=True) == 2
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["uri"] for r in rows] == ["/archive/1.png", "/archive/3.png"]
    assert rows[0]["resnet18_decision"] is True and rows[0]["scored_at"].endswith("+00:00")
    with pytest.raises(ValueError):
        export_results(migrated_engine, known_job, io.StringIO(), "xml")  # type: ignore[arg-type]


def test_export_limit_counts_rows_not_the_header(migrated_engine: Engine, known_job: int) -> None:
    out = io.StringIO()
    assert export_results(migrated_engine, known_job, out, "csv", limit=3) == 3
    assert len(out.getvalue().splitlines()) == 4
    out = io.StringIO()
    assert export_results(migrated_engine, known_job, out, "jsonl", limit=0) == 0
    assert out.getvalue() == ""


def test_chunk_state(migrated_engine: Engine, known_job: int) -> None:
    uris = ["/archive/0.png", "/archive/5.png", "/archive/8.png", "/not/registered.png", "/archive/0.png"]
    assert chunk_state(migrated_engine, known_job, uris) == {
        "/archive/0.png": (True, 0),
        "/archive/5.png": (True, 0),
        "/archive/8.png": (False, 0),
    }
    # Another job that never listed them has no state for them.
    assert chunk_state(migrated_engine, known_job + 1, uris[:2]) == {}


def test_image_audit(migrated_engine: Engine, known_job: int) -> None:
    audit = image_audit(migrated_engine, "/archive/0.png")
    assert audit is not None
    latest = audit.latest
    assert latest is not None and [m.job_id for m in audit.jobs] == [known_job]
    assert latest.state == ImageStatus.scored and latest.attempts == 0 and not latest.reused
    assert sorted(p.bundle_id for p in audit.predictions) == ["b1", "other"]
    assert {p.worker_host for p in audit.predictions} == {"w"}
    assert all(p.scored_at is not None and p.scored_at.tzinfo is not None for p in audit.predictions)
    failed = image_audit(migrated_engine, "/archive/5.png")
    assert failed is not None and failed.predictions == []
    assert failed.latest is not None and failed.latest.failure_reason == "corrupt"
    assert image_audit(migrated_engine, "/nowhere.png") is None


class _Sink(io.TextIOBase):
    """Discards what is written, so only the exporter's own memory is measured."""

    def write(self, s: str) -> int:
        return len(s)


def _fill(engine: Engine, n: int, make_scored: MakeScored) -> int:
    job = create_job(engine, source=f"/big{n}", bundle_id="b1")
    uris = register_images(engine, job, "b1", (ImageRef(uri=f"/big{n}/{i:06d}.png") for i in range(n)))
    for start in range(0, n, 2000):
        chunk = [make_scored(uri, 0.6) for uri in uris[start : start + 2000]]
        write_results(engine, job_id=job, bundle_id="b1", results=chunk, worker_host="w", device="cpu")
    return job


def _export_peak(engine: Engine, job: int) -> tuple[int, int]:
    tracemalloc.start()
    try:
        count = export_results(engine, job, _Sink(), "jsonl", batch_size=200)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


@pytest.mark.slow
def test_export_memory_does_not_grow_with_rows(migrated_engine: Engine, make_scored: MakeScored) -> None:
    small = _fill(migrated_engine, 600, make_scored)
    large = _fill(migrated_engine, 6_000, make_scored)
    _export_peak(migrated_engine, small)  # warm caches (compiled statements, codecs)
    small_count, small_peak = _export_peak(migrated_engine, small)
    large_count, large_peak = _export_peak(migrated_engine, large)
    assert (small_count, large_count) == (600, 6_000)
    # Ten times the rows; a buffered export would take roughly ten times the memory (~2 MB here).
    assert large_peak < 1.5 * small_peak + 128 * 1024, (small_peak, large_peak)


def test_flagged_results_come_highest_score_first(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job, "b1", [ImageRef(f"/archive/f{i}.png") for i in range(5)])
    scores = [0.7, 0.95, 0.2, 0.8, 0.99]
    results = [make_scored(uri, score) for uri, score in zip(uris, scores, strict=True)]
    write_results(migrated_engine, job_id=job, bundle_id="b1", results=results, worker_host="h", device="cpu")
    flagged = [row["ensemble_score"] for row in iter_results(migrated_engine, job, flagged_only=True)]
    assert flagged == sorted((s for s in scores if s >= 0.5), reverse=True)
    out = io.StringIO()
    export_results(migrated_engine, job, out, fmt="csv", flagged_only=True)
    exported = [float(row["ensemble_score"]) for row in csv.DictReader(io.StringIO(out.getvalue()))]
    assert exported == flagged
