"""Security guarantees, checked against a real worker: storage roots, JSON-only messages, verified bundles,
no patient identity in logs or the database, and a locked-down docker-compose deployment.

The plain "pickle content type is refused" case is in tests/worker/test_worker_integration.py; here a
pickle that would run code proves that nothing is unpickled.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.faults import (
    ReliabilityStack,
    image_states,
    prediction_counts,
    register_job,
    send_chunks,
    total_predictions,
    wait_for_job,
)
from tests.fixtures.images import PATIENT_ID, PATIENT_NAME, dicom_bytes, xray_png_bytes
from tests.fixtures.services import REPO_ROOT, wait_for

pytestmark = [pytest.mark.timeout(180)]

# Identity planted in the DICOMs below, in every spelling a log line or a column could carry it.
NAME = "Zzyzx^Quentin"
MRN = "MRN-77331-XQ"
BIRTH_DATE = "19700101"
IDENTITY = ("Zzyzx", "Quentin", MRN, PATIENT_ID, PATIENT_NAME, PATIENT_NAME.replace("^", " "), BIRTH_DATE)


# --------------------------------------------------------------------------------------------------
# Storage roots


class ReaderDetector(threading.Thread):
    """Blocks in open(fifo, O_WRONLY), which returns only once some process opens the FIFO to read it."""

    def __init__(self, fifo: Path) -> None:
        super().__init__(daemon=True)
        self.fifo = fifo
        self.finishing = False
        self.opened_by_someone_else = False

    def run(self) -> None:
        fd = os.open(self.fifo, os.O_WRONLY)
        self.opened_by_someone_else = not self.finishing
        os.close(fd)

    def finish(self) -> None:
        self.finishing = True
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)  # unblocks run()
        self.join(10)
        os.close(fd)


@pytest.mark.slow
def test_paths_outside_the_storage_roots_are_never_opened(reliability_stack: ReliabilityStack) -> None:
    stack = reliability_stack
    outside = stack.archive.parent / "fifo-outside"
    outside.mkdir()
    fifo = outside / "secret.png"
    os.mkfifo(fifo)
    inside = stack.archive / "roots"
    inside.mkdir()
    (inside / "link.png").symlink_to(fifo)
    (inside / "ok.png").write_bytes(xray_png_bytes(64))
    refused = [
        str(fifo),  # absolute path outside
        str(inside / "link.png"),  # symlink inside pointing outside
        f"{stack.archive}/../fifo-outside/secret.png",  # .. escape
        "/etc/passwd",
        "relative/path.png",
    ]
    detector = ReaderDetector(fifo)
    detector.start()
    uris = [str(inside / "ok.png"), *refused]
    job_id = register_job(stack.engine, stack.bundle_id, uris)
    send_chunks(stack.broker_url, stack.queue, job_id, stack.bundle_id, uris, size=len(uris))
    final = wait_for_job(stack.engine, job_id, uris, [stack.worker], timeout=90)
    detector.finish()

    assert final[str(inside / "ok.png")] == ("scored", None)
    assert {u: final[u] for u in refused} == dict.fromkeys(refused, ("failed", "outside_storage_root"))
    assert not detector.opened_by_someone_else, "a path outside the storage roots was opened"
    assert "root:x:0:0" not in stack.worker.log()


# --------------------------------------------------------------------------------------------------
# Messages


class _RunsCode:
    """Unpickling this runs a shell command: what a pickle message from an attacker would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_pickle_message_runs_no_code(reliability_stack: ReliabilityStack, tmp_path: Path) -> None:
    from kombu import Connection, Exchange, Producer, Queue

    stack = reliability_stack
    marker = tmp_path / "pwned"
    uri = str(stack.archive / "pickled.png")
    Path(uri).write_bytes(xray_png_bytes(64))
    job_id = register_job(stack.engine, stack.bundle_id, [uri])
    body = ((), {"job_id": job_id, "bundle_id": stack.bundle_id, "uris": [uri], "x": _RunsCode(marker)}, {})
    before = stack.worker.log().count("Refusing to deserialize")
    with Connection(stack.broker_url) as conn:
        Producer(conn.channel()).publish(
            body,
            serializer="pickle",
            exchange=Exchange(""),
            routing_key=stack.queue,
            declare=[Queue(stack.queue)],
            headers={"task": "deepcovid.score_chunk", "id": str(uuid.uuid4()), "lang": "py"},
        )
    wait_for(
        lambda: stack.worker.log().count("Refusing to deserialize") > before,
        60,
        "the worker to refuse the pickle",
    )
    time.sleep(1)
    assert not marker.exists(), "the pickle was deserialized: it ran code in the worker"
    assert image_states(stack.engine, [uri])[uri] == ("queued", None)
    assert stack.worker.alive()


# --------------------------------------------------------------------------------------------------
# Bundles


def refusals(log: str) -> int:
    """How many times the worker refused a chunk because its bundle failed verification."""
    return sum("bundle_unusable" in line and "has been modified" in line for line in log.splitlines())


@pytest.mark.slow
def test_tampered_bundle_is_refused_until_repaired(
    reliability_stack: ReliabilityStack, tmp_path: Path
) -> None:
    """One byte changed in an installed bundle: nothing is scored with it, the log says why, the images
    fail as ``bundle_unusable`` without retries, and are scored once the bundle is reinstalled and they
    are requeued."""
    import torch

    from deepcovid.bundle import install_bundle, save_bundle
    from deepcovid.networks import build_network
    from producer.requeue import requeue

    stack = reliability_stack
    torch.manual_seed(7)
    bundle = save_bundle(tmp_path / "other", {"squeezenet1_1": build_network("squeezenet1_1", "none")})
    installed = install_bundle(bundle, stack.bundles_dir)
    weights = installed / "squeezenet1_1.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    folder = stack.archive / "tampered"
    folder.mkdir()
    uris = []
    for i in range(2):
        (folder / f"{i}.png").write_bytes(xray_png_bytes(64, seed=30 + i))
        uris.append(str(folder / f"{i}.png"))
    refused_before = refusals(stack.worker.log())
    retries_before = stack.worker.log().count("retrying the chunk")
    job_id = register_job(stack.engine, bundle.bundle_id, uris)
    send_chunks(stack.broker_url, stack.queue, job_id, bundle.bundle_id, uris, size=2)
    failed = wait_for_job(stack.engine, job_id, uris, [stack.worker], timeout=90)
    assert failed == dict.fromkeys(uris, ("failed", "bundle_unusable"))
    assert refusals(stack.worker.log()) == refused_before + 1
    assert stack.worker.log().count("retrying the chunk") == retries_before
    assert total_predictions(stack.engine, bundle.bundle_id) == 0

    install_bundle(bundle, stack.bundles_dir)  # replaces the copy that no longer verifies
    assert requeue(job_id, failed=True, reason="bundle_unusable", settings=stack.settings()).images == 2
    final = wait_for_job(stack.engine, job_id, uris, [stack.worker], timeout=90)
    assert final == dict.fromkeys(uris, ("scored", None))
    assert prediction_counts(stack.engine, bundle.bundle_id, uris) == dict.fromkeys(uris, 1)


# --------------------------------------------------------------------------------------------------
# Patient identity


def identity_dicoms(folder: Path) -> list[str]:
    """DICOMs carrying a patient name, ID and birth date, scored and failing in every way."""
    folder.mkdir(parents=True, exist_ok=True)
    who = {"patient_name": NAME, "patient_id": MRN}
    good = dicom_bytes(size=64, **who)
    variants = {
        "a.dcm": good,
        "b.dcm": dicom_bytes(photometric="MONOCHROME1", window=(2000, 1000), size=64, **who),
        "c.dcm": dicom_bytes(frames=2, size=32, **who),
        "d.dcm": dicom_bytes(with_pixels=False, **who),
        "e.dcm": dicom_bytes(modality="CT", size=32, **who),
        "f.dcm": dicom_bytes(modality=None, size=32, **who),
        "g.dcm": good[: len(good) - 500],
        "h.dcm": dicom_bytes(size=64),  # the fixtures' default identity
    }
    for name, data in variants.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in variants]


def leaked(text: str) -> list[str]:
    return [value for value in IDENTITY if value in text]


def pg_dump(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    result = subprocess.run(
        ["pg_dump", "--no-owner", "-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432),
         "-U", parsed.username or "postgres", parsed.database or "postgres"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_no_patient_identity_in_logs_or_database(
    reliability_stack: ReliabilityStack,
    tmp_path: Path,
    tiny_bundle_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deepcovid.settings import Settings
    from producer.screen import screen

    stack = reliability_stack
    # Through a worker logging at DEBUG.
    uris = identity_dicoms(stack.archive / "identity")
    job_id = register_job(stack.engine, stack.bundle_id, uris)
    send_chunks(stack.broker_url, stack.queue, job_id, stack.bundle_id, uris, size=4)
    final = wait_for_job(stack.engine, job_id, uris, [stack.worker], timeout=90)
    assert final[uris[0]] == ("scored", None) and final[uris[2]] == ("failed", "unsupported_dicom")
    assert "DEBUG" in stack.worker.log()
    assert leaked(stack.worker.log()) == []
    dump = pg_dump(stack.database_url)
    assert "COPY public.predictions" in dump and uris[0] in dump
    assert leaked(dump) == []

    # Through the embedded screen, every logger at DEBUG.
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("DEEPCOVID_STORAGE_ROOTS", raising=False)
    settings = Settings(data_dir=tmp_path / "data", bundles_dir=tmp_path / "bundles", device="cpu")
    folder = tmp_path / "screened"
    identity_dicoms(folder)
    summary = screen(str(folder), settings=settings, bundle=str(tiny_bundle_path))
    assert summary.scored >= 2 and sum(summary.failed.values()) >= 4
    captured = capfd.readouterr()
    assert any(record.levelno == logging.DEBUG for record in caplog.records)
    assert leaked(caplog.text) == []
    assert leaked(captured.out + captured.err) == []
    database = settings.effective_database_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as conn:
        sqlite_dump = "\n".join(conn.iterdump())
    assert 'INSERT INTO "predictions"' in sqlite_dump
    assert leaked(sqlite_dump) == []


# --------------------------------------------------------------------------------------------------
# Deployment


def test_compose_deployment_is_locked_down() -> None:
    import yaml

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services: dict[str, dict[str, Any]] = compose["services"]

    # Flower's login comes from its environment (FLOWER_BASIC_AUTH), never from the command line.
    flower = services["flower"]
    auth = str((flower.get("environment") or {}).get("FLOWER_BASIC_AUTH", ""))
    assert auth.startswith("${FLOWER_BASIC_AUTH:?"), "Flower must require FLOWER_BASIC_AUTH=user:password"

    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        assert not service.get("privileged"), f"{name} runs privileged"
        for volume in service.get("volumes", []):
            if ":/archive" in str(volume):
                assert str(volume).endswith(":ro"), f"{name} mounts the archive writable: {volume}"
        env = service.get("environment") or {}
        if isinstance(env, dict) and "DEEPCOVID_STORAGE_ROOTS" in env:
            assert env["DEEPCOVID_STORAGE_ROOTS"] == "/archive"

    # Every service that reads images mounts the archive read-only.
    for name in ("worker", "worker-cpu", "producer"):
        assert any(str(v).endswith("/archive:ro") for v in services[name]["volumes"]), name
    # The broker persists messages, so a Redis restart loses no queued chunk (see docs/operations.md).
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    # Workers get time to finish the chunk in hand on `docker compose stop` (warm shutdown).
    for name in ("worker", "worker-cpu"):
        assert services[name].get("stop_grace_period"), name
    assert "ports" not in services["redis"] and "ports" not in services["postgres"]
