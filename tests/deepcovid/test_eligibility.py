"""Eligibility rules on DICOM headers: applied before decoding, from files and S3 alike, configurable."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from deepcovid.eligibility import Eligibility
from deepcovid.errors import DecodeError
from deepcovid.preprocess import load_image
from deepcovid.settings import Settings
from tests.fixtures.images import dicom_bytes


def _dicom(**attributes: str) -> bytes:
    from pydicom import dcmread

    modality = attributes.pop("Modality", "DX")
    ds = dcmread(io.BytesIO(dicom_bytes(modality=modality, size=(64, 48))))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


RULES = Eligibility.from_settings(Settings())


@pytest.mark.parametrize(
    ("attributes", "rule"),
    [
        ({"ViewPosition": "LL"}, "DEEPCOVID_INELIGIBLE_VIEWS: view position LL"),
        ({"ViewPosition": "LATERAL"}, "DEEPCOVID_INELIGIBLE_VIEWS: view position LATERAL"),
        ({"BodyPartExamined": "KNEE"}, "DEEPCOVID_ELIGIBLE_BODY_PARTS: body part KNEE"),
        ({"Modality": "CT"}, "DEEPCOVID_ELIGIBLE_MODALITIES: modality CT"),
        ({"Modality": "MG"}, "DEEPCOVID_ELIGIBLE_MODALITIES: modality MG"),
        ({"SeriesDescription": "Thorax lat. Doe"}, "the series description has the word LAT"),
    ],
)
def test_each_rule_refuses_with_its_name(attributes: dict[str, str], rule: str) -> None:
    with pytest.raises(DecodeError) as caught:
        load_image(_dicom(**attributes), eligibility=RULES)
    assert caught.value.reason == "not_eligible"
    assert rule in caught.value.detail
    assert "Doe" not in caught.value.detail  # free text is never quoted


def test_frontal_chest_radiographs_and_missing_body_parts_are_scored() -> None:
    load_image(_dicom(ViewPosition="AP", SeriesDescription="CHEST AP"), eligibility=RULES)
    load_image(_dicom(BodyPartExamined=""), eligibility=RULES)


def test_the_rules_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_INELIGIBLE_VIEWS", "ap")
    monkeypatch.setenv("DEEPCOVID_ELIGIBLE_BODY_PARTS", "chest,knee")
    rules = Eligibility.from_settings(Settings())
    assert rules is not None
    load_image(_dicom(BodyPartExamined="KNEE"), eligibility=rules)
    with pytest.raises(DecodeError, match="view position AP"):
        load_image(_dicom(ViewPosition="AP"), eligibility=rules)
    monkeypatch.setenv("DEEPCOVID_ELIGIBILITY", "false")
    assert Eligibility.from_settings(Settings()) is None


def test_the_pipeline_applies_them_to_files(tmp_path: Path, tiny_bundle_path: Path) -> None:
    from deepcovid.bundle import load_bundle
    from deepcovid.ensemble import Ensemble
    from deepcovid.pipeline import score_chunk
    from deepcovid.storage import Storage

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "pa.dcm").write_bytes(_dicom())
    (archive / "lateral.dcm").write_bytes(_dicom(ViewPosition="LL"))
    settings = Settings(storage_roots=[archive], device="cpu", decode_threads=1, data_dir=tmp_path)
    ensemble = Ensemble.from_bundle(load_bundle(tiny_bundle_path), device="cpu", settings=settings)
    results = score_chunk(
        [str(archive / "pa.dcm"), str(archive / "lateral.dcm")],
        storage=Storage(settings),
        ensemble=ensemble,
        settings=settings,
    )
    assert [r.status.value for r in results] == ["scored", "failed"]
    assert results[1].reason == "not_eligible"
