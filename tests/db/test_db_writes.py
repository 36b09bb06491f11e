"""Bulk writes: membership, registration skip/reuse/rescore, idempotent chunk upserts, attempts, requeue,
job completion and closing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.jobs import close_job, create_job, finish_job_if_done, mark_failed, requeue_failed
from db.models import Image, JobImage, Prediction, ScanJob
from db.rows import ImageRef
from db.writes import record_attempts, register_images, write_results
from deepcovid.results import ImageResult
from deepcovid.status import ImageStatus, JobStatus

MakeScored = Callable[..., ImageResult]


def _refs(n: int, prefix: str = "/archive") -> list[ImageRef]:
    mtime = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    return [
        ImageRef(uri=f"{prefix}/{i:05d}.png", storage="file", size=100 + i, mtime=mtime) for i in range(n)
    ]


def _rows(engine: Engine, table: sa.Table) -> list[dict]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.select(table).order_by(*table.primary_key))]


def _image(engine: Engine, uri: str) -> sa.Row:
    with engine.connect() as conn:
        return conn.execute(sa.select(Image.__table__).where(Image.__table__.c.uri == uri)).one()


def _member(engine: Engine, job: int, uri: str) -> sa.Row:
    """The job's record of one image."""
    members, images = JobImage.__table__, Image.__table__
    with engine.connect() as conn:
        return conn.execute(
            sa.select(members)
            .join(images, images.c.id == members.c.image_id)
            .where(members.c.job_id == job, images.c.uri == uri)
        ).one()


def _write(engine: Engine, job: int, results: list[ImageResult], bundle: str = "b1") -> None:
    write_results(engine, job_id=job, bundle_id=bundle, results=results, worker_host="host-a", device="cpu")


def test_create_job_and_register(migrated_engine: Engine) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1", options={"rescore": False})
    uris = register_images(migrated_engine, job, "b1", iter(_refs(12)), batch_size=5)
    assert uris == [f"/archive/{i:05d}.png" for i in range(12)]
    rows = _rows(migrated_engine, Image.__table__)
    assert len(rows) == 12
    assert rows[3]["size"] == 103 and rows[3]["storage"] == "file"
    members = _rows(migrated_engine, JobImage.__table__)
    assert len(members) == 12 and {m["job_id"] for m in members} == {job}
    assert {m["state"] for m in members} == {ImageStatus.queued}
    assert {(m["attempts"], m["reused"], m["prediction_id"]) for m in members} == {(0, False, None)}
    (job_row,) = _rows(migrated_engine, ScanJob.__table__)
    assert job_row["state"] == JobStatus.running and job_row["options"] == {"rescore": False}


def test_register_duplicates_in_one_batch(migrated_engine: Engine) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    refs = _refs(3) + _refs(3)
    assert len(register_images(migrated_engine, job, "b1", refs)) == 3


def test_storage_kind_from_uri(migrated_engine: Engine) -> None:
    job = create_job(migrated_engine, source="s3://bucket/scans", bundle_id="b1")
    register_images(migrated_engine, job, "b1", [ImageRef(uri="s3://bucket/scans/a.png", etag="abc")])
    row = _image(migrated_engine, "s3://bucket/scans/a.png")
    assert row.storage == "s3" and row.etag == "abc"


def test_same_chunk_twice_leaves_same_rows(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job, "b1", _refs(10))
    chunk = [make_scored(uri, 0.1 * i) for i, uri in enumerate(uris[:8])]
    chunk += [
        ImageResult.failed(uris[8], "truncated", "ends early"),
        ImageResult.failed(uris[9], "not_found"),
    ]
    _write(migrated_engine, job, chunk)
    tables = (Image.__table__, Prediction.__table__, JobImage.__table__)
    once = [_rows(migrated_engine, table) for table in tables]
    _write(migrated_engine, job, chunk)
    twice = [_rows(migrated_engine, table) for table in tables]

    assert len(once[1]) == 8
    ignore = {"updated_at", "scored_at"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in ignore} for row in rows]  # noqa: E731
    assert [strip(rows) for rows in twice] == [strip(rows) for rows in once]
    failed = _member(migrated_engine, job, uris[8])
    assert failed.state == ImageStatus.failed and failed.prediction_id is None
    assert (failed.failure_reason, failed.failure_detail) == ("truncated", "ends early")
    scored = _member(migrated_engine, job, uris[0])
    assert scored.state == ImageStatus.scored and scored.prediction_id is not None and not scored.reused


def test_prediction_columns(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    (uri,) = register_images(migrated_engine, job, "b1", _refs(1))
    result = make_scored(uri, 0.75, dicom={"StudyInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4.5"})
    result.probabilities = {"resnet18": 0.9, "densenet121": 0.6}  # a two-network bundle
    result.decisions = {"resnet18": True, "densenet121": False}
    result.info.setdefault("dicom", {})["ViewPosition"] = "PA"
    write_results(
        migrated_engine, job_id=job, bundle_id="b1", results=[result], worker_host="w1", device="cuda:0"
    )
    (row,) = _rows(migrated_engine, Prediction.__table__)
    assert row["resnet18_probability"] == pytest.approx(0.9) and row["resnet18_decision"] is True
    assert row["densenet121_decision"] is False
    assert row["resnet50_probability"] is None and row["squeezenet1_1_decision"] is None
    assert row["ensemble_score"] == pytest.approx(0.75) and row["ensemble_decision"] is True
    assert row["thresholds"]["ensemble"] == 0.5
    assert (row["worker_host"], row["device"], row["job_id"]) == ("w1", "cuda:0", job)
    image = _image(migrated_engine, uri)
    assert (image.study_uid, image.sop_uid, image.series_uid, image.view) == (
        "1.2.3",
        "1.2.3.4.5",
        None,
        "PA",
    )
    assert image.size == 1234


def test_numpy_values_are_stored(migrated_engine: Engine, make_scored: MakeScored) -> None:
    np = pytest.importorskip("numpy")
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    (uri,) = register_images(migrated_engine, job, "b1", _refs(1))
    result = make_scored(uri)
    result.probabilities = {"resnet18": np.float32(0.25)}
    result.decisions = {"resnet18": np.bool_(False)}
    result.ensemble_score = np.float64(0.25)
    result.ensemble_decision = np.bool_(False)
    _write(migrated_engine, job, [result])
    (row,) = _rows(migrated_engine, Prediction.__table__)
    assert row["resnet18_probability"] == pytest.approx(0.25) and row["ensemble_decision"] is False


def test_other_bundle_adds_a_second_prediction(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job1 = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job1, "b1", _refs(3))
    _write(migrated_engine, job1, [make_scored(u, 0.2) for u in uris], bundle="b1")
    job2 = create_job(migrated_engine, source="/archive", bundle_id="b2")
    assert register_images(migrated_engine, job2, "b2", _refs(3)) == uris
    _write(migrated_engine, job2, [make_scored(u, 0.9) for u in uris], bundle="b2")
    rows = _rows(migrated_engine, Prediction.__table__)
    assert len(rows) == 6
    assert sorted({row["bundle_id"] for row in rows}) == ["b1", "b2"]


def test_unknown_uri_is_created(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    _write(
        migrated_engine, job, [make_scored("/archive/new.png"), ImageResult.failed("s3://b/k.dcm", "corrupt")]
    )
    assert _member(migrated_engine, job, "/archive/new.png").state == ImageStatus.scored
    assert _image(migrated_engine, "s3://b/k.dcm").storage == "s3"
    assert len(_rows(migrated_engine, Prediction.__table__)) == 1


def test_register_reuses_images_scored_by_the_bundle(
    migrated_engine: Engine, make_scored: MakeScored
) -> None:
    job1 = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job1, "b1", _refs(6))
    _write(
        migrated_engine, job1, [make_scored(u) for u in uris[:3]] + [ImageResult.failed(uris[3], "corrupt")]
    )
    first = [_member(migrated_engine, job1, uri) for uri in uris]

    job2 = create_job(migrated_engine, source="/archive", bundle_id="b1")
    again = register_images(migrated_engine, job2, "b1", _refs(6))
    assert again == uris[3:]  # the failed one and the never-scored ones
    reused = _member(migrated_engine, job2, uris[0])
    assert reused.state == ImageStatus.scored and reused.reused
    assert reused.prediction_id == first[0].prediction_id
    retried = _member(migrated_engine, job2, uris[3])
    assert retried.state == ImageStatus.queued and retried.failure_reason is None and not retried.reused
    # Job 1 keeps its own list, states and counts.
    assert [_member(migrated_engine, job1, uri) for uri in uris] == first

    job3 = create_job(migrated_engine, source="/archive", bundle_id="b1")
    assert register_images(migrated_engine, job3, "b1", _refs(6), rescore=True) == uris
    assert _member(migrated_engine, job3, uris[0]).state == ImageStatus.queued
    _write(migrated_engine, job3, [make_scored(uris[0], 0.9)])
    # Rescoring made a new prediction: job 1's answer is unchanged.
    assert _member(migrated_engine, job3, uris[0]).prediction_id != first[0].prediction_id
    assert _member(migrated_engine, job1, uris[0]) == first[0]
    assert len(_rows(migrated_engine, Prediction.__table__)) == 4
    # Resuming the rescoring job skips what it scored itself.
    assert register_images(migrated_engine, job3, "b1", _refs(6), rescore=True) == uris[1:]
    assert not _member(migrated_engine, job3, uris[0]).reused

    # Another bundle has no predictions yet: everything needs scoring.
    job4 = create_job(migrated_engine, source="/archive", bundle_id="b2")
    assert register_images(migrated_engine, job4, "b2", _refs(6)) == uris


def test_a_subfolder_job_takes_nothing_from_an_earlier_job(
    migrated_engine: Engine, make_scored: MakeScored
) -> None:
    job1 = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job1, "b1", _refs(4))
    _write(migrated_engine, job1, [make_scored(u) for u in uris])
    assert finish_job_if_done(migrated_engine, job1)
    job2 = create_job(migrated_engine, source="/archive/sub", bundle_id="b2")
    register_images(migrated_engine, job2, "b2", _refs(4)[:2])
    assert {_member(migrated_engine, job1, u).state for u in uris} == {ImageStatus.scored}
    assert len([m for m in _rows(migrated_engine, JobImage.__table__) if m["job_id"] == job1]) == 4


def test_register_updates_listing_metadata(migrated_engine: Engine) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    register_images(migrated_engine, job, "b1", [ImageRef(uri="/archive/a.png", size=1)])
    register_images(migrated_engine, job, "b1", [ImageRef(uri="/archive/a.png", size=2, etag="e")])
    row = _image(migrated_engine, "/archive/a.png")
    assert (row.size, row.etag) == (2, "e")


def test_record_attempts(migrated_engine: Engine) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job, "b1", _refs(3))
    assert record_attempts(migrated_engine, job, uris[:2]) == {uris[0]: 1, uris[1]: 1}
    assert record_attempts(migrated_engine, job, uris) == {uris[0]: 2, uris[1]: 2, uris[2]: 1}
    assert record_attempts(migrated_engine, job, ["/not/registered.png"]) == {}
    # Attempts are counted per job.
    other = create_job(migrated_engine, source="/archive", bundle_id="b1")
    register_images(migrated_engine, other, "b1", _refs(3))
    assert record_attempts(migrated_engine, other, uris[:1]) == {uris[0]: 1}


def test_mark_failed_and_requeue(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job, "b1", _refs(5))
    _write(migrated_engine, job, [make_scored(uris[0]), ImageResult.failed(uris[1], "corrupt")])
    record_attempts(migrated_engine, job, uris)
    # Only still-queued images change: the scored one keeps its result.
    changed = mark_failed(migrated_engine, job, uris[:3], "crashed_worker", "killed its worker 3 times")
    assert changed == [uris[2]]
    assert _member(migrated_engine, job, uris[0]).state == ImageStatus.scored
    with pytest.raises(ValueError):
        mark_failed(migrated_engine, job, uris, "no_such_reason")

    assert requeue_failed(migrated_engine, job, reason="crashed_worker") == [uris[2]]
    row = _member(migrated_engine, job, uris[2])
    assert row.state == ImageStatus.queued and row.attempts == 0 and row.failure_reason is None
    assert _member(migrated_engine, job, uris[1]).state == ImageStatus.failed
    assert requeue_failed(migrated_engine, job) == [uris[1]]
    assert requeue_failed(migrated_engine, job) == []


def test_finish_job_if_done(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job, "b1", _refs(3))
    _write(migrated_engine, job, [make_scored(uris[0]), make_scored(uris[1])])
    assert finish_job_if_done(migrated_engine, job) is False
    _write(migrated_engine, job, [ImageResult.failed(uris[2], "corrupt")])
    assert finish_job_if_done(migrated_engine, job) is True
    (row,) = _rows(migrated_engine, ScanJob.__table__)
    assert row["state"] == JobStatus.finished and row["finished_at"] is not None
    # Requeueing reopens it.
    assert requeue_failed(migrated_engine, job) == [uris[2]]
    (row,) = _rows(migrated_engine, ScanJob.__table__)
    assert row["state"] == JobStatus.running and row["finished_at"] is None


def test_close_job_cancels_queued(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    uris = register_images(migrated_engine, job, "b1", _refs(3))
    _write(migrated_engine, job, [make_scored(uris[0])])
    assert close_job(migrated_engine, job) == 2
    assert _member(migrated_engine, job, uris[1]).state == ImageStatus.cancelled
    (row,) = _rows(migrated_engine, ScanJob.__table__)
    assert row["state"] == JobStatus.cancelled
    # A late result of the closed job keeps its prediction but not its place in the job.
    _write(migrated_engine, job, [make_scored(uris[1])])
    assert _member(migrated_engine, job, uris[1]).state == ImageStatus.cancelled
    assert len(_rows(migrated_engine, Prediction.__table__)) == 2


def test_stale_job_result_keeps_new_jobs_state(migrated_engine: Engine, make_scored: MakeScored) -> None:
    job1 = create_job(migrated_engine, source="/archive", bundle_id="b1")
    (uri,) = register_images(migrated_engine, job1, "b1", _refs(1))
    job2 = create_job(migrated_engine, source="/archive", bundle_id="b2")
    register_images(migrated_engine, job2, "b2", _refs(1))
    # A redelivered chunk of job 1 lands late: it is job 1's result; job 2's image stays queued.
    _write(migrated_engine, job1, [make_scored(uri)], bundle="b1")
    assert _member(migrated_engine, job2, uri).state == ImageStatus.queued
    assert _member(migrated_engine, job1, uri).state == ImageStatus.scored
    assert [p["bundle_id"] for p in _rows(migrated_engine, Prediction.__table__)] == ["b1"]


def test_empty_inputs(migrated_engine: Engine) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    assert register_images(migrated_engine, job, "b1", []) == []
    write_results(migrated_engine, job_id=job, bundle_id="b1", results=[], worker_host=None, device=None)
    assert record_attempts(migrated_engine, job, []) == {}
