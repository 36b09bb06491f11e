"""Migration 0002 keeps today's data: images move into their jobs' memberships (and earlier jobs get back
what they scored), and the downgrade puts each image back in its newest job. Both dialects."""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa

from db.engine import make_engine
from db.migrate import downgrade, upgrade

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
ARCHS = ("resnet18", "resnet50", "squeezenet1_1", "densenet121")


def _seed_0001(url: str) -> None:
    """Two jobs with one bundle, the way 0001 kept them: job 2 re-listed the folder and took every image
    (a.png reused, c.png failed); job 1 is left with nothing."""
    upgrade(url, "0001")
    job = (
        "INSERT INTO scan_jobs (id, source, bundle_id, options, state, created_at) "
        "VALUES (:id, '/a', 'b1', '{}', :s, :t)"
    )
    image = (
        "INSERT INTO images (id, uri, storage, state, failure_reason, failure_detail, attempt_count, "
        "last_job_id, updated_at) VALUES (:id, :uri, 'file', :state, :reason, :detail, :attempts, :job, :t)"
    )
    nulls = ", ".join(f"{a}_probability, {a}_decision" for a in ARCHS)
    prediction = (
        f"INSERT INTO predictions (id, image_id, bundle_id, job_id, ensemble_score, ensemble_decision, "
        f"thresholds, scored_at, {nulls}) VALUES (:id, :image, 'b1', :job, :score, :flag, '{{}}', :t, "
        + ", ".join("NULL" for _ in range(2 * len(ARCHS)))
        + ")"
    )
    with make_engine(url).begin() as conn:
        conn.execute(sa.text(job), [{"id": 1, "s": "finished", "t": T0}, {"id": 2, "s": "running", "t": T0}])
        conn.execute(
            sa.text(image),
            [
                {
                    "id": 1,
                    "uri": "/a/a.png",
                    "state": "scored",
                    "reason": None,
                    "detail": None,
                    "attempts": 0,
                    "job": 2,
                    "t": T0,
                },
                {
                    "id": 2,
                    "uri": "/a/b.png",
                    "state": "scored",
                    "reason": None,
                    "detail": None,
                    "attempts": 1,
                    "job": 2,
                    "t": T0,
                },
                {
                    "id": 3,
                    "uri": "/a/c.png",
                    "state": "failed",
                    "reason": "corrupt",
                    "detail": "bad",
                    "attempts": 2,
                    "job": 2,
                    "t": T0,
                },
                {
                    "id": 4,
                    "uri": "/a/d.png",
                    "state": "skipped",
                    "reason": None,
                    "detail": None,
                    "attempts": 0,
                    "job": 2,
                    "t": T0,
                },
            ],
        )
        conn.execute(
            sa.text(prediction),
            [
                {
                    "id": 1,
                    "image": 1,
                    "job": 1,
                    "score": 0.9,
                    "flag": True,
                    "t": T0,
                },  # made by job 1, reused by 2
                {"id": 2, "image": 2, "job": 2, "score": 0.1, "flag": False, "t": T0},
            ],
        )


def _members(url: str) -> dict[tuple[int, int], tuple]:
    with make_engine(url).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT job_id, image_id, state, attempts, failure_reason, prediction_id, reused "
                "FROM job_images"
            )
        )
        return {(r[0], r[1]): (r[2], r[3], r[4], r[5], bool(r[6])) for r in rows}


def test_upgrade_moves_images_into_memberships(empty_database_url: str) -> None:
    _seed_0001(empty_database_url)
    upgrade(empty_database_url)
    assert _members(empty_database_url) == {
        (2, 1): ("scored", 0, None, 1, True),
        (2, 2): ("scored", 1, None, 2, False),
        (2, 3): ("failed", 2, "corrupt", None, False),
        (2, 4): ("cancelled", 0, None, None, False),
        (1, 1): ("scored", 0, None, 1, False),  # job 1 gets back the image it scored
    }
    columns = {c["name"] for c in sa.inspect(make_engine(empty_database_url)).get_columns("images")}
    assert not columns & {"state", "last_job_id", "attempt_count", "failure_reason"}
    with make_engine(empty_database_url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar_one() == 2


def test_downgrade_puts_images_back_in_their_newest_job(empty_database_url: str) -> None:
    _seed_0001(empty_database_url)
    upgrade(empty_database_url)
    with make_engine(empty_database_url).begin() as conn:
        conn.execute(sa.text("UPDATE scan_jobs SET state = 'interrupted' WHERE id = 2"))
    downgrade(empty_database_url, "0001")
    with make_engine(empty_database_url).connect() as conn:
        images = conn.execute(
            sa.text("SELECT id, state, attempt_count, failure_reason, last_job_id FROM images ORDER BY id")
        ).all()
        states = dict(conn.execute(sa.text("SELECT id, state FROM scan_jobs")).all())
        predictions = conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar_one()
    assert [tuple(row) for row in images] == [
        (1, "scored", 0, None, 2),
        (2, "scored", 1, None, 2),
        (3, "failed", 2, "corrupt", 2),
        (4, "skipped", 0, None, 2),
    ]
    assert states == {1: "finished", 2: "running"} and predictions == 2
    upgrade(empty_database_url)
    assert len(_members(empty_database_url)) == 5
