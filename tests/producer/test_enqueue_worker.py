"""``deepcovid enqueue`` through Redis and a real ``celery worker`` into PostgreSQL, from disk and S3."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.fixtures.images import xray_png_bytes
from tests.fixtures.services import _write_bundle, free_port, port_open, stop_process, wait_for

pytestmark = pytest.mark.slow


def flat(text: str) -> str:
    return " ".join(text.split())


def register_and_promote(url: str, bundle_path: Path, bundles_dir: Path) -> str:
    from db.engine import make_engine
    from db.registry import register_bundle, set_active
    from deepcovid.bundle import install_bundle, load_bundle

    bundle = load_bundle(install_bundle(load_bundle(bundle_path), bundles_dir))
    engine = make_engine(url)
    register_bundle(engine, bundle_id=bundle.bundle_id, manifest=bundle.manifest, path=str(bundle.path))
    set_active(engine, bundle.bundle_id)
    return bundle.bundle_id


def wait_job_finished(url: str, job_id: int, timeout: float = 240) -> None:
    from db.engine import make_engine

    engine = make_engine(url)

    def finished() -> bool:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT state FROM scan_jobs WHERE id = :j"), {"j": job_id}
            ).scalar() == ("finished")

    wait_for(finished, timeout, f"job {job_id} to finish", interval=0.5)


def counts(url: str, sql: str, **params: object) -> dict:
    from db.engine import make_engine

    with make_engine(url).connect() as conn:
        return dict(conn.execute(sa.text(sql), params).all())


def job_id_from(output: str) -> int:
    text = flat(output)
    return int(text.split("Job ", 1)[1].split(":", 1)[0])


@pytest.fixture
def worker_env(producer_pg_url: str, redis_url: str, bundles_dir: Path, tmp_path: Path, producer_env) -> dict:
    archive = tmp_path / "archive"
    archive.mkdir()
    env = {
        "DEEPCOVID_DATABASE_URL": producer_pg_url,
        "DEEPCOVID_BROKER_URL": redis_url,
        "DEEPCOVID_QUEUE": f"test-producer-{uuid.uuid4().hex[:8]}",
        "DEEPCOVID_STORAGE_ROOTS": str(archive),
        "DEEPCOVID_BUNDLES_DIR": str(bundles_dir),
        "DEEPCOVID_CHUNK_SIZE": "2",
    }
    producer_env(**env)
    return env


def test_enqueue_directory_rerun_and_rescore(
    run_cli, worker_env: dict, start_worker, tiny_bundle_path: Path, bundles_dir: Path, tmp_path: Path
) -> None:
    url = worker_env["DEEPCOVID_DATABASE_URL"]
    archive = Path(worker_env["DEEPCOVID_STORAGE_ROOTS"])
    for i in range(4):
        (archive / f"sub{i % 2}").mkdir(exist_ok=True)
        (archive / f"sub{i % 2}" / f"x{i}.png").write_bytes(xray_png_bytes(48, seed=i))
    (archive / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    first_bundle = register_and_promote(url, tiny_bundle_path, bundles_dir)
    start_worker(worker_env)

    result = run_cli("enqueue", archive)
    assert result.exit_code == 0, result.output
    assert "listed 5, queued 5 in 3 chunks, skipped 0" in flat(result.stdout)
    job1 = job_id_from(result.stdout)
    wait_job_finished(url, job1)
    job_states = f"SELECT state, count(*) FROM job_images WHERE job_id = {job1} GROUP BY state"
    assert counts(url, job_states) == {"scored": 4, "failed": 1}
    assert counts(url, "SELECT bundle_id, count(*) FROM predictions GROUP BY bundle_id") == {first_bundle: 4}

    # Re-running skips what the bundle scored; only the failed image goes again.
    again = run_cli("enqueue", archive)
    assert again.exit_code == 0, again.output
    assert "listed 5, queued 1 in 1 chunks, skipped 4" in flat(again.stdout)
    job2 = job_id_from(again.stdout)
    wait_job_finished(url, job2)
    # Job 2 lists the four reused predictions as its own; job 1 keeps its list.
    reused = f"SELECT reused, count(*) FROM job_images WHERE job_id = {job2} GROUP BY reused"
    assert {bool(k): v for k, v in counts(url, reused).items()} == {True: 4, False: 1}
    assert counts(url, job_states) == {"scored": 4, "failed": 1}

    # A new bundle, promoted: --rescore scores everything again and both bundles' results remain.
    second_path = _write_bundle(tmp_path / "second", ("squeezenet1_1",), seed=7)
    second_bundle = register_and_promote(url, second_path, bundles_dir)
    rescored = run_cli("enqueue", archive, "--rescore", "--follow")
    assert rescored.exit_code == 0, rescored.output
    assert "queued 5" in flat(rescored.stdout)
    job3 = job_id_from(rescored.stdout)
    wait_job_finished(url, job3, timeout=30)  # --follow returned, so it is finished already
    assert counts(url, "SELECT bundle_id, count(*) FROM predictions GROUP BY bundle_id") == {
        first_bundle: 4,
        second_bundle: 4,
    }
    nothing = run_cli("enqueue", archive, "--bundle", first_bundle)
    assert nothing.exit_code == 0
    assert "skipped 4" in flat(nothing.stdout)


def test_enqueue_from_s3(
    run_cli, worker_env: dict, start_worker, s3_server, s3_bucket, tiny_bundle_path, bundles_dir
):
    client, bucket = s3_bucket
    url = worker_env["DEEPCOVID_DATABASE_URL"]
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"scans/day1/img{i}.png", Body=xray_png_bytes(48, seed=10 + i))
    client.put_object(
        Bucket=bucket, Key="scans/day1/IM0007", Body=xray_png_bytes(48, seed=20)
    )  # no extension
    client.put_object(Bucket=bucket, Key="scans/.trash/old.png", Body=b"hidden")
    client.put_object(Bucket=bucket, Key="scans-other/x.png", Body=b"other prefix")
    register_and_promote(url, tiny_bundle_path, bundles_dir)
    env = worker_env | s3_server.env() | {"DEEPCOVID_S3_ALLOW": bucket}
    for key, value in (s3_server.env() | {"DEEPCOVID_S3_ALLOW": bucket}).items():
        os.environ[key] = value  # the in-process CLI reads them too; cleaned below
    try:
        from deepcovid.settings import get_settings

        get_settings.cache_clear()
        start_worker(env)
        result = run_cli("enqueue", f"s3://{bucket}/scans", "--include", "png,sniff")
        assert result.exit_code == 0, result.output
        assert "listed 4, queued 4" in flat(result.stdout)
        wait_job_finished(url, job_id_from(result.stdout))
        assert counts(url, "SELECT state, count(*) FROM job_images GROUP BY state") == {"scored": 4}
        uris = counts(url, "SELECT uri, storage FROM images")
        assert uris[f"s3://{bucket}/scans/day1/IM0007"] == "s3"

        missing = run_cli("enqueue", f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x")
        assert missing.exit_code == 12, missing.output
        assert "does not exist" in flat(missing.stderr)

        os.environ["DEEPCOVID_S3_ALLOW"] = f"{bucket}/elsewhere"
        get_settings.cache_clear()
        refused = run_cli("enqueue", f"s3://{bucket}/scans/DOE^JOHN")
        assert refused.exit_code == 17, refused.output
        assert "DEEPCOVID_S3_ALLOW" in flat(refused.stderr) and "DOE^JOHN" not in refused.output
    finally:
        for key in [*s3_server.env(), "DEEPCOVID_S3_ALLOW"]:
            os.environ.pop(key, None)
        get_settings.cache_clear()


def test_enqueue_s3_access_denied(run_cli, producer_env, tmp_path: Path) -> None:
    """A moto server that checks credentials (its own process): unknown keys are refused with 403."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: port_open(port), 30, "the authenticating moto server")
        time.sleep(0.2)
        producer_env(
            s3_endpoint_url=f"http://127.0.0.1:{port}",
            s3_access_key_id="AKIANOBODY",
            s3_secret_access_key="nope",
        )
        result = run_cli("enqueue", "s3://locked-bucket/scans")
        assert result.exit_code == 13, result.output
        assert "denies access" in flat(result.stderr)
    finally:
        stop_process(proc)
        log.close()
