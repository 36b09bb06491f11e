"""The Celery wiring: JSON only, at-least-once delivery, routing, and a worker package that stays light."""

from __future__ import annotations

import json
import subprocess
import sys

from deepcovid.queue import TASK_NAME, make_celery, send_chunk
from deepcovid.settings import Settings
from tests.fixtures.services import REPO_ROOT, service_env


def test_make_celery_configuration() -> None:
    settings = Settings(
        broker_url="amqp://guest:guest@127.0.0.1:5672//",  # type: ignore[arg-type]
        queue="screening",
        visibility_timeout=9000,
        task_soft_time_limit=100,
        task_time_limit=120,
    )
    conf = make_celery(settings).conf
    assert conf.broker_url == "amqp://guest:guest@127.0.0.1:5672//"
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_ignore_result is True and not conf.result_backend
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 9000
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (100, 120)
    assert conf.task_default_queue == "screening"
    assert [q.name for q in conf.task_queues] == ["screening"]
    assert conf.task_routes[TASK_NAME]["queue"] == "screening"
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is False
    assert conf.broker_connection_retry_on_startup is True


def test_defaults_use_local_redis_and_the_deepcovid_queue(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name in ("DEEPCOVID_BROKER_URL", "DEEPCOVID_QUEUE"):
        monkeypatch.delenv(name, raising=False)
    conf = make_celery(Settings(_env_file=None)).conf  # type: ignore[call-arg]
    assert conf.broker_url == "redis://127.0.0.1:6379/0"
    assert conf.task_default_queue == "deepcovid"


def test_send_chunk_message_is_json_and_hides_uris(redis_url: str) -> None:
    """Send through a real Redis and read the raw message back: JSON body, URIs not in argsrepr."""
    import uuid

    from kombu import Connection

    queue = f"test-send-{uuid.uuid4().hex[:8]}"
    app = make_celery(Settings(broker_url=redis_url, queue=queue))  # type: ignore[arg-type]
    try:
        send_chunk(app, 7, "bundle-x", ["/archive/Doe_John.png", "s3://b/k.dcm"])
        with Connection(redis_url) as conn:
            message = conn.SimpleQueue(queue).get(timeout=5)
            assert message.content_type == "application/json"
            assert message.headers["task"] == TASK_NAME
            args, kwargs, _embed = json.loads(message.body)
            assert kwargs == {
                "job_id": 7,
                "bundle_id": "bundle-x",
                "uris": ["/archive/Doe_John.png", "s3://b/k.dcm"],
            }
            assert "Doe_John" not in message.headers["kwargsrepr"]
            assert "2 URIs" in message.headers["kwargsrepr"]
            message.ack()
    finally:
        app.close()


def test_importing_the_worker_package_does_not_import_torch() -> None:
    code = (
        "import sys, worker, worker.tasks, deepcovid.queue;"
        "names = sorted(t for t in worker.app.tasks if 'deepcovid' in t);"
        "print(worker.app.main, 'torch' in sys.modules, names)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["deepcovid", "False", "['deepcovid.score_chunk']"]
