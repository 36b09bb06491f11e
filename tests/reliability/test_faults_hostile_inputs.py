"""Hostile inputs screened as one job, through a real worker and through the embedded ``screen`` path.

Every file ends scored or failed with its specific reason; the worker never crashes and the job finishes.
Then ``deepcovid requeue --failed --reason not_found`` re-scores images whose files came back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.faults import (
    ReliabilityStack,
    corpus_uri,
    image_states,
    prediction_counts,
    register_job,
    send_chunks,
    wait_for_job,
    write_hostile_corpus,
)
from tests.fixtures.images import xray_png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CRASH_MARKERS = ("WorkerLostError", "exited with", "raised unexpected", "Process 'ForkPoolWorker")


def failure_details(engine: Any, uris: list[str]) -> dict[str, str | None]:
    import sqlalchemy as sa

    from db.models import Image, JobImage

    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(Image.uri, JobImage.failure_detail)
            .join(JobImage, JobImage.image_id == Image.id)
            .where(Image.uri.in_(uris))
        )
        return dict(rows.all())


def test_hostile_corpus_through_the_worker(reliability_stack: ReliabilityStack) -> None:
    stack = reliability_stack
    # The corpus goes at the top of the storage root: its "outside" sibling must be outside the roots.
    outcomes = write_hostile_corpus(stack.archive)
    uris = {name: corpus_uri(stack.archive, name) for name in outcomes}
    job_id = register_job(stack.engine, stack.bundle_id, list(uris.values()))
    for name, outcome in outcomes.items():
        if outcome.delete_after_enqueue:
            Path(uris[name]).unlink()
    send_chunks(stack.broker_url, stack.queue, job_id, stack.bundle_id, list(uris.values()), size=6)

    final = wait_for_job(stack.engine, job_id, list(uris.values()), [stack.worker], timeout=150)

    got = {name: final[uri] for name, uri in uris.items()}
    expected = {name: (o.state, o.reason) for name, o in outcomes.items()}
    assert got == expected
    scored = [uris[n] for n, o in outcomes.items() if o.state == "scored"]
    assert prediction_counts(stack.engine, stack.bundle_id, list(uris.values())) == dict.fromkeys(scored, 1)
    details = failure_details(stack.engine, list(uris.values()))
    for name, outcome in outcomes.items():
        if outcome.state == "failed":
            assert details[uris[name]], f"{name}: a failure must say why"
    assert stack.worker.alive()
    log = stack.worker.log()
    for marker in CRASH_MARKERS:
        assert marker not in log, f"worker log shows {marker!r}"


def test_hostile_corpus_through_screen(
    tmp_path: Path, tiny_bundle_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded path: listing skips what is not a file; everything listed gets its reason."""
    from db.engine import make_engine
    from deepcovid.settings import Settings
    from producer.screen import screen

    root = tmp_path / "corpus"
    outcomes = write_hostile_corpus(root)
    monkeypatch.delenv("DEEPCOVID_STORAGE_ROOTS", raising=False)
    settings = Settings(
        data_dir=tmp_path / "data",
        bundles_dir=tmp_path / "bundles",
        device="cpu",
        batch_size=4,
        decode_threads=2,
        chunk_size=5,
    )
    deleted = False

    def delete_after_listing(_summary: Any) -> None:
        nonlocal deleted
        for name, outcome in outcomes.items():
            if outcome.delete_after_enqueue and not deleted:
                (root / name).unlink()
        deleted = True

    summary = screen(
        str(root),
        settings=settings,
        bundle=str(tiny_bundle_path),
        include="all",
        on_listed=delete_after_listing,
    )

    listed = {name: o for name, o in outcomes.items() if o.listed}
    assert summary.listed == len(listed)
    engine = make_engine(settings.effective_database_url)
    uris = {name: corpus_uri(root, name) for name in listed}
    final = image_states(engine, list(uris.values()))
    assert {n: final[u] for n, u in uris.items()} == {n: (o.state, o.reason) for n, o in listed.items()}
    assert summary.scored == sum(o.state == "scored" for o in listed.values())
    assert not summary.interrupted


def test_requeue_failed_not_found_after_files_return(reliability_stack: ReliabilityStack) -> None:
    stack = reliability_stack
    folder = stack.archive / "requeue"
    folder.mkdir()
    present = []
    for i in range(3):
        path = folder / f"present_{i}.png"
        path.write_bytes(xray_png_bytes(64, seed=10 + i))
        present.append(str(path))
    missing = [str(folder / f"restored_{i}.png") for i in range(2)]
    (folder / "empty.png").write_bytes(b"")
    empty = str(folder / "empty.png")
    uris = present + missing + [empty]
    job_id = register_job(stack.engine, stack.bundle_id, uris)
    send_chunks(stack.broker_url, stack.queue, job_id, stack.bundle_id, uris, size=3)
    first = wait_for_job(stack.engine, job_id, uris, [stack.worker], timeout=90)
    assert [first[u] for u in missing] == [("failed", "not_found")] * 2
    assert first[empty] == ("failed", "empty_file")

    for i, uri in enumerate(missing):
        Path(uri).write_bytes(xray_png_bytes(64, seed=20 + i))
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "requeue", str(job_id), "--failed", "--reason", "not_found"],
        env=stack.cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "re-queued 2 failed images" in result.stdout

    final = wait_for_job(stack.engine, job_id, uris, [stack.worker], timeout=90)
    assert all(final[u] == ("scored", None) for u in present + missing)
    assert final[empty] == ("failed", "empty_file")  # other reasons are left alone
    assert prediction_counts(stack.engine, stack.bundle_id, uris) == dict.fromkeys(present + missing, 1)
    assert image_states(stack.engine, [empty])[empty] == ("failed", "empty_file")
