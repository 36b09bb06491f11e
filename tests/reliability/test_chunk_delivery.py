"""Chunk delivery with real workers: no chunk is dropped, a bad message is refused, no send shows a URI.

- The soft time limit fires in the mode the README recommends for GPUs (prefork, ``-c 1``); the
  unfinished images are re-sent and every image ends scored or failed (``timed_out``).
- Malformed or foreign task messages are rejected: not retried, no row written, logged without URIs.
- A chunk retried during a database outage shows ``<N URIs>`` in Flower and the DEBUG worker log.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.fixtures.faults import (
    ReliabilityStack,
    image_states,
    job_state,
    prediction_counts,
    register_job,
    send_chunks,
    start_fault_worker,
    wait_for_job,
)
from tests.fixtures.images import png_bytes, xray_png_bytes
from tests.fixtures.services import spawn_worker, wait_for, wait_worker_ready

pytestmark = [pytest.mark.timeout(300)]

SENTINEL = "QZXSENTINEL^PATIENT"


def test_soft_time_limit_in_the_recommended_gpu_mode_loses_no_image(
    reliability_stack: ReliabilityStack, tmp_path: Path
) -> None:
    """README: one prefork process per GPU (``--pool prefork -c 1``). Run that way on CPU with a 3 s soft
    limit and one chunk of 128 images at 2048x2048 (decoding alone takes about 4 s on an idle core): the
    limit fires, what was scored is committed, the rest is re-sent in smaller chunks, and the job finishes
    with every image scored or failed as timed_out."""
    stack = reliability_stack
    folder = stack.archive / f"time-limit-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    data = png_bytes(size=(2048, 2048), seed=1)
    uris = []
    for i in range(128):
        (folder / f"{i:03d}.png").write_bytes(data)
        uris.append(str(folder / f"{i:03d}.png"))
    queue = f"time-limit-{uuid.uuid4().hex[:8]}"
    env = stack.env | {
        "DEEPCOVID_QUEUE": queue,
        "DEEPCOVID_TASK_SOFT_TIME_LIMIT": "3",
        "DEEPCOVID_TASK_TIME_LIMIT": "30",
        "DEEPCOVID_DECODE_THREADS": "1",
    }
    worker = start_fault_worker(env, tmp_path / "worker.log", pool="prefork", concurrency=1)
    try:
        job_id = register_job(stack.engine, stack.bundle_id, uris)
        send_chunks(stack.broker_url, queue, job_id, stack.bundle_id, uris, size=len(uris))
        final = wait_for_job(stack.engine, job_id, uris, [worker], timeout=240)
    finally:
        worker.stop()
    log = worker.log()
    assert "Soft time limit (3s) exceeded" in log
    assert "re-sent in" in log
    assert set(final.values()) <= {("scored", None), ("failed", "timed_out")}
    scored = [u for u, (state, _) in final.items() if state == "scored"]
    assert scored, "nothing scored: the committed part of the chunk was lost"
    assert prediction_counts(stack.engine, stack.bundle_id, scored) == dict.fromkeys(scored, 1)
    assert job_state(stack.engine, job_id) == "finished"
    shutil.rmtree(folder)


def count_images(engine: Any) -> int:
    from db.models import Image

    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(Image)).scalar_one())


def send_raw(stack: ReliabilityStack, kwargs: dict[str, Any]) -> str:
    from deepcovid.queue import TASK_NAME, make_celery
    from deepcovid.settings import Settings

    app = make_celery(Settings(broker_url=stack.broker_url, queue=stack.queue))  # type: ignore[arg-type]
    try:
        return str(app.send_task(TASK_NAME, kwargs=kwargs, argsrepr="()", kwargsrepr="{}").id)
    finally:
        app.close()


def test_invalid_messages_are_rejected_without_rows_or_retries(reliability_stack: ReliabilityStack) -> None:
    stack = reliability_stack
    folder = stack.archive / f"valid-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "a.png").write_bytes(xray_png_bytes(64, seed=3))
    uri = str(folder / "a.png")
    finished_job = register_job(stack.engine, stack.bundle_id, [uri])
    send_chunks(stack.broker_url, stack.queue, finished_job, stack.bundle_id, [uri], size=1)
    wait_for_job(stack.engine, finished_job, [uri], [stack.worker])
    running_job = register_job(stack.engine, stack.bundle_id, [str(folder / "b.png")])
    secret = str(stack.archive / SENTINEL / "x.png")

    bad = {
        "a string, not a list, in a finished job": {
            "job_id": finished_job, "bundle_id": stack.bundle_id, "uris": "/etc"},
        "a job that does not exist": {"job_id": 987654321, "bundle_id": stack.bundle_id, "uris": [secret]},
        "a malformed bundle id": {"job_id": running_job, "bundle_id": "../../etc", "uris": [secret]},
        "an empty URI": {"job_id": running_job, "bundle_id": stack.bundle_id, "uris": [""]},
        "too many URIs": {"job_id": running_job, "bundle_id": stack.bundle_id, "uris": [secret] * 1025},
        "a non-string URI": {"job_id": running_job, "bundle_id": stack.bundle_id, "uris": [7]},
        "an unknown argument": {
            "job_id": running_job, "bundle_id": stack.bundle_id, "uris": [secret], "x": 1},
    }  # fmt: skip
    images_before = count_images(stack.engine)
    rejected_before = stack.worker.log().count("rejected task")
    ids = [send_raw(stack, kwargs) for kwargs in bad.values()]
    wait_for(
        lambda: stack.worker.log().count("rejected task") >= rejected_before + len(bad),
        60,
        "the worker to reject every bad message",
    )
    time.sleep(1)
    log = stack.worker.log()
    for task_id in ids:
        assert f"rejected task {task_id}" in log
        assert "Retry in" not in "".join(line for line in log.splitlines() if task_id in line)
    assert count_images(stack.engine) == images_before
    assert image_states(stack.engine, ["/", "e", "t", "c"]) == {}
    assert job_state(stack.engine, finished_job) == "finished"
    assert SENTINEL not in log
    shutil.rmtree(folder)


def test_retried_chunk_shows_no_uri_in_flower_or_the_debug_log(
    reliability_stack: ReliabilityStack, start_flower: Any, tmp_path: Path
) -> None:
    """A patient-named path through four stages — first send, a retry while PostgreSQL is down, a
    failure, a requeue — never shows in Flower's task list and task info, the DEBUG worker log or
    Flower's log; every send of the chunk shows ``<N URIs>``."""
    import requests

    from deepcovid.settings import Settings
    from producer.requeue import requeue

    stack = reliability_stack
    folder = stack.archive / SENTINEL / uuid.uuid4().hex[:6]
    folder.mkdir(parents=True)
    uris = []
    for i in range(2):
        (folder / f"{i}.png").write_bytes(xray_png_bytes(64, seed=40 + i))
        uris.append(str(folder / f"{i}.png"))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # fails as corrupt
    uris.append(str(folder / "broken.png"))
    job_id = register_job(stack.engine, stack.bundle_id, uris)
    env = stack.env | {"DEEPCOVID_QUEUE": f"retry-{uuid.uuid4().hex[:8]}"}
    flower, base = start_flower(env, basic_auth="ops:s3cret")
    auth = ("ops", "s3cret")
    # A DEBUG worker with task events on, for Flower (the stack's shared worker sends none).
    worker = spawn_worker(env, tmp_path / "worker-events.log", loglevel="DEBUG", events=True)
    try:
        wait_worker_ready(worker)
        stack.postgres.stop("fast")
        try:
            send_chunks(stack.broker_url, env["DEEPCOVID_QUEUE"], job_id, stack.bundle_id, uris, size=3)
            wait_for(lambda: worker.log().count("retrying the chunk") >= 2, 90, "two retries of the chunk")
        finally:
            stack.postgres.start()
        final = wait_for_job(stack.engine, job_id, uris, [worker], timeout=120)
        assert final[uris[-1]][0] == "failed"
        sent = requeue(job_id, failed=True, settings=Settings(**_settings_of(env)))
        assert sent.images == 1
        wait_for(lambda: worker.log().count("succeeded") >= 2, 90, "the requeued chunk to be scored")

        def retried_in_flower() -> dict[str, Any] | None:
            tasks = requests.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
            mine = {k: v for k, v in tasks.items() if f"'job_id': {job_id}," in str(v.get("kwargs"))}
            done = mine and all(v.get("state") == "SUCCESS" for v in mine.values())
            return mine if done and any(v.get("retries") for v in mine.values()) else None

        shown = wait_for(retried_in_flower, 60, "flower to show the retried chunk succeeded", interval=1)
    finally:
        worker.stop()
    assert isinstance(shown, dict)
    for task_id, task in shown.items():
        assert "<3 URIs>" in str(task["kwargs"]) or "<1 URIs>" in str(task["kwargs"])  # first send, requeue
        info = requests.get(f"{base}/api/task/info/{task_id}", auth=auth, timeout=10)
        assert info.ok and SENTINEL not in info.text
    listing = requests.get(f"{base}/api/tasks", auth=auth, timeout=10).text
    assert SENTINEL not in listing
    assert SENTINEL not in worker.log()
    assert SENTINEL not in flower.log()


def _settings_of(env: dict[str, str]) -> dict[str, str]:
    """The DEEPCOVID_* variables of a test environment as Settings keyword arguments."""
    return {k.removeprefix("DEEPCOVID_").lower(): v for k, v in env.items() if k.startswith("DEEPCOVID_")}
