"""``status``, ``jobs`` and ``results`` as people and scripts read them: whole URIs when piped, rounded
numbers in tables, full precision in JSON and CSV, flagged images highest score first."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from cli.main import app
from deepcovid.exitcodes import ExitCode
from deepcovid.results import ImageResult
from deepcovid.settings import get_settings

SOURCE = "/archive/" + "radiology-department-exports/" * 4 + "2021"
SCORES = {"a": 0.7, "b": 0.95, "c": 1 / 3, "d": 0.8, "e": 0.99, "f": 2 / 3}  # c alone is not flagged
LONG_FLOAT = re.compile(r"\d\.\d{4,}")
ARCHS = ("resnet18", "squeezenet1_1")

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _uri(name: str) -> str:
    return f"{SOURCE}/patient-{name}/" + "study-1-2-840-113619/" * 2 + f"{name}.dcm"


def _scored(uri: str, value: float) -> ImageResult:
    return ImageResult(
        uri=uri,
        status="scored",
        probabilities={arch: value for arch in ARCHS},
        decisions={arch: value >= 0.5 for arch in ARCHS},
        ensemble_score=value,
        ensemble_decision=value >= 0.5,
        disagreement=value / 7,
        thresholds={**{arch: 0.5 for arch in ARCHS}, "ensemble": 0.5},
        size=100,
    )


@pytest.fixture
def job(configured_database: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """A running job: six images scored (five flagged), one failed, one still queued."""
    from db.jobs import create_job
    from db.rows import ImageRef
    from db.writes import register_images, write_results

    monkeypatch.setenv("DEEPCOVID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    get_settings.cache_clear()
    engine = configured_database
    job_id = create_job(engine, source=SOURCE, bundle_id="b1")
    names = [*SCORES, "broken", "waiting"]
    register_images(engine, job_id, "b1", [ImageRef(_uri(name)) for name in names])
    results = [_scored(_uri(name), value) for name, value in SCORES.items()]
    results.append(ImageResult.failed(_uri("broken"), "truncated"))
    write_results(engine, job_id=job_id, bundle_id="b1", results=results, worker_host="h", device="cpu")
    return job_id


def _run(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_status_json_has_the_fields_of_jobs_json_at_full_precision(job: int) -> None:
    record = json.loads(_run("status", job, "--format", "json").stdout)
    listed = json.loads(_run("jobs", "--format", "json").stdout)
    assert record.keys() == listed[0].keys()
    assert {k: v for k, v in record.items() if k not in ("rate_per_s", "eta_s")} == {
        k: v for k, v in listed[0].items() if k not in ("rate_per_s", "eta_s")
    }
    assert record["job"] == job and record["state"] == "running" and record["stalled"] is False
    assert record["source"] == SOURCE and record["bundle"] == "b1"
    counts = {k: record[k] for k in ("total", "queued", "scored", "failed", "cancelled", "flagged")}
    assert counts == {"total": 8, "queued": 1, "scored": 6, "failed": 1, "cancelled": 0, "flagged": 5}
    assert record["failed_by_reason"] == {"truncated": 1}
    assert isinstance(record["rate_per_s"], float) and record["rate_per_s"] > 0
    assert record["eta_s"] == pytest.approx(1 / record["rate_per_s"])
    assert record["created_at"] and record["last_progress_at"] and record["finished_at"] is None


def test_status_json_refuses_check_and_follow(job: int) -> None:
    for extra in ("--check", "--follow"):
        result = CliRunner().invoke(app, ["status", str(job), "--format", "json", extra])
        assert result.exit_code == int(ExitCode.USAGE), result.output
        assert "--format json" in result.stderr


def test_piped_tables_keep_every_uri_whole_and_round_every_float(job: int) -> None:
    status = _run("status", job).stdout
    jobs = _run("jobs").stdout
    results = _run("results", job).stdout
    for text in (status, jobs, results):
        assert "…" not in text
        assert not LONG_FLOAT.search(text), text
    assert any(SOURCE in line for line in status.splitlines())
    assert any(SOURCE in line and line.split()[0] == str(job) for line in jobs.splitlines())
    for name in SCORES:
        assert any(_uri(name) in line for line in results.splitlines())
    assert "0.333" in results and "0.667" in results  # scores to three decimals
    assert re.search(r"rate\s+│\s+\d+\.\d images/s", status)  # rates to one decimal
    assert re.search(r"ETA\s+│\s+(\d+[dhms] ?)+", status)  # durations humanised
    # The machine-readable forms keep full precision.
    exported = _run("results", job, "--format", "csv").stdout
    assert str(1 / 3) in exported and str(2 / 3) in exported


def test_results_flagged_come_highest_score_first_in_the_table_and_the_csv(job: int) -> None:
    expected = sorted((v for v in SCORES.values() if v >= 0.5), reverse=True)
    names_by_score = sorted((n for n, v in SCORES.items() if v >= 0.5), key=SCORES.get, reverse=True)

    table = _run("results", job, "--flagged").stdout
    rows = [line for line in table.splitlines() if SOURCE in line]
    assert [row.split()[1] for row in rows] == [f"{v:.3f}" for v in expected]
    assert [row.split()[-1] for row in rows] == [_uri(n) for n in names_by_score]

    exported = _run("results", job, "--flagged", "--format", "csv").stdout
    csv_rows = list(csv.DictReader(io.StringIO(exported)))
    assert [float(r["ensemble_score"]) for r in csv_rows] == expected
    assert [r["uri"] for r in csv_rows] == [_uri(n) for n in names_by_score]
