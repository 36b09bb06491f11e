"""A job is a durable record: screening again keeps earlier jobs whole; an interrupted run is resumable
(the same command, or ``--resume JOB``); a failed run says why and changes nothing else; abandoned jobs
are closed and old ones pruned only on purpose."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.fixtures.images import xray_png_bytes

pytestmark = pytest.mark.slow


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        folder = root / "sub" if i < 2 else root
        (folder / f"img{i}.png").write_bytes(xray_png_bytes(48, seed=i))
    return root


@pytest.fixture
def env(producer_env, tiny_bundle_path: Path, run_cli):
    producer_env(chunk_size=2)
    assert run_cli("db", "upgrade").exit_code == 0
    registered = run_cli("bundle", "register", tiny_bundle_path, "--promote")
    assert registered.exit_code == 0, registered.output
    from deepcovid.settings import get_settings

    return get_settings()


def _engine(tmp_path: Path):
    from db.engine import make_engine

    return make_engine(f"sqlite:///{tmp_path / 'data' / 'deepcovid.db'}")


def _job(tmp_path: Path, job_id: int):
    from db.queries import job_progress

    return job_progress(_engine(tmp_path), job_id)


def test_screening_again_keeps_the_first_jobs_results(env, run_cli, archive: Path, tmp_path: Path) -> None:
    assert run_cli("screen", archive).exit_code == 0
    assert run_cli("screen", archive).exit_code == 0
    assert run_cli("screen", archive / "sub").exit_code == 0
    first, second, sub = (_job(tmp_path, n) for n in (1, 2, 3))
    assert (first.total, first.scored, first.reused) == (4, 4, 0)
    assert (second.total, second.scored, second.reused) == (4, 4, 4)
    assert (sub.total, sub.reused) == (2, 2)
    csv_text = run_cli("results", "1", "--format", "csv").stdout
    assert len(csv_text.strip().splitlines()) == 5  # header + 4: the first run's command still answers
    assert flat(run_cli("results", "2").stdout).count("scored (reused)") == 4
    assert "reused │ 4 scored by an earlier job" in flat(run_cli("status", "2").stdout)
    jobs = run_cli("jobs", "--format", "json")
    assert jobs.exit_code == 0 and '"reused": 4' in jobs.stdout


def test_ctrl_c_leaves_the_job_interrupted_and_resume_continues_it(
    env, run_cli, archive: Path, tmp_path: Path
) -> None:
    from producer.screen import screen

    def interrupt(summary) -> None:
        raise KeyboardInterrupt

    first = screen(str(archive), settings=env, on_chunk=interrupt)
    assert first.interrupted and first.done == 2
    progress = _job(tmp_path, first.job_id)
    assert progress.state.value == "interrupted" and "--resume 1" in (progress.detail or "")
    assert progress.rate_per_s is None and progress.eta_s is None  # nothing works on it

    status = run_cli("status", "1")
    assert "interrupted" in status.stdout and "ETA" not in status.stdout
    resumed = run_cli("screen", "--resume", "1")
    assert resumed.exit_code == 0, resumed.output
    assert "Job 1 (resumed)" in flat(resumed.stdout)
    done = _job(tmp_path, 1)
    assert done.state.value == "finished" and done.scored == 4 and done.reused == 0
    refused = run_cli("screen", "--resume", "1")
    assert refused.exit_code == 2 and "only an interrupted job" in refused.stderr
    assert run_cli("screen", "--resume", "9").exit_code == 1


def test_sigterm_interrupts_like_ctrl_c(env, archive: Path, tmp_path: Path) -> None:
    from producer.screen import screen

    def terminate(summary) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    summary = screen(str(archive), settings=env, on_chunk=terminate)
    assert summary.interrupted and _job(tmp_path, summary.job_id).state.value == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_failed_run_says_why_and_leaves_other_jobs_alone(env, archive: Path, tmp_path: Path) -> None:
    from producer.screen import screen

    first = screen(str(archive / "sub"), settings=env)
    before = _job(tmp_path, first.job_id)

    def crash(summary) -> None:
        raise RuntimeError("boom at /archive/patient-name/img.png")

    with pytest.raises(RuntimeError):
        screen(str(archive), settings=env, rescore=True, on_chunk=crash)
    failed = _job(tmp_path, 2)
    assert failed.state.value == "failed" and "RuntimeError" in (failed.detail or "")
    assert "patient-name" not in (failed.detail or "")  # a URI is patient data
    assert failed.queued == 2 and failed.scored == 2
    after = _job(tmp_path, first.job_id)
    assert (after.state, after.counts, after.flagged) == (before.state, before.counts, before.flagged)


def test_a_bad_device_creates_no_job(env, run_cli, producer_env, archive: Path, tmp_path: Path) -> None:
    assert run_cli("screen", archive).exit_code == 0
    producer_env(device="cuda:7")
    result = run_cli("screen", archive, "--rescore")
    assert result.exit_code != 0 and "Traceback" not in result.output
    from db.queries import list_jobs

    assert [job.job_id for job in list_jobs(_engine(tmp_path))] == [1]


def test_a_running_job_whose_process_is_gone_reads_interrupted(env, archive: Path, tmp_path: Path) -> None:
    from db.jobs import create_job
    from db.queries import list_jobs
    from producer.screen import screen

    engine = _engine(tmp_path)
    options = {"include": "default", "rescore": False, "embedded": True}
    include = screen.__globals__["parse_include"](None).describe()
    options["include"] = include
    orphan = create_job(
        engine,
        source=str(archive),
        bundle_id=env_bundle(engine),
        options=options,
        runner=f"{os.uname()[1]}:999999999",
    )
    (listed,) = list_jobs(engine)
    assert listed.state.value == "interrupted" and listed.rate_per_s is None
    # Running the same command again continues that job rather than starting another.
    summary = screen(str(archive), settings=env)
    assert summary.job_id == orphan and summary.resumed


def env_bundle(engine) -> str:
    from db.registry import active_bundle

    record = active_bundle(engine)
    assert record is not None
    return record.bundle_id


def test_jobs_close_cancels_what_is_left(env, run_cli, archive: Path, tmp_path: Path) -> None:
    from producer.screen import screen

    def interrupt(summary) -> None:
        raise KeyboardInterrupt

    screen(str(archive), settings=env, on_chunk=interrupt)
    closed = run_cli("jobs", "close", "1")
    assert closed.exit_code == 0, closed.output
    assert "Job 1 is cancelled: 2 queued images cancelled" in flat(closed.stdout)
    progress = _job(tmp_path, 1)
    assert (progress.scored, progress.cancelled, progress.queued) == (2, 2, 0)
    assert run_cli("screen", "--resume", "1").exit_code == 2


def test_jobs_prune_removes_history_only_when_asked(env, run_cli, archive: Path, tmp_path: Path) -> None:
    from db.models import utcnow

    assert run_cli("screen", archive).exit_code == 0
    assert run_cli("screen", archive / "sub").exit_code == 0
    engine = _engine(tmp_path)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE scan_jobs SET created_at = :t WHERE id = 1"), {"t": utcnow() - timedelta(days=30)}
        )
    cutoff = (utcnow() - timedelta(days=7)).strftime("%Y-%m-%d")
    refused = run_cli("jobs", "prune", "--before", cutoff)  # no terminal to answer: not confirmed
    assert refused.exit_code != 0 and _job(tmp_path, 1).total == 4
    pruned = run_cli("jobs", "prune", "--before", cutoff, "--yes")
    assert pruned.exit_code == 0, pruned.output
    assert "Removed 1 jobs" in flat(pruned.stdout)
    from db.queries import list_jobs

    (left,) = list_jobs(engine)
    # Job 2 reused job 1's predictions for the subfolder: they stay; the other two go with job 1.
    assert left.job_id == 2 and left.scored == 2
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 2
        assert conn.execute(sa.text("SELECT count(*) FROM images")).scalar() == 2
