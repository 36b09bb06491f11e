"""The shared real chest radiographs (JPEG 2000, JPEG-LS) through a PACS: screened, reported, valid."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.fixtures.orthanc import OrthancServer
from tests.pacs.sr_check import dciodvfy_errors, fetch, sr_instances


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools is not installed")
def test_real_dicoms_from_a_pacs_are_screened_and_reported(
    run_cli,
    producer_env,
    orthanc: OrthancServer,
    shared_data_path: Path,
    tiny_bundle_path: Path,
    tmp_path: Path,
) -> None:
    studies: dict[str, str] = {}
    for path in sorted((shared_data_path / "dicom").glob("*.dcm")):
        orthanc.upload(path.read_bytes())
        header = dcmread(path, stop_before_pixels=True)
        studies[str(header.SOPInstanceUID)] = str(header.StudyInstanceUID)
    assert studies, "no shared DICOMs"

    screened = run_cli("screen", orthanc.dicomweb, "--bundle", tiny_bundle_path)
    assert screened.exit_code == 0, screened.output  # every one scored: frontal chest radiographs
    assert f"scored now {len(studies)}" in " ".join(screened.stdout.split())
    published = run_cli("publish", "1")
    assert published.exit_code == 0, published.output
    for study in set(studies.values()):
        for sop in sr_instances(orthanc, study):
            data, report = fetch(orthanc, study, sop)
            assert dciodvfy_errors(data, tmp_path) == []
            assert report.Modality == "SR"
    reports = sum(len(sr_instances(orthanc, study)) for study in set(studies.values()))
    assert reports == len(studies)
