"""Several processes writing at once (Celery prefork workers, a producer) never fail on locks."""

from __future__ import annotations

import multiprocessing
import traceback

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.engine import make_engine
from db.jobs import create_job
from db.models import JobImage, Prediction
from db.rows import ImageRef
from db.writes import record_attempts, register_images, write_results
from deepcovid.results import ImageResult
from deepcovid.status import ImageStatus

PROCESSES = 4
CHUNKS = 12
CHUNK = 50


def _worker(url: str, job_id: int, index: int, errors: multiprocessing.Queue) -> None:
    try:
        engine = make_engine(url)  # the parent's cached engine, made safe after fork
        for chunk in range(CHUNKS):
            uris = [f"/archive/{index}/{chunk}/{i}.png" for i in range(CHUNK)]
            if index == 0:  # one process plays the producer, registering while the others score
                register_images(
                    engine, job_id, "b1", [ImageRef(uri=f"/late/{chunk}/{i}") for i in range(500)]
                )
            register_images(engine, job_id, "b1", [ImageRef(uri=uri) for uri in uris])
            assert record_attempts(engine, job_id, uris) == dict.fromkeys(uris, 1)
            results = [
                ImageResult(
                    uri=uri,
                    status="scored",
                    probabilities={"resnet18": 0.4},
                    decisions={"resnet18": False},
                    ensemble_score=0.4,
                    ensemble_decision=False,
                    disagreement=0.0,
                    thresholds={"resnet18": 0.5},
                )
                for uri in uris
            ]
            write_results(
                engine, job_id=job_id, bundle_id="b1", results=results, worker_host=f"p{index}", device="cpu"
            )
            # Redelivery of the same chunk: must be absorbed by the upsert.
            write_results(
                engine, job_id=job_id, bundle_id="b1", results=results, worker_host=f"p{index}", device="cpu"
            )
    except BaseException:
        errors.put(f"process {index}: {traceback.format_exc()}")
        raise


def test_concurrent_writers(migrated_url: str, migrated_engine: Engine) -> None:
    job = create_job(migrated_engine, source="/archive", bundle_id="b1")
    with migrated_engine.connect() as conn:  # leave a pooled connection in the parent before forking
        conn.execute(sa.text("SELECT 1"))
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    processes = [
        context.Process(target=_worker, args=(migrated_url, job, i, errors)) for i in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
    assert [p.exitcode for p in processes] == [0] * PROCESSES

    with migrated_engine.connect() as conn:  # the parent's engine still works after the forks
        predictions = conn.execute(sa.select(sa.func.count()).select_from(Prediction.__table__)).scalar_one()
        states = dict(
            conn.execute(
                sa.select(JobImage.__table__.c.state, sa.func.count()).group_by(JobImage.__table__.c.state)
            ).all()
        )
        attempts = conn.execute(sa.select(sa.func.max(JobImage.__table__.c.attempts))).scalar_one()
    assert predictions == PROCESSES * CHUNKS * CHUNK
    assert states[ImageStatus.scored] == PROCESSES * CHUNKS * CHUNK
    assert states[ImageStatus.queued] == CHUNKS * 500
    assert attempts == 1
