"""End to end against a real Orthanc: screen a PACS, publish DICOM SR reports back, publish again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.fixtures.orthanc import OrthancServer
from tests.pacs.instances import archive
from tests.pacs.sr_check import concept_values, dciodvfy_errors, fetch, sr_instances


def _flat(text: str) -> str:
    return " ".join(text.split())


def _rows(data_dir: Path, sql: str) -> list[tuple]:
    engine = sa.create_engine(f"sqlite:///{data_dir / 'deepcovid.db'}")
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql)).all()]
    finally:
        engine.dispose()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools is not installed")
def test_screen_a_pacs_and_publish_the_reports_back(
    run_cli, producer_env, orthanc: OrthancServer, tiny_bundle_path: Path, tmp_path: Path
) -> None:
    made = archive()
    for item in made:
        orthanc.upload(item.data)
    data_dir = tmp_path / "data"
    in_2024 = [m for m in made if m.study != made[-1].study and m.modality in ("CR", "DX")]

    source = f"{orthanc.dicomweb}?since=2024-01-01&until=2024-12-31"
    result = run_cli("screen", source, "--bundle", tiny_bundle_path, "--allow-failures")
    assert result.exit_code == 0, result.output
    assert f"listed {len(in_2024)}" in _flat(result.stdout)
    states = {
        uri.rsplit("/", 1)[-1]: state
        for uri, state in _rows(
            data_dir,
            "SELECT i.uri, j.state || ':' || coalesce(j.failure_reason, '') "
            "FROM job_images j JOIN images i ON i.id = j.image_id",
        )
    }
    uris = [u for (u,) in _rows(data_dir, "SELECT uri FROM images")]
    assert all(u.startswith("dicomweb://127.0.0.1:") and "/instances/" in u for u in uris)
    expected = {m.sop: "scored:" if m.eligible else "failed:not_eligible" for m in in_2024}
    assert states == expected
    details = [
        d
        for (d,) in _rows(data_dir, "SELECT failure_detail FROM job_images WHERE failure_detail IS NOT NULL")
    ]
    assert sorted(details) == sorted(
        [
            "rule DEEPCOVID_INELIGIBLE_VIEWS: view position LL",
            "rule DEEPCOVID_ELIGIBLE_BODY_PARTS: body part KNEE",
        ]
    )

    # Publish to the PACS the job came from.
    published = run_cli("publish", "1")
    assert published.exit_code == 0, published.output
    scored = [m for m in in_2024 if m.eligible]
    assert f"{len(scored)} reports published to {orthanc.dicomweb}" in _flat(published.stdout)
    scores = dict(
        _rows(
            data_dir,
            "SELECT i.sop_uid, p.ensemble_score FROM predictions p JOIN images i ON i.id = p.image_id",
        )
    )
    (row,) = _rows(data_dir, "SELECT * FROM predictions LIMIT 1")
    columns = [c for (_, c, *_) in _rows(data_dir, "PRAGMA table_info(predictions)")]
    networks = {
        "P-" + c.removesuffix("_probability").upper()
        for c, v in zip(columns, row, strict=True)
        if c.endswith("_probability") and v is not None
    }
    for study in {m.study for m in scored}:
        reports = sr_instances(orthanc, study)
        assert len(reports) == len([m for m in scored if m.study == study])
        for sop in reports:
            data, sr = fetch(orthanc, study, sop)
            assert dciodvfy_errors(data, tmp_path) == []
            values = concept_values(sr)
            source = values["referenced"][0]  # type: ignore[index]
            assert source in scores and sr.StudyInstanceUID == study
            assert values["ENSEMBLE-P"] == pytest.approx(scores[source], abs=1e-6)
            assert values["840539006"] in ("52101004", "2667000")  # COVID-19: present or absent
            assert "THRESHOLD" in values and {k for k in values if k.startswith("P-")} == networks
            assert str(sr.PatientName) == "Doe^John"  # the source's patient module, copied
            assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    states = _rows(data_dir, "SELECT state, count(*) FROM publications GROUP BY state")
    assert states == [("published", len(scored))]

    # Again: nothing new is sent; with --again the same UIDs replace the reports, never duplicate them.
    again = run_cli("publish", "1")
    assert f"{len(scored)} were already there" in _flat(again.stdout)
    forced = run_cli("publish", "1", "--again")
    assert forced.exit_code == 0, forced.output
    for study in {m.study for m in scored}:
        assert len(sr_instances(orthanc, study)) == len([m for m in scored if m.study == study])
    # No patient data in the results database: only UIDs and scores.
    dump = "\n".join(
        str(r)
        for t in ("images", "job_images", "publications", "scan_jobs")
        for r in _rows(data_dir, f"SELECT * FROM {t}")
    )
    assert "Doe" not in dump and "PID-0042" not in dump

    # The same reports as files, for archives outside a PACS.
    out = tmp_path / "reports"
    files = run_cli("results", "1", "--format", "dicom-sr", "--out", out)
    assert files.exit_code == 0, files.output
    written = sorted(out.glob("*.dcm"))
    assert len(written) == len(scored)
    assert all(dciodvfy_errors(path.read_bytes(), tmp_path) == [] for path in written)
