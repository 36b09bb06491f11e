"""A worker SIGKILLed in the middle of a chunk, five times during one job: nothing lost, nothing twice.

Two kinds of kill, as production sees them:

- ``child``: the pool process scoring the chunk is SIGKILLed (the kernel's OOM killer, a segfault). The
  worker's main process sees it die and, with ``reject_on_worker_lost``, puts the chunk back at once.
- ``group``: the whole worker (main process and pool) is SIGKILLed (a node lost, ``docker kill``). Nobody
  acknowledges the chunk; Redis gives it to the next worker after the visibility timeout.

Each kill waits until the job has progressed since the previous one and a pool process has started
scoring a chunk (the test hook of ``preload_torch_hook`` logs which process started which chunk).

The crash-loop guard (DEEPCOVID_MAX_ATTEMPTS, tested in tests/worker) is raised here because these kills
come from outside: an innocent image in flight at several kills must not be failed as ``crashed_worker``.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.fixtures.faults import (
    STARTED_LINE,
    ReliabilityStack,
    broker_idle,
    image_states,
    job_state,
    pool_children,
    prediction_counts,
    preload_torch_hook,
    register_job,
    send_chunks,
    start_fault_worker,
    wait_for_job,
)
from tests.fixtures.images import xray_png_bytes
from tests.fixtures.services import ServiceProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

IMAGES = 40
CHUNK = 4
VISIBILITY_TIMEOUT = 2
SCHEDULE = ("child", "group", "child", "child", "child")
TASK_LINE = re.compile(r"deepcovid\.score_chunk\[([0-9a-f-]+)\] (received|succeeded|retry)")


def chunk_in_hand(log: str) -> tuple[str, int] | None:
    """(chunk id, pool process id) of the chunk a pool process is scoring now, from the worker's log."""
    current: tuple[str, int | None] | None = None
    for line in log.splitlines():
        if match := TASK_LINE.search(line):
            task, event = match.groups()
            current = (task, None) if event == "received" else None
        elif match := STARTED_LINE.search(line):
            if current is not None and current[0] == match.group(1):
                current = (current[0], int(match.group(2)))
        elif "WorkerLostError" in line:
            current = None
    if current is None or current[1] is None:
        return None
    return current[0], current[1]


def kill_outcome(worker: ServiceProcess, lost_before: int, task: str) -> str | None:
    """After SIGKILLing the pool process that was scoring ``task``: "lost" once the worker reports the chunk
    lost, "missed" when the chunk had already finished (the log is read a moment before the kill lands),
    None while neither shows yet."""
    log = worker.log()
    if log.count("WorkerLostError(") > lost_before:
        return "lost"
    if f"score_chunk[{task}] succeeded" in log:
        return "missed"
    return None


def find_victim(
    stack: ReliabilityStack, worker: ServiceProcess, after: int, uris: list[str], kills: int
) -> tuple[str, int, int] | None:
    """(chunk id, pool process id, images done) once the job has progressed past ``after`` and a pool
    process of ``worker`` is scoring a chunk; None until then."""
    if not worker.alive():
        pytest.fail(f"the worker exited by itself:\n{worker.log()[-4000:]}")
    done = len(prediction_counts(stack.engine, stack.bundle_id, uris))
    if done >= len(uris):
        pytest.fail(f"the job finished after only {kills} kills: make its chunks slower")
    in_hand = chunk_in_hand(worker.log())
    if done <= after or in_hand is None or in_hand[1] not in pool_children(worker):
        return None
    return in_hand[0], in_hand[1], done


@pytest.fixture
def started_workers() -> Iterator[list[ServiceProcess]]:
    """Workers this test starts; whatever happens, none outlives it."""
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.stop()


def test_worker_sigkilled_five_times_during_one_job(
    reliability_stack: ReliabilityStack, tmp_path: Path, started_workers: list[ServiceProcess]
) -> None:
    stack = reliability_stack
    folder = stack.archive / "kill"
    folder.mkdir()
    uris = []
    for i in range(IMAGES):
        (folder / f"{i:03d}.png").write_bytes(xray_png_bytes(128, seed=i))
        uris.append(str(folder / f"{i:03d}.png"))
    host_port = stack.broker_url.rsplit("/", 1)[0]
    env = stack.env | {
        # A Redis database of its own: the unacknowledged-message hash is per database, and this test's
        # short visibility timeout must not hand the other tests' chunks around.
        "DEEPCOVID_BROKER_URL": f"{host_port}/3",
        "DEEPCOVID_QUEUE": f"kill-{uuid.uuid4().hex[:8]}",
        "DEEPCOVID_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "DEEPCOVID_BATCH_SIZE": "1",
        "DEEPCOVID_DECODE_THREADS": "1",
        "DEEPCOVID_MAX_ATTEMPTS": "10",
        "PYTHONPATH": preload_torch_hook(tmp_path / "hook"),
    }
    starts = iter(range(100))

    def start() -> ServiceProcess:
        service = start_fault_worker(env, tmp_path / f"worker-{next(starts)}.log", wait_ready=False)
        started_workers.append(service)
        return service

    job_id = register_job(stack.engine, stack.bundle_id, uris)
    worker = start()
    retired: list[ServiceProcess] = []
    send_chunks(env["DEEPCOVID_BROKER_URL"], env["DEEPCOVID_QUEUE"], job_id, stack.bundle_id, uris, CHUNK)

    kills: list[tuple[str, str, int]] = []  # (kind, chunk in hand, images done at the kill)
    missed = 0  # child kills that landed just after the chunk finished: not counted, tried again
    done_at_last_kill = 0
    while len(kills) < len(SCHEDULE):
        kind = SCHEDULE[len(kills)]
        find = partial(find_victim, stack, worker, done_at_last_kill, uris, len(kills))
        task, pid, done = wait_for(find, 150, f"a chunk being scored for kill {len(kills) + 1}", 0.05)  # type: ignore[misc]
        if kind == "child":
            lost_before = worker.log().count("WorkerLostError(")
            os.kill(pid, signal.SIGKILL)
            outcome = wait_for(
                partial(kill_outcome, worker, lost_before, task),
                60,
                "the worker to report the killed pool process",
                detail=lambda w=worker: w.log()[-6000:],
            )
            if outcome == "missed":
                missed += 1
                assert missed <= 5, "five kills in a row landed between chunks: make the chunks slower"
                continue
        else:
            worker.kill()
            retired.append(worker)
            # The replacement restores unacknowledged chunks older than the visibility timeout when it
            # starts consuming, after importing torch: seconds later, so the killed chunk is among them.
            worker = start()
        kills.append((kind, task, done))
        done_at_last_kill = done

    try:
        final = wait_for_job(stack.engine, job_id, uris, [worker], timeout=150)
        # A chunk killed after its commit finished nothing new when it came back: wait for it anyway.
        wait_for(
            partial(broker_idle, env["DEEPCOVID_BROKER_URL"], env["DEEPCOVID_QUEUE"]), 60, "an idle queue"
        )
        wait_for(lambda: chunk_in_hand(worker.log()) is None, 30, "the worker to finish its last chunk")
    finally:
        worker.stop()
    logs = "\n".join(w.log() for w in [*retired, worker])

    assert [kind for kind, _, _ in kills] == list(SCHEDULE)
    assert all(done < IMAGES for _, _, done in kills), kills
    assert final == dict.fromkeys(uris, ("scored", None))
    assert prediction_counts(stack.engine, stack.bundle_id, uris) == dict.fromkeys(uris, 1)
    assert job_state(stack.engine, job_id) == "finished"
    for kind, task, _ in kills:
        # The chunk in hand at each kill was delivered again and then finished.
        assert logs.count(f"score_chunk[{task}] received") >= 2, (kind, task)
        assert f"score_chunk[{task}] succeeded" in logs, (kind, task)
    assert logs.count("WorkerLostError") >= SCHEDULE.count("child")
    assert "chunk redelivered after a worker died" in logs
    assert all(state == "scored" for state, _ in image_states(stack.engine, uris).values())
