"""Stall detection: ``status``/``jobs`` flag a running job whose queued images stopped moving,
``status --check`` exits non-zero for cron or Nagios, and ``requeue --stalled`` re-sends them."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from deepcovid.exitcodes import ExitCode


def flat(text: str) -> str:
    return " ".join(text.split())


def _job(url: str, uris: list[str], *, age_s: float = 0.0, failed: int = 0) -> int:
    """A running job with ``uris`` queued, whose every timestamp is ``age_s`` seconds old."""
    from db.engine import make_engine
    from db.jobs import create_job, finish_job_if_done
    from db.models import utcnow
    from db.rows import ImageRef
    from db.writes import register_images

    engine = make_engine(url)
    job_id = create_job(engine, source="/archive", bundle_id="b1")
    register_images(engine, job_id, "b1", [ImageRef(uri) for uri in uris])
    then = utcnow() - timedelta(seconds=age_s)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE scan_jobs SET created_at = :t WHERE id = :j"), {"t": then, "j": job_id})
        conn.execute(
            sa.text("UPDATE job_images SET updated_at = :t WHERE job_id = :j"), {"t": then, "j": job_id}
        )
        if failed:
            conn.execute(
                sa.text(
                    "UPDATE job_images SET state = 'failed', failure_reason = 'truncated' WHERE job_id = :j"
                ),
                {"j": job_id},
            )
    if failed:
        finish_job_if_done(engine, job_id)
    return job_id


@pytest.fixture
def stall_db(producer_env, migrated_sqlite) -> str:
    url = migrated_sqlite()
    producer_env(database_url=url, stall_after=600)
    return url


def test_stall_window_defaults_to_the_hard_time_limit_plus_a_margin(producer_env) -> None:
    from deepcovid.defaults import STALL_MARGIN_S
    from deepcovid.settings import get_settings

    producer_env(task_time_limit=100)
    assert get_settings().effective_stall_after == 100 + STALL_MARGIN_S
    producer_env(stall_after=42)
    assert get_settings().effective_stall_after == 42


def test_status_and_jobs_flag_a_stalled_job_and_check_exits_with_its_code(run_cli, stall_db: str) -> None:
    stalled = _job(stall_db, ["/archive/a.png", "/archive/b.png"], age_s=3600)
    healthy = _job(stall_db, ["/archive/c.png"], age_s=10)
    with_failures = _job(stall_db, ["/archive/d.png"], age_s=3600, failed=1)

    status = run_cli("status", str(stalled))
    assert status.exit_code == 0, status.output
    assert "stalled" in flat(status.stdout)
    assert "deepcovid requeue" in flat(status.stdout)
    assert "stalled" not in flat(run_cli("status", str(healthy)).stdout)

    jobs = run_cli("jobs")
    assert jobs.exit_code == 0, jobs.output
    lines = {line.split()[0]: line for line in jobs.stdout.splitlines() if line.split()}
    assert "stalled" in lines[str(stalled)]
    assert "stalled" not in lines[str(healthy)]

    listed = run_cli("jobs", "--format", "json")
    assert listed.exit_code == 0, listed.output
    by_id = {row["job"]: row for row in json.loads(listed.stdout)}
    assert by_id[stalled]["stalled"] is True and by_id[healthy]["stalled"] is False
    assert by_id[stalled]["queued"] == 2 and by_id[stalled]["last_progress_at"]

    check = run_cli("status", str(stalled), "--check")
    assert check.exit_code == int(ExitCode.STALLED), check.output
    assert len(check.output.strip().splitlines()) == 1 and "stalled" in check.output

    ok = run_cli("status", str(healthy), "--check")
    assert ok.exit_code == 0, ok.output
    assert len(ok.output.strip().splitlines()) == 1 and "running" in ok.output

    failed = run_cli("status", str(with_failures), "--check")
    assert failed.exit_code == int(ExitCode.FAILURES), failed.output
    assert len(failed.output.strip().splitlines()) == 1 and "failed" in failed.output


def test_requeue_stalled_resends_the_queued_images_of_stalled_jobs_only(
    run_cli, producer_env, stall_db: str, redis_url: str
) -> None:
    import redis

    stalled = _job(stall_db, ["/archive/a.png", "/archive/b.png"], age_s=3600)
    _job(stall_db, ["/archive/c.png"], age_s=10)
    queue = f"test-stalled-{uuid.uuid4().hex[:8]}"
    producer_env(broker_url=redis_url, queue=queue)
    client = redis.Redis.from_url(redis_url)
    try:
        result = run_cli("requeue", "--stalled")
        assert result.exit_code == 0, result.output
        assert f"Job {stalled}: re-queued 2" in flat(result.stdout)
        messages = client.lrange(queue, 0, -1)
        assert len(messages) == 1
        kwargs = json.loads(base64.b64decode(json.loads(messages[0])["body"]))[1]
        assert kwargs["job_id"] == stalled and kwargs["uris"] == ["/archive/a.png", "/archive/b.png"]

        # Re-sending counts as progress: the next reaper run leaves the job alone for a window.
        assert "stalled" not in flat(run_cli("status", str(stalled)).stdout)
        again = run_cli("requeue", "--stalled")
        assert again.exit_code == 0, again.output
        assert "no stalled jobs" in flat(again.stdout)
        assert client.llen(queue) == 1

        assert run_cli("requeue", "1", "--stalled").exit_code == int(ExitCode.USAGE)
        assert run_cli("requeue", "--queued").exit_code == int(ExitCode.USAGE)  # JOB needed
    finally:
        client.delete(queue)
