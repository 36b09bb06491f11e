"""The Celery wiring shared by the producer (which only sends) and the worker (which scores).

The producer sends tasks by name so it never imports torch or the worker's task module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from celery import Celery, Task
from kombu import Queue

from deepcovid.settings import Settings, get_settings

if TYPE_CHECKING:
    from celery.result import AsyncResult

TASK_NAME = "deepcovid.score_chunk"


class ChunkTask(Task):
    """The app's task class: its requests show ``<N URIs>``, never the URIs (celery inspect, Flower)."""

    Request = "deepcovid.taskview:SafeRequest"


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured for at-least-once chunk delivery with JSON messages only.

    Results go to the SQL database, never to a Celery result backend; a chunk is acknowledged only
    after its results are written, so a worker that dies mid-chunk gives the chunk back.
    """
    settings = settings or get_settings()

    app = Celery("deepcovid", task_cls=ChunkTask)
    app.conf.update(
        broker_url=settings.broker_url.get_secret_value(),
        broker_connection_retry_on_startup=True,
        # Messages are data, never code: pickle is refused.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        # At-least-once: ack after the results are committed; a killed worker's chunk is redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A chunk killed at the hard time limit goes back to the queue (and is then scored one image at
        # a time) instead of being acknowledged with its images still queued.
        task_acks_on_timeout=False,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Redis redelivers an unacknowledged message after this long: keep it far above a chunk's runtime.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue, routing_key=settings.queue)],
        task_routes={TASK_NAME: {"queue": settings.queue, "routing_key": settings.queue}},
        # Flower shows tasks from the workers' events (received, started, succeeded...). A "task-sent" event
        # from the producer would be a second Redis publish per chunk, a quarter of enqueue's CPU cost.
        worker_send_task_events=True,
        task_send_sent_event=False,
        timezone="UTC",
    )
    return app


def chunk_reprs(job_id: object, bundle_id: object, uris: object) -> dict[str, str]:
    """What logs, Flower and events show instead of a chunk's arguments: URIs may hold patient names.

    Every send of a chunk (first send, retry, re-chunking) passes these as ``argsrepr``/``kwargsrepr``.
    """
    count = len(uris) if isinstance(uris, list | tuple) else "?"
    job = job_id if isinstance(job_id, int) else str(job_id)[:40]
    shown = {"job_id": job, "bundle_id": str(bundle_id)[:80], "uris": f"<{count} URIs>"}
    return {"argsrepr": "()", "kwargsrepr": repr(shown)}


def send_chunk(app: Celery, job_id: int, bundle_id: str, uris: Iterable[str]) -> AsyncResult:
    """Enqueue one chunk of URIs for scoring by name (the producer never imports the task)."""
    uri_list = [str(u) for u in uris]
    return app.send_task(
        TASK_NAME,
        kwargs={"job_id": int(job_id), "bundle_id": str(bundle_id), "uris": uri_list},
        **chunk_reprs(job_id, bundle_id, uri_list),
    )
