"""`deepcovid users`, `deepcovid reviews export` and `deepcovid evaluate --reviews`: accounts from the
command line, and verdicts back into the labels file training reads and into PPV/sensitivity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from deepcovid.status import Role, Verdict
from review.accounts import add_user, authenticate
from review.outcomes import reviewed_metrics
from review.verdicts import record_verdict
from tests.review.conftest import PASSWORD, seed_job
from training.data import load_labelled

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


def test_users_add_list_disable(configured_database: Any) -> None:
    runner = CliRunner()
    added = runner.invoke(
        app, ["users", "add", "ada", "--role", "admin", "--password-stdin"], input=PASSWORD + "\n"
    )
    assert added.exit_code == 0, added.output
    assert authenticate(configured_database, "ada", PASSWORD).role is Role.admin
    prompted = runner.invoke(app, ["users", "add", "rex"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert prompted.exit_code == 0, prompted.output
    again = runner.invoke(app, ["users", "add", "rex", "--password-stdin"], input=PASSWORD + "\n")
    assert again.exit_code == 2 and "exists already" in again.output
    short = runner.invoke(app, ["users", "add", "cy", "--password-stdin"], input="short\n")
    assert short.exit_code == 2 and "at least 8" in short.output
    listed = runner.invoke(app, ["users", "list"], env={"COLUMNS": "200"})
    assert "ada" in listed.output and "admin" in listed.output and "rex" in listed.output
    assert PASSWORD not in listed.output and "argon2" not in listed.output
    assert runner.invoke(app, ["users", "disable", "rex"]).exit_code == 0
    assert authenticate(configured_database, "rex", PASSWORD) is None
    assert runner.invoke(app, ["users", "disable", "nobody"]).exit_code == 2


def test_export_writes_labels_training_reads_and_evaluate_reports_ppv(
    configured_database: Any, tmp_path: Path
) -> None:
    job = seed_job(configured_database, tmp_path / "archive", "cd" * 32)
    rex = add_user(configured_database, "rex", PASSWORD, Role.reviewer)
    bea = add_user(configured_database, "bea", PASSWORD, Role.reviewer)
    verdicts = {
        "a.png": Verdict.covid,  # flagged, true positive
        "b.png": Verdict.not_covid,  # flagged, false positive
        "chest.dcm": Verdict.covid,  # flagged, true positive
        "c.png": Verdict.indeterminate,  # left out of labels and metrics
    }
    for name, verdict in verdicts.items():
        record_verdict(configured_database, rex, job.ids[name], job.bundle_id, verdict)
    record_verdict(configured_database, bea, job.ids["b.png"], job.bundle_id, Verdict.covid)  # disputed

    runner = CliRunner()
    out = tmp_path / "labels.csv"
    exported = runner.invoke(app, ["reviews", "export", "--job", str(job.job_id), "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    assert "wrote 2 labels" in exported.output and "disputed 1" in exported.output
    samples = {Path(s.name).name: s for s in load_labelled(out)}
    assert set(samples) == {"a.png", "chest.dcm"}
    assert samples["a.png"].label == 1 and samples["chest.dcm"].patient_id == "1.2.3.4"

    (metrics,) = reviewed_metrics(configured_database, job_id=job.job_id)
    assert (metrics.true_positive, metrics.false_positive, metrics.ppv) == (2, 0, 1.0)
    assert metrics.sensitivity is None and "unflagged" in metrics.sensitivity_note
    record_verdict(configured_database, rex, job.ids["e.png"], job.bundle_id, Verdict.covid)  # missed
    record_verdict(configured_database, rex, job.ids["f.png"], job.bundle_id, Verdict.not_covid)
    (metrics,) = reviewed_metrics(configured_database, job_id=job.job_id)
    assert metrics.sensitivity == pytest.approx(2 / 3)

    report = runner.invoke(app, ["evaluate", "--reviews", str(job.job_id)], env={"COLUMNS": "200"})
    assert report.exit_code == 0, report.output
    assert "1.000" in report.output and "0.667" in report.output
    assert runner.invoke(app, ["evaluate", "--reviews", "999"]).exit_code == 2
    assert runner.invoke(app, ["evaluate"]).exit_code == 2
