"""``deepcovid screen`` end to end, then the job commands (status, results, jobs, audit, requeue)."""

from __future__ import annotations

import base64
import csv
import io
import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.fixtures.images import jpeg_bytes, xray_png_bytes

pytestmark = pytest.mark.slow


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def xray_archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    (root / "ward-a").mkdir(parents=True)
    (root / "ward-b").mkdir()
    for i in range(3):
        (root / "ward-a" / f"img{i}.png").write_bytes(xray_png_bytes(64, opacity=bool(i % 2), seed=i))
    (root / "ward-b" / "photo.jpg").write_bytes(jpeg_bytes(gray=True, size=(40, 56)))
    (root / "ward-b" / "broken.png").write_bytes(xray_png_bytes(64)[:60])  # truncated
    (root / "ward-b" / "empty.dcm").write_bytes(b"")
    (root / "ward-b" / "notes.txt").write_text("not listed")
    return root


def _engine(data_dir: Path):
    from db.engine import make_engine

    return make_engine(f"sqlite:///{data_dir / 'deepcovid.db'}")


def test_screen_end_to_end_and_job_commands(
    run_cli, producer_env, xray_archive: Path, tiny_bundle_path: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    result = run_cli("screen", xray_archive, "--bundle", tiny_bundle_path, "--batch-size", "2")
    assert result.exit_code == 1, result.output  # two images failed, as `inspect` would say
    assert "2 images failed (reasons above): exit 1; pass --allow-failures" in flat(result.stderr)
    out = flat(result.stdout)
    assert "listed 6; already scored 0; scored now 4; failed 2" in out
    assert "truncated" in out and "empty_file" in out
    assert str(data_dir / "deepcovid.db") in out
    assert "deepcovid results 1 --format csv" in out
    assert "is now the active bundle" in out

    engine = _engine(data_dir)
    with engine.connect() as conn:
        states = dict(conn.execute(sa.text("SELECT state, count(*) FROM job_images GROUP BY state")).all())
        predictions = conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar()
        job_state = conn.execute(sa.text("SELECT state FROM scan_jobs WHERE id = 1")).scalar()
    assert states == {"scored": 4, "failed": 2}
    assert predictions == 4
    assert job_state == "finished"

    # status / jobs / results on the first job
    status = run_cli("status", "1")
    assert status.exit_code == 0, status.output
    text = flat(status.stdout)
    expected_rows = ("state │ finished", "total │ 6", "scored │ 4", "failed │ 2")
    expected_rows += ("truncated │ 1", "empty_file │ 1")
    for expected in expected_rows:
        assert expected in text, text

    jobs = run_cli("jobs")
    assert jobs.exit_code == 0, jobs.output
    assert str(xray_archive) in jobs.stdout

    table = run_cli("results", "1", "--limit", "10")
    assert table.exit_code == 0, table.output
    assert "img0.png" in table.stdout and "truncated" in table.stdout

    exported = tmp_path / "out.csv"
    csv_result = run_cli("results", "1", "--format", "csv", "--out", exported)
    assert csv_result.exit_code == 0, csv_result.output
    rows = list(csv.DictReader(io.StringIO(exported.read_text())))
    assert len(rows) == 6
    assert {r["uri"] for r in rows} == {
        str(p) for p in xray_archive.rglob("*") if p.is_file() and p.suffix != ".txt"
    }

    limited = run_cli("results", "1", "--format", "csv", "--limit", "2")
    assert limited.exit_code == 0, limited.output
    assert len(limited.stdout.strip().splitlines()) == 3  # header + 2 rows

    jsonl = run_cli("results", "1", "--format", "jsonl", "--flagged")
    assert jsonl.exit_code == 0, jsonl.output
    flagged = [json.loads(line) for line in jsonl.stdout.splitlines() if line.strip()]
    with engine.connect() as conn:
        expected = conn.execute(
            sa.text("SELECT count(*) FROM predictions WHERE job_id = 1 AND ensemble_decision")
        ).scalar()
    assert len(flagged) == expected

    audit = run_cli("audit", str(xray_archive / "ward-a" / "img0.png"))
    assert audit.exit_code == 0, audit.output
    missing = run_cli("audit", "/nowhere.png")
    assert missing.exit_code == 1

    # Re-running resumes: scored images are skipped, only the failed ones are tried again.
    again = run_cli("screen", xray_archive, "--allow-failures")  # the bundle is now registered and active
    assert again.exit_code == 0, again.output
    assert "failed" not in flat(again.stderr)  # still reported in the summary, but no exit-1 line
    assert "listed 6; already scored 4; scored now 0; failed 2" in flat(again.stdout)
    # The images now belong to job 2, which reports the earlier scores as its own.
    status2 = flat(run_cli("status", "2").stdout)
    assert "scored │ 4" in status2 and "failed │ 2" in status2


def test_requeue_failed_sends_them_to_the_broker(
    run_cli, producer_env, xray_archive: Path, tiny_bundle_path: Path, tmp_path: Path, redis_url: str
) -> None:
    import redis

    assert run_cli("screen", xray_archive, "--bundle", tiny_bundle_path, "--allow-failures").exit_code == 0
    queue = f"test-requeue-{uuid.uuid4().hex[:8]}"
    producer_env(broker_url=redis_url, queue=queue)
    client = redis.Redis.from_url(redis_url)
    try:
        result = run_cli("requeue", "1", "--failed", "--reason", "empty_file")
        assert result.exit_code == 0, result.output
        assert "re-queued 1 failed images" in flat(result.stdout)
        messages = client.lrange(queue, 0, -1)
        assert len(messages) == 1
        body = json.loads(base64.b64decode(json.loads(messages[0])["body"]))
        args, kwargs, _embed = body
        assert kwargs["job_id"] == 1 and kwargs["uris"] == [str(xray_archive / "ward-b" / "empty.dcm")]

        with _engine(tmp_path / "data").connect() as conn:
            state = conn.execute(
                sa.text(
                    "SELECT m.state FROM job_images m JOIN images i ON i.id = m.image_id "
                    "WHERE m.job_id = 1 AND i.uri = :u"
                ),
                {"u": kwargs["uris"][0]},
            ).scalar()
            job_state = conn.execute(sa.text("SELECT state FROM scan_jobs WHERE id = 1")).scalar()
        assert state == "queued" and job_state == "running"

        # A stuck job (its chunk lost with a crashed broker): --queued re-sends what is still queued.
        client.delete(queue)
        result = run_cli("requeue", "1", "--queued")
        assert result.exit_code == 0, result.output
        assert "re-queued 1 queued images" in flat(result.stdout)
        resent = json.loads(base64.b64decode(json.loads(client.lrange(queue, 0, -1)[0])["body"]))[1]
        assert resent["uris"] == kwargs["uris"]

        assert run_cli("requeue", "1").exit_code == 2  # --failed or --queued is required
        assert run_cli("requeue", "1", "--failed", "--reason", "bogus").exit_code == 2
    finally:
        client.delete(queue)


def test_screen_without_a_bundle_says_how_to_make_one(run_cli, producer_env, xray_archive: Path) -> None:
    result = run_cli("screen", xray_archive)
    assert result.exit_code == 16
    text = flat(result.stderr)
    assert "deepcovid bundle init" in text and "deepcovid train" in text


def test_screen_missing_source(run_cli, producer_env, tmp_path: Path) -> None:
    result = run_cli("screen", tmp_path / "nothing-here")
    assert result.exit_code == 10


def test_screen_of_a_single_file(
    run_cli, producer_env, xray_archive: Path, tiny_bundle_path: Path, tmp_path: Path
) -> None:
    image = next(p for p in sorted(xray_archive.rglob("*.png")) if p.stat().st_size > 100)
    result = run_cli("screen", image, "--bundle", tiny_bundle_path)
    assert result.exit_code == 0, result.output
    assert "listed 1; already scored 0; scored now 1; failed 0" in flat(result.stdout)
    with _engine(tmp_path / "data").connect() as conn:
        rows = conn.execute(sa.text("SELECT uri, state FROM images JOIN job_images ON image_id = id")).all()
        assert rows == [(str(image), "scored")]


def test_screen_of_an_empty_archive_creates_no_job(
    run_cli, producer_env, tiny_bundle_path: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    result = run_cli("screen", empty, "--bundle", tiny_bundle_path)
    assert result.exit_code == 19, result.output
    assert "no images found" in flat(result.stderr) and "Traceback" not in result.output
    assert "Job " not in result.stdout


def test_interrupted_screen_keeps_what_was_scored_and_resumes(
    producer_env, xray_archive: Path, tiny_bundle_path: Path, tmp_path: Path
) -> None:
    from deepcovid.settings import get_settings
    from producer.screen import screen

    producer_env(chunk_size=2)
    settings = get_settings()

    def interrupt(summary) -> None:
        raise KeyboardInterrupt

    first = screen(str(xray_archive), settings=settings, bundle=str(tiny_bundle_path), on_chunk=interrupt)
    assert first.interrupted and first.done == 2
    with _engine(tmp_path / "data").connect() as conn:
        assert conn.execute(sa.text("SELECT state FROM scan_jobs WHERE id = 1")).scalar() == "interrupted"

    second = screen(str(xray_archive), settings=settings)
    assert not second.interrupted and second.resumed and second.job_id == 1
    assert second.listed == 6 and second.skipped + second.to_score == 6
    assert second.scored + first.scored == 4
