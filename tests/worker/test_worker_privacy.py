"""What a real worker shows of a chunk: ``celery inspect`` and Flower never list its URIs, and a database
error while it runs never quotes them (issue 12, items 7 and 8).

The chunk is held inside the worker by a lock the test takes on ``images``: the worker's first query
waits on it, so the task is reliably active while ``inspect`` asks. The test then kills that query's
connection (a database error carrying the URIs as parameters), the chunk is retried, and once the lock
is released it finishes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from deepcovid.queue import make_celery
from deepcovid.settings import Settings
from tests.fixtures.faults import register_job, send_chunks, wait_for_job
from tests.fixtures.images import xray_png_bytes
from tests.fixtures.services import ServiceProcess, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

# A patient name in the archive's layout; the test code never spells it out in a source line a
# traceback could quote.
MARKER = "Qwzx"
PATIENT = f"{MARKER}^PRIVACY_4242"


@pytest.fixture
def inspector(worker_env: dict[str, str]) -> Iterator[Any]:
    app = make_celery(
        Settings(broker_url=worker_env["DEEPCOVID_BROKER_URL"], queue=worker_env["DEEPCOVID_QUEUE"])
    )  # type: ignore[arg-type]
    yield app.control.inspect(timeout=1.0)
    app.close()


@pytest.fixture
def worker_env(redis_url: str, migrated_url: str, tmp_path: Path, bundles_dir: Path) -> dict[str, str]:
    archive = tmp_path / "archive"
    archive.mkdir()
    return {
        "DEEPCOVID_BROKER_URL": redis_url,
        "DEEPCOVID_QUEUE": f"privacy-{uuid.uuid4().hex[:10]}",
        "DEEPCOVID_DATABASE_URL": migrated_url,
        "DEEPCOVID_STORAGE_ROOTS": str(archive),
        "DEEPCOVID_BUNDLES_DIR": str(bundles_dir),
        "DEEPCOVID_DATA_DIR": str(tmp_path / "data"),
    }


def _waiting_backends(engine: sa.Engine) -> list[int]:
    """The worker's connections blocked on the test's lock (a new transaction: fresh statistics)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'deepcovid' "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
        )
        return [int(pid) for (pid,) in rows]


def test_inspect_flower_and_sql_errors_show_no_uri(
    start_worker: Callable[..., ServiceProcess],
    start_flower: Callable[..., tuple[ServiceProcess, str]],
    worker_env: dict[str, str],
    migrated_engine: sa.Engine,
    tiny_bundle_id: str,
    inspector: Any,
) -> None:
    import requests

    folder = Path(worker_env["DEEPCOVID_STORAGE_ROOTS"]) / PATIENT
    folder.mkdir()
    uris = []
    for i in range(3):
        (folder / f"{i}.png").write_bytes(xray_png_bytes(64, seed=i))
        uris.append(str(folder / f"{i}.png"))
    job_id = register_job(migrated_engine, tiny_bundle_id, uris)
    flower, base = start_flower(worker_env, basic_auth="ops:s3cret")
    worker = start_worker(worker_env)
    auth = ("ops", "s3cret")
    shown: list[str] = []

    def inspected(kind: str) -> bool:
        replies = getattr(inspector, kind)() or {}
        text = json.dumps(replies, default=str)
        shown.append(text)
        return "deepcovid.score_chunk" in text

    locker = migrated_engine.connect()
    try:
        locker.begin()
        locker.execute(sa.text("LOCK TABLE images IN ACCESS EXCLUSIVE MODE"))
        send_chunks(
            worker_env["DEEPCOVID_BROKER_URL"], worker_env["DEEPCOVID_QUEUE"], job_id, tiny_bundle_id, uris, 3
        )
        wait_for(
            lambda: _waiting_backends(migrated_engine),
            120,
            "the chunk to wait on the lock",
            interval=0.5,
            detail=worker.log,
        )
        wait_for(lambda: inspected("active"), 30, "inspect active to show the chunk", interval=0.5)
        inspected("reserved")
        # The chunk's query dies under it: an OperationalError whose statement carried the URIs.
        with migrated_engine.connect() as admin:
            for pid in _waiting_backends(migrated_engine):
                admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        wait_for(lambda: "retry" in worker.log(), 60, "the chunk to be retried", detail=worker.log)
        # The retry waits out its countdown in the worker (scheduled), then blocks on the lock again.
        wait_for(
            lambda: inspected("scheduled") or inspected("active"), 30, "inspect to show the retried chunk"
        )
    finally:
        locker.rollback()
        locker.close()
    wait_for_job(migrated_engine, job_id, uris, [worker])

    def task_infos() -> list[dict[str, Any]]:
        tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
        ours = [t for t in tasks.values() if t.get("name") == "deepcovid.score_chunk"]
        if not any(t.get("state") == "SUCCESS" for t in ours):
            return []
        return [requests.get(f"{base}/api/task/info/{t['uuid']}", auth=auth, timeout=10).json() for t in ours]

    infos = wait_for(task_infos, 60, "flower to show the finished chunk", interval=1)
    flower_text = json.dumps(infos, default=str)
    assert "OperationalError" in flower_text  # Flower saw the retry's error...
    assert MARKER not in flower_text  # ...but neither the URIs it was sent with nor its SQL parameters
    inspected_text = "\n".join(shown)
    assert "<3 URIs>" in inspected_text
    assert MARKER not in inspected_text
    assert MARKER not in worker.log()
    assert MARKER not in flower.log()
