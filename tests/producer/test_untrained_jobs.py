"""Screening or enqueueing with an untrained bundle (``bundle init``) warns in one line unless
``--allow-untrained``, and the job records it either way; ``jobs`` and ``status`` show it (issue 18)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.fixtures.images import xray_png_bytes

WARNING = "is UNTRAINED (made by `deepcovid bundle init`): its scores are meaningless"


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deepcovid.untrained import init_bundle

    out = tmp_path_factory.mktemp("untrained") / "bundle"
    init_bundle(
        out, pretrained="none", architectures=["squeezenet1_1"], policy="mean", ensemble_threshold=0.5
    )
    return out


@pytest.fixture
def clean_archive(tmp_path: Path) -> Path:
    """Two images that decode: screen exits 0 unless something else is wrong."""
    root = tmp_path / "archive"
    root.mkdir()
    for i in range(2):
        (root / f"img{i}.png").write_bytes(xray_png_bytes(64, seed=i))
    return root


def _options(url: str) -> dict[int, dict]:
    from db.engine import make_engine

    with make_engine(url).connect() as conn:
        rows = conn.execute(sa.text("SELECT id, options FROM scan_jobs ORDER BY id")).all()
    return {job: json.loads(options) if isinstance(options, str) else options for job, options in rows}


def test_is_untrained_reads_the_manifest_kind(untrained_bundle: Path) -> None:
    from deepcovid.bundle import load_bundle
    from deepcovid.untrained import is_untrained

    assert is_untrained(load_bundle(untrained_bundle).manifest)
    assert not is_untrained({"provenance": {"kind": "trained"}})
    assert not is_untrained({}) and not is_untrained(None)


def test_screen_warns_once_and_the_job_records_it(
    run_cli, producer_env, clean_archive: Path, untrained_bundle: Path, tiny_bundle_path: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'deepcovid.db'}"
    result = run_cli("screen", clean_archive, "--bundle", untrained_bundle)
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if WARNING in line]
    assert len(warned) == 1 and "--allow-untrained" in warned[0], result.stderr
    assert _options(url)[1]["untrained"] is True

    # --allow-untrained: quiet, but the job still says what scored it.
    quiet = run_cli("screen", clean_archive, "--rescore", "--allow-untrained")
    assert quiet.exit_code == 0, quiet.output
    assert "UNTRAINED" not in quiet.stderr
    assert _options(url)[2]["untrained"] is True

    # A trained bundle's job carries no such mark.
    trained = run_cli("screen", clean_archive, "--bundle", tiny_bundle_path)
    assert trained.exit_code == 0, trained.output
    assert "UNTRAINED" not in trained.output and "untrained" not in _options(url)[3]

    status = run_cli("status", "1")
    assert status.exit_code == 0 and "(UNTRAINED)" in status.stdout, status.output
    assert "UNTRAINED" not in run_cli("status", "3").stdout
    jobs = run_cli("jobs")
    assert jobs.exit_code == 0 and flat(jobs.stdout).count("UNTRAINED") == 2, jobs.output
    listed = json.loads(run_cli("jobs", "--format", "json").stdout)
    assert {job["job"]: job["untrained"] for job in listed} == {1: True, 2: True, 3: False}


def test_enqueue_warns_and_the_job_records_it(
    run_cli, producer_env, clean_archive: Path, migrated_sqlite, redis_url: str
) -> None:
    import redis

    from db.engine import make_engine
    from db.models import BundleRecord

    url = migrated_sqlite()
    manifest = {"provenance": {"kind": "untrained"}}
    with make_engine(url).begin() as conn:
        record = {"bundle_id": "ab12", "manifest": manifest, "path": "/x", "active": True}
        conn.execute(sa.insert(BundleRecord).values(**record))
    queue = f"test-untrained-{uuid.uuid4().hex[:8]}"
    producer_env(storage_roots=clean_archive, database_url=url, broker_url=redis_url, queue=queue)
    try:
        result = run_cli("enqueue", clean_archive)
        assert result.exit_code == 0, result.output
        assert f"bundle ab12 {WARNING}" in flat(result.stderr)
        quiet = run_cli("enqueue", clean_archive, "--rescore", "--allow-untrained")
        assert quiet.exit_code == 0, quiet.output
        assert "UNTRAINED" not in quiet.stderr
        assert [options.get("untrained") for options in _options(url).values()] == [True, True]
    finally:
        redis.Redis.from_url(redis_url).delete(queue)
