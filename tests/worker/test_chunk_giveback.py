"""A chunk stopped by the soft time limit or an unexpected error gives its unfinished images back.

In-process against the real PostgreSQL, with the ensemble made to stop on its second batch: what the first
batch scored is committed, the rest is re-sent in two halves (and counted as an attempt), and an image out
of attempts fails as ``timed_out`` / ``internal_error``. The real-worker version is in
tests/reliability/test_chunk_time_limit.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

import worker.tasks as tasks
from tests.fixtures.faults import job_state
from tests.worker.test_chunk_task import make_chunk, postgresql_only, rows, settings_for


class StopsOnBatch:
    """The real ensemble, except that batch number ``stop_at`` (1-based) raises ``error``."""

    def __init__(self, ensemble: Any, stop_at: int, error: BaseException) -> None:
        self._ensemble = ensemble
        self._stop_at = stop_at
        self._error = error
        self.batches = 0

    def score(self, batch: Any, **options: Any) -> Any:
        self.batches += 1
        if self.batches >= self._stop_at:
            raise self._error
        return self._ensemble.score(batch, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ensemble, name)


def stopping_ensemble(monkeypatch: pytest.MonkeyPatch, stop_at: int, error: BaseException) -> None:
    real = tasks._ensemble_for

    def patched(bundle_id: str, settings: Any) -> Any:
        return StopsOnBatch(real(bundle_id, settings), stop_at, error)

    monkeypatch.setattr(tasks, "_ensemble_for", patched)


def failing_second_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second commit of each chunk raises an error that is neither per-image nor transient."""
    real = tasks.write_results
    calls = [0]

    def patched(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] % 2 == 0:
            raise RuntimeError("unexpected")
        real(*args, **kwargs)

    monkeypatch.setattr(tasks, "write_results", patched)


@postgresql_only
@pytest.mark.parametrize(
    ("error", "reason"),
    [("soft_time_limit", "timed_out"), ("unexpected_error", "internal_error")],
)
def test_unfinished_images_are_resent_in_halves_then_failed(
    migrated_engine: Any,
    migrated_url: str,
    tmp_path: Path,
    bundles_dir: Path,
    tiny_bundle_id: str,
    monkeypatch: pytest.MonkeyPatch,
    error: str,
    reason: str,
) -> None:
    root = tmp_path / "archive"
    job_id, uris = make_chunk(migrated_engine, root, tiny_bundle_id, count=6)
    settings = settings_for(migrated_url, root, bundles_dir, max_attempts=2)
    if error == "soft_time_limit":
        stopping_ensemble(monkeypatch, stop_at=2, error=SoftTimeLimitExceeded())
    else:
        failing_second_write(monkeypatch)
    sent: list[list[str]] = []

    summary = tasks.run_chunk(
        job_id, tiny_bundle_id, uris, settings=settings, resend=lambda _msg, part: sent.append(part)
    )
    state = rows(migrated_engine, uris)
    scored = [u for u in uris if state[u][0] == "scored"]
    assert len(scored) == 2, state  # the first batch (batch_size=2) was committed before the stop
    assert all(state[u][3] == 1 for u in scored)
    rest = [u for u in uris if u not in scored]
    assert sorted(sum(sent, [])) == sorted(rest) and [len(p) for p in sent] == [2, 2]
    assert all(state[u] == ("queued", None, 1, 0) for u in rest)  # one attempt counted, still queued
    assert summary["resent"] == 4 and job_state(migrated_engine, job_id) == "running"

    # Each re-sent half is scored one image at a time and stops again: what is unfinished then is out of
    # attempts (DEEPCOVID_MAX_ATTEMPTS=2) and fails with the specific reason; nothing is re-sent.
    for part in list(sent):
        tasks.run_chunk(job_id, tiny_bundle_id, part, settings=settings, resend=lambda _m, p: sent.append(p))
    state = rows(migrated_engine, uris)
    outcomes = [state[u][:2] for u in rest]
    assert set(outcomes) <= {("scored", None), ("failed", reason)} and ("failed", reason) in outcomes, state
    assert len(sent) == 2
    assert job_state(migrated_engine, job_id) == "finished"


@postgresql_only
def test_a_failed_resend_requeues_the_whole_message(
    migrated_engine: Any,
    migrated_url: str,
    tmp_path: Path,
    bundles_dir: Path,
    tiny_bundle_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the unfinished images cannot be re-sent, the task raises Reject(requeue=True): never acked."""
    from celery.exceptions import Reject

    root = tmp_path / "archive"
    job_id, uris = make_chunk(migrated_engine, root, tiny_bundle_id, count=4)
    settings = settings_for(migrated_url, root, bundles_dir)
    stopping_ensemble(monkeypatch, stop_at=1, error=SoftTimeLimitExceeded())

    def broker_down(_msg: Any, _part: list[str]) -> None:
        raise ConnectionError("broker unreachable")

    with pytest.raises(Reject) as caught:
        tasks.run_chunk(job_id, tiny_bundle_id, uris, settings=settings, resend=broker_down)
    assert caught.value.requeue is True
    assert {v[0] for v in rows(migrated_engine, uris).values()} == {"queued"}


@postgresql_only
def test_unusable_bundle_fails_the_images_without_retry(
    migrated_engine: Any,
    migrated_url: str,
    tmp_path: Path,
    bundles_dir: Path,
    tiny_bundle_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A BundleError at load (here: the bundle is not installed on this worker) is not retried."""
    monkeypatch.setattr(tasks, "_ensembles", {})  # no ensemble cached by earlier tests
    root = tmp_path / "archive"
    job_id, uris = make_chunk(migrated_engine, root, tiny_bundle_id, count=2)
    empty = tmp_path / "no-bundles"
    empty.mkdir()
    settings = settings_for(migrated_url, root, empty)
    summary = tasks.run_chunk(job_id, tiny_bundle_id, uris, settings=settings)
    assert summary["failed"] == 2
    assert {v[:2] for v in rows(migrated_engine, uris).values()} == {("failed", "bundle_unusable")}
    assert job_state(migrated_engine, job_id) == "finished"
