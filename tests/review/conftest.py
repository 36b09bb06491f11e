"""Fixtures for the review workbench: a job of synthetic images scored in the database, accounts, and a
signed-in test client (real FastAPI app, real database on SQLite and PostgreSQL, real files on disk)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deepcovid.networks import ARCHITECTURES
from deepcovid.results import ImageResult
from tests.fixtures.images import dicom_bytes
from training.synthetic import xray_png_bytes

PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
# name -> (ensemble score, disagreement); "chest.dcm" is a DICOM with a window and a patient name.
SCORES = {
    "a.png": (0.95, 0.10),
    "b.png": (0.81, 0.40),
    "c.png": (0.62, 0.05),
    "d.png": (0.49, 0.30),
    "e.png": (0.30, 0.20),
    "f.png": (0.05, 0.01),
    "chest.dcm": (0.77, 0.15),
}
BROKEN = "broken.png"
THRESHOLD = 0.5


@dataclass
class Seeded:
    """A job over files in ``archive``, scored with ``bundle_id``; ``ids`` maps file name to image id."""

    engine: Any
    archive: Path
    job_id: int
    bundle_id: str
    ids: dict[str, int]


def scored(uri: str, score: float, spread: float, info: dict[str, Any] | None = None) -> ImageResult:
    probs = {
        arch: min(1.0, max(0.0, score + spread * (i - 1.5) / 1.5)) for i, arch in enumerate(ARCHITECTURES)
    }
    return ImageResult(
        uri=uri,
        status="scored",
        probabilities=probs,
        decisions={arch: p >= THRESHOLD for arch, p in probs.items()},
        ensemble_score=score,
        ensemble_decision=score >= THRESHOLD,
        disagreement=spread,
        thresholds={**{arch: THRESHOLD for arch in ARCHITECTURES}, "ensemble": THRESHOLD},
        info=info or {},
        size=100,
    )


def seed_job(
    engine: Any, archive: Path, bundle_id: str, scores: dict[str, tuple[float, float]] = SCORES
) -> Seeded:
    from db.jobs import create_job
    from db.registry import register_bundle
    from db.rows import ImageRef
    from db.writes import register_images, write_results

    archive.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (name, (score, spread)) in enumerate(scores.items()):
        path = archive / name
        info = None
        if name.endswith(".dcm"):
            path.write_bytes(dicom_bytes(size=(320, 256), window=(2000, 3000)))
            info = {"dicom": {"ViewPosition": "PA", "StudyDate": "20260315", "StudyInstanceUID": "1.2.3.4"}}
        else:
            path.write_bytes(xray_png_bytes(size=(320, 256), opacity=score >= THRESHOLD, seed=i))
        results.append(scored(str(path), score, spread, info))
    (archive / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    results.append(ImageResult.failed(str(archive / BROKEN), "corrupt", "cannot decode"))
    register_bundle(engine, bundle_id=bundle_id, manifest={}, path="")
    job_id = create_job(engine, source=str(archive), bundle_id=bundle_id)
    register_images(engine, job_id, bundle_id, [ImageRef(uri=r.uri) for r in results])
    write_results(
        engine, job_id=job_id, bundle_id=bundle_id, results=results, worker_host="test", device="cpu"
    )
    import sqlalchemy as sa

    from db.tables import images

    with engine.connect() as conn:
        ids = {Path(uri).name: id_ for id_, uri in conn.execute(sa.select(images.c.id, images.c.uri))}
    return Seeded(engine, archive, job_id, bundle_id, ids)


@pytest.fixture
def installed_bundle(tiny_bundle_path: Path, tmp_path: Path) -> tuple[Path, str]:
    from deepcovid.bundle import install_bundle, load_bundle

    bundles_dir = tmp_path / "bundles"
    return bundles_dir, load_bundle(install_bundle(tiny_bundle_path, bundles_dir)).bundle_id


@pytest.fixture
def review_settings(
    configured_database: Any,
    tmp_path: Path,
    installed_bundle: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    from deepcovid.settings import get_settings

    archive = tmp_path / "archive"
    archive.mkdir()
    monkeypatch.setenv("DEEPCOVID_STORAGE_ROOTS", str(archive))
    monkeypatch.setenv("DEEPCOVID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEEPCOVID_BUNDLES_DIR", str(installed_bundle[0]))
    monkeypatch.delenv("DEEPCOVID_SECRET_KEY", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def seeded(review_settings: Any, configured_database: Any, installed_bundle: tuple[Path, str]) -> Seeded:
    from deepcovid.status import Role
    from review.accounts import add_user

    seeded = seed_job(configured_database, review_settings.storage_roots[0], installed_bundle[1])
    add_user(configured_database, "ada", PASSWORD, Role.admin)
    add_user(configured_database, "rex", PASSWORD, Role.reviewer)
    add_user(configured_database, "bea", PASSWORD, Role.reviewer)
    return seeded


@pytest.fixture
def make_client(review_settings: Any, seeded: Seeded) -> Callable[..., Any]:
    from fastapi.testclient import TestClient

    from review.app import create_app

    app = create_app(review_settings, seeded.engine)

    def make(user: str | None = None) -> Any:
        client = TestClient(app, follow_redirects=False)
        if user is not None:
            sign_in(client, user)
        return client

    return make


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def sign_in(client: Any, user: str, password: str = PASSWORD) -> Any:
    token = csrf_of(client.get("/login").text)
    response = client.post(
        "/login", data={"username": user, "password": password, "csrf": token, "next": "/"}
    )
    assert response.status_code == 303, response.text
    return response
