"""Real ``celery -A worker worker`` subprocesses scoring chunks from a real broker into PostgreSQL.

No in-memory broker, no eager mode: Redis (a private redis-server), RabbitMQ, moto's S3 server and
Flower all run as real services on loopback.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from db.models import Image, Prediction, ScanJob
from deepcovid.queue import make_celery, send_chunk
from deepcovid.settings import Settings
from tests.fixtures.faults import image_states
from tests.fixtures.images import dicom_bytes, jpeg_bytes, xray_png_bytes
from tests.fixtures.services import (
    RABBITMQ_URL,
    REPO_ROOT,
    ServiceProcess,
    amqp_available,
    delete_amqp_queue,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    # The worker tests run against the real PostgreSQL only (SQLite is covered by the db tests).
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

POISON = b"CRASH-THE-WORKER"


# --------------------------------------------------------------------------------------------------
# helpers


def register(engine: Any, bundle_id: str, uris: list[str], source: str = "test") -> int:
    from db.jobs import create_job
    from db.rows import ImageRef
    from db.writes import register_images
    from tests.fixtures.faults import ensure_bundle_registered

    ensure_bundle_registered(engine, bundle_id)
    job_id = create_job(engine, source=source, bundle_id=bundle_id, options={})
    queued = register_images(engine, job_id, bundle_id, [ImageRef(uri=u) for u in uris])
    assert queued == uris
    return job_id


def send(broker_url: str, queue: str, job_id: int, bundle_id: str, uris: list[str]) -> None:
    app = make_celery(Settings(broker_url=broker_url, queue=queue))  # type: ignore[arg-type]
    try:
        send_chunk(app, job_id, bundle_id, uris)
    finally:
        app.close()


def states(engine: Any, uris: list[str]) -> dict[str, tuple[str, str | None]]:
    return image_states(engine, uris)


def wait_until_done(
    engine: Any, uris: list[str], workers: list[ServiceProcess], timeout: float = 240
) -> dict:
    def done() -> dict | None:
        for worker in workers:
            if not worker.alive():
                pytest.fail(f"worker exited ({worker.proc.returncode}):\n{worker.log()[-4000:]}")
        current = states(engine, uris)
        if len(current) == len(set(uris)) and all(s != "queued" for s, _ in current.values()):
            return current
        return None

    try:
        return wait_for(done, timeout, "every image of the chunk to be scored or failed", interval=0.5)  # type: ignore[return-value]
    except BaseException:
        for worker in workers:
            print(f"--- {worker.name} log ---\n{worker.log()[-6000:]}")
        raise


def prediction_counts(engine: Any, bundle_id: str, uris: list[str]) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(Image.uri, sa.func.count(Prediction.id))
            .join(Prediction, Prediction.image_id == Image.id)
            .where(Image.uri.in_(uris), Prediction.bundle_id == bundle_id)
            .group_by(Image.uri)
        )
        return dict(rows.all())


def job_state(engine: Any, job_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.select(ScanJob.state).where(ScanJob.id == job_id)).scalar_one().value)


def write_images(root: Path, count: int, *, size: int = 64, prefix: str = "img") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(count):
        path = root / f"{prefix}_{i:03d}.png"
        path.write_bytes(xray_png_bytes(size, seed=i))
        uris.append(str(path))
    return uris


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    root.mkdir()
    return root


@pytest.fixture
def worker_env(
    redis_url: str, migrated_url: str, archive: Path, bundles_dir: Path, tmp_path: Path
) -> dict[str, str]:
    """Settings for a test worker: private Redis, a queue of its own, the throwaway PostgreSQL database."""
    return {
        "DEEPCOVID_BROKER_URL": redis_url,
        "DEEPCOVID_QUEUE": f"test-{uuid.uuid4().hex[:10]}",
        "DEEPCOVID_DATABASE_URL": migrated_url,
        "DEEPCOVID_STORAGE_ROOTS": str(archive),
        "DEEPCOVID_BUNDLES_DIR": str(bundles_dir),
        "DEEPCOVID_DATA_DIR": str(tmp_path / "data"),
    }


# --------------------------------------------------------------------------------------------------
# tests


def test_worker_scores_a_mixed_chunk(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    tmp_path: Path,
    tiny_bundle_id: str,
) -> None:
    good = write_images(archive, 3)
    (archive / "scan.dcm").write_bytes(dicom_bytes())
    (archive / "photo.jpg").write_bytes(jpeg_bytes(size=(120, 100)))
    good += [str(archive / "scan.dcm"), str(archive / "photo.jpg")]
    (archive / "empty.png").write_bytes(b"")
    (archive / "corrupt.png").write_bytes(xray_png_bytes(64)[:70])
    (archive / "report.txt").write_text("not an image\n" * 20)
    (tmp_path / "elsewhere.png").write_bytes(xray_png_bytes(64))
    bad = {
        str(archive / "empty.png"): "empty_file",
        str(archive / "corrupt.png"): "truncated",
        str(archive / "report.txt"): "not_an_image",
        str(archive / "missing.png"): "not_found",
        str(archive / ".." / "elsewhere.png"): "outside_storage_root",
    }
    uris = good[:2] + list(bad)[:3] + good[2:] + list(bad)[3:]
    job_id = register(migrated_engine, tiny_bundle_id, uris)

    worker = start_worker(worker_env)
    send(worker_env["DEEPCOVID_BROKER_URL"], worker_env["DEEPCOVID_QUEUE"], job_id, tiny_bundle_id, uris)
    final = wait_until_done(migrated_engine, uris, [worker])

    for uri in good:
        assert final[uri] == ("scored", None)
    for uri, reason in bad.items():
        assert final[uri] == ("failed", reason)
    assert prediction_counts(migrated_engine, tiny_bundle_id, uris) == {u: 1 for u in good}
    with migrated_engine.connect() as conn:
        written_by = conn.execute(sa.select(Prediction.worker_host, Prediction.device)).all()
    assert all(host for host, _ in written_by) and {device for _, device in written_by} == {"cpu fp32"}
    wait_for(lambda: job_state(migrated_engine, job_id) == "finished", 30, "the job to be finished")
    wait_for(lambda: "succeeded" in worker.log(), 30, "the task success log line")
    log = worker.log()
    assert "Doe" not in log and "elsewhere.png" not in log and "report.txt" not in log


def test_killed_worker_loses_nothing(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    tiny_bundle_id: str,
) -> None:
    """SIGKILL the whole worker (main process and pool child) mid-chunk; a new worker finishes it, and
    every image ends with one heatmap row and one artifact, whichever delivery made it."""
    uris = write_images(archive, 12, size=1200)
    job_id = register(migrated_engine, tiny_bundle_id, uris)
    env = worker_env | {"DEEPCOVID_VISIBILITY_TIMEOUT": "5", "DEEPCOVID_BATCH_SIZE": "1"}
    env["DEEPCOVID_HEATMAPS"] = "all"

    first = start_worker(env)
    send(env["DEEPCOVID_BROKER_URL"], env["DEEPCOVID_QUEUE"], job_id, tiny_bundle_id, uris)
    wait_for(lambda: "received" in first.log(), 60, "the first worker to receive the chunk")
    time.sleep(1.0)  # mid-chunk: loading the ensemble and scoring take longer than this
    assert all(s == "queued" for s, _ in states(migrated_engine, uris).values()), "chunk finished too early"
    first.kill()
    time.sleep(6)  # past the visibility timeout: Redis gives the unacknowledged chunk to the next worker

    second = start_worker(env)
    final = wait_until_done(migrated_engine, uris, [second], timeout=300)
    assert all(state == ("scored", None) for state in final.values())
    assert prediction_counts(migrated_engine, tiny_bundle_id, uris) == {u: 1 for u in uris}
    assert "redelivered" in second.log()
    wait_for(lambda: job_state(migrated_engine, job_id) == "finished", 30, "the job to be finished")
    with migrated_engine.connect() as conn:
        keys = conn.execute(sa.text("SELECT key FROM heatmaps WHERE key IS NOT NULL")).scalars().all()
    artifacts = [p for p in (Path(env["DEEPCOVID_DATA_DIR"]) / "artifacts").rglob("*") if p.is_file()]
    assert len(keys) == len(set(keys)) == len(uris) and len(artifacts) == len(uris)


SITECUSTOMIZE = f'''
"""Test-only: make one image kill the pool process that reads it, as a decoder segfault would.

Patched in worker_process_init without importing torch: that hook must stay fast or the pool
parent gives up waiting for the child.
"""
import os, signal
from celery.signals import worker_process_init

@worker_process_init.connect
def _arm(**_):
    import deepcovid.pipeline as pipeline
    real = pipeline._prepare
    def _prepare(storage, uri, *args):
        if storage.read(uri).endswith({POISON!r}):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(storage, uri, *args)
    pipeline._prepare = _prepare
'''


def test_image_that_kills_its_worker_is_isolated(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    tmp_path: Path,
    tiny_bundle_id: str,
) -> None:
    """The chunk comes back after each crash; its images are then scored one at a time until the
    culprit has killed its worker max_attempts times and is failed as crashed_worker."""
    uris = write_images(archive, 6)
    poison = archive / "poison.png"
    poison.write_bytes(xray_png_bytes(64) + POISON)
    uris.insert(3, str(poison))
    job_id = register(migrated_engine, tiny_bundle_id, uris)

    hook = tmp_path / "crash_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = worker_env | {"DEEPCOVID_MAX_ATTEMPTS": "2", "PYTHONPATH": f"{hook}:{REPO_ROOT}"}
    worker = start_worker(env, pool="prefork", concurrency=1)
    send(env["DEEPCOVID_BROKER_URL"], env["DEEPCOVID_QUEUE"], job_id, tiny_bundle_id, uris)
    final = wait_until_done(migrated_engine, uris, [worker], timeout=300)

    assert final.pop(str(poison)) == ("failed", "crashed_worker")
    assert all(state == ("scored", None) for state in final.values())
    assert prediction_counts(migrated_engine, tiny_bundle_id, uris) == {u: 1 for u in final}
    log = worker.log()
    assert log.count("WorkerLostError") >= 2 or log.count("signal 9") >= 2, log[-3000:]


def test_pickle_messages_are_refused(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    tiny_bundle_id: str,
) -> None:
    from kombu import Connection, Exchange, Producer, Queue

    uris = write_images(archive, 2)
    job_id = register(migrated_engine, tiny_bundle_id, uris)
    worker = start_worker(worker_env)
    queue = worker_env["DEEPCOVID_QUEUE"]
    body = ((), {"job_id": job_id, "bundle_id": tiny_bundle_id, "uris": uris}, {})
    with Connection(worker_env["DEEPCOVID_BROKER_URL"]) as conn:
        producer = Producer(conn.channel())
        producer.publish(
            body,
            serializer="pickle",
            exchange=Exchange(""),
            routing_key=queue,
            declare=[Queue(queue)],
            headers={
                "task": "deepcovid.score_chunk",
                "id": str(uuid.uuid4()),
                "lang": "py",
                "argsrepr": "",
                "kwargsrepr": "",
            },
        )
    wait_for(lambda: "Refusing to deserialize" in worker.log(), 60, "the worker to refuse the pickle message")
    time.sleep(2)
    assert all(state == ("queued", None) for state in states(migrated_engine, uris).values())
    assert prediction_counts(migrated_engine, tiny_bundle_id, uris) == {}
    assert worker.alive()


def test_s3_chunk_through_moto(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    s3_server: Any,
    s3_bucket: tuple[Any, str],
    tiny_bundle_id: str,
) -> None:
    client, bucket = s3_bucket
    uris = []
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"xrays/{i}.png", Body=xray_png_bytes(64, seed=i))
        uris.append(f"s3://{bucket}/xrays/{i}.png")
    client.put_object(Bucket=bucket, Key="xrays/bad.png", Body=b"garbage")
    missing = f"s3://{bucket}/xrays/missing.png"
    all_uris = uris + [f"s3://{bucket}/xrays/bad.png", missing]
    job_id = register(migrated_engine, tiny_bundle_id, all_uris, source=f"s3://{bucket}/xrays/")

    worker = start_worker(worker_env | s3_server.env() | {"DEEPCOVID_S3_ALLOW": bucket})
    send(worker_env["DEEPCOVID_BROKER_URL"], worker_env["DEEPCOVID_QUEUE"], job_id, tiny_bundle_id, all_uris)
    final = wait_until_done(migrated_engine, all_uris, [worker])
    assert [final[u] for u in uris] == [("scored", None)] * 3
    assert final[f"s3://{bucket}/xrays/bad.png"] == ("failed", "not_an_image")
    assert final[missing] == ("failed", "not_found")


@pytest.fixture
def amqp_queue() -> Iterator[str]:
    if not amqp_available():
        pytest.skip("RabbitMQ is not listening on 127.0.0.1:5672")
    queue = f"test-{uuid.uuid4().hex[:10]}"
    yield queue
    delete_amqp_queue(RABBITMQ_URL, queue)


def test_rabbitmq_broker_with_the_full_ensemble(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    amqp_queue: str,
    full_bundle_id: str,
) -> None:
    uris = write_images(archive, 3)
    (archive / "empty.png").write_bytes(b"")
    uris.append(str(archive / "empty.png"))
    job_id = register(migrated_engine, full_bundle_id, uris)
    env = worker_env | {"DEEPCOVID_BROKER_URL": RABBITMQ_URL, "DEEPCOVID_QUEUE": amqp_queue}
    worker = start_worker(env)
    send(RABBITMQ_URL, amqp_queue, job_id, full_bundle_id, uris)
    final = wait_until_done(migrated_engine, uris, [worker], timeout=300)
    assert [final[u] for u in uris[:3]] == [("scored", None)] * 3
    assert final[uris[3]] == ("failed", "empty_file")
    archs = ("resnet18", "resnet50", "squeezenet1_1", "densenet121")
    columns = [getattr(Prediction, f"{arch}_probability") for arch in archs]
    with migrated_engine.connect() as conn:
        rows = conn.execute(sa.select(*columns).where(Prediction.bundle_id == full_bundle_id)).all()
    assert len(rows) == 3
    assert all(0.0 <= p <= 1.0 for row in rows for p in row)


def test_flower_lists_the_worker_and_its_tasks(
    start_worker: Callable[..., ServiceProcess],
    start_flower: Callable[..., tuple[ServiceProcess, str]],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    tiny_bundle_id: str,
) -> None:
    import requests

    uris = write_images(archive, 2, prefix="Doe_Jane")
    job_id = register(migrated_engine, tiny_bundle_id, uris)
    _flower, base = start_flower(worker_env, basic_auth="ops:s3cret")
    worker = start_worker(worker_env)
    auth = ("ops", "s3cret")
    assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401

    def worker_listed() -> bool:
        response = requests.get(f"{base}/api/workers", params={"refresh": "1"}, auth=auth, timeout=20)
        return response.ok and any(name.startswith(worker.name) for name in response.json())

    wait_for(worker_listed, 60, "flower to list the worker", interval=1)
    send(worker_env["DEEPCOVID_BROKER_URL"], worker_env["DEEPCOVID_QUEUE"], job_id, tiny_bundle_id, uris)
    wait_until_done(migrated_engine, uris, [worker])

    def succeeded_task() -> dict | None:
        tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
        for task in tasks.values():
            if task.get("name") == "deepcovid.score_chunk" and task.get("state") == "SUCCESS":
                return task
        return None

    task = wait_for(succeeded_task, 60, "flower to show the succeeded task", interval=1)
    assert task["worker"].startswith(worker.name)  # type: ignore[index]
    assert "Doe_Jane" not in str(task)  # arguments are shown as a count of URIs


def test_missing_bundle_fails_the_chunk_until_installed_and_requeued(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    tmp_path: Path,
    tiny_bundle_path: Path,
    tiny_bundle_id: str,
) -> None:
    """A bundle not installed on the worker is not retried: the images fail as bundle_unusable, and once
    the bundle is installed, ``requeue --failed --reason bundle_unusable`` scores them."""
    from deepcovid.bundle import install_bundle
    from producer.requeue import requeue

    late_dir = tmp_path / "late-bundles"
    late_dir.mkdir()
    uris = write_images(archive, 2)
    job_id = register(migrated_engine, tiny_bundle_id, uris)
    env = worker_env | {"DEEPCOVID_BUNDLES_DIR": str(late_dir), "DEEPCOVID_RETRY_BACKOFF_MAX": "2"}
    worker = start_worker(env)
    send(env["DEEPCOVID_BROKER_URL"], env["DEEPCOVID_QUEUE"], job_id, tiny_bundle_id, uris)
    failed = wait_until_done(migrated_engine, uris, [worker])
    assert all(state == ("failed", "bundle_unusable") for state in failed.values())
    assert "retrying the chunk" not in worker.log()
    install_bundle(tiny_bundle_path, late_dir)
    settings = Settings(
        broker_url=env["DEEPCOVID_BROKER_URL"],  # type: ignore[arg-type]
        queue=env["DEEPCOVID_QUEUE"],
        database_url=env["DEEPCOVID_DATABASE_URL"],  # type: ignore[arg-type]
    )
    assert requeue(job_id, failed=True, reason="bundle_unusable", settings=settings).images == 2
    final = wait_until_done(migrated_engine, uris, [worker])
    assert all(state == ("scored", None) for state in final.values())
