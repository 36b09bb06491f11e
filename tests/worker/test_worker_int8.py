"""Real celery workers scoring with a bundle that carries int8 networks: with the optional engine and
without it (hidden from the worker's interpreter, as where ``deepcovid[openvino]`` is not installed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from db.models import Prediction
from tests.fixtures.services import REPO_ROOT, ServiceProcess
from tests.worker.test_worker_integration import register, send, wait_until_done, worker_env, write_images

__all__ = ["worker_env"]  # the fixture, imported for these tests

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def int8_bundle_id(int8_bundle_path: Path, bundles_dir: Path) -> str:
    from deepcovid.bundle import install_bundle, load_bundle

    bundle = load_bundle(int8_bundle_path)
    install_bundle(bundle, bundles_dir)
    return bundle.bundle_id


def _devices(engine: Any) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(Prediction.device)).scalars())


def _score(start_worker, env, engine, archive: Path, bundle_id: str) -> ServiceProcess:
    uris = write_images(archive, 3, size=128)
    job_id = register(engine, bundle_id, uris)
    worker = start_worker(env)
    send(env["DEEPCOVID_BROKER_URL"], env["DEEPCOVID_QUEUE"], job_id, bundle_id, uris)
    final = wait_until_done(engine, uris, [worker])
    assert set(final.values()) == {("scored", None)}
    return worker


def test_a_worker_scores_in_int8_and_records_it(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    int8_bundle_id: str,
) -> None:
    env = worker_env | {"DEEPCOVID_CPU_INT8": "on"}  # random weights: the gate itself is tested elsewhere
    worker = _score(start_worker, env, migrated_engine, archive, int8_bundle_id)
    assert _devices(migrated_engine) == {"cpu int8"}
    assert "scoring in int8" in worker.log()


def test_a_worker_without_the_engine_falls_back_and_says_so(
    start_worker: Callable[..., ServiceProcess],
    worker_env: dict[str, str],
    migrated_engine: Any,
    archive: Path,
    int8_bundle_id: str,
    tmp_path: Path,
) -> None:
    hidden = tmp_path / "no-openvino"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(
        "import sys\nsys.modules['openvino'] = None  # import openvino raises ImportError\n"
    )
    env = worker_env | {"DEEPCOVID_CPU_INT8": "on", "PYTHONPATH": f"{hidden}:{REPO_ROOT}"}
    worker = _score(start_worker, env, migrated_engine, archive, int8_bundle_id)
    assert _devices(migrated_engine) == {"cpu fp32"}
    assert "not scoring in int8: OpenVINO is not installed" in worker.log()
