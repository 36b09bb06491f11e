"""Synthetic PACS content: DX and CR radiographs (MONOCHROME1 and 2, compressed and not), a lateral view,
a non-chest body part and a CT slice, grouped into studies with their dates."""

from __future__ import annotations

import io
from dataclasses import dataclass

from tests.fixtures.images import dicom_bytes


@dataclass(frozen=True)
class Made:
    """One generated instance and what the screener should do with it."""

    data: bytes
    study: str
    series: str
    sop: str
    modality: str
    eligible: bool


def instance(
    *,
    study: str,
    study_date: str,
    modality: str = "DX",
    view: str = "PA",
    body_part: str = "CHEST",
    photometric: str = "MONOCHROME2",
    rle: bool = False,
    series: str | None = None,
    seed: int = 0,
) -> Made:
    """One instance of ``study``; a new series unless ``series`` names one."""
    from pydicom import dcmread
    from pydicom.uid import RLELossless, generate_uid

    ds = dcmread(
        io.BytesIO(dicom_bytes(photometric=photometric, modality=modality, size=(64, 48), seed=seed))
    )
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.StudyDate = study_date
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC" + study_date
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ViewPosition = view
    ds.BodyPartExamined = body_part
    ds.SeriesDescription = f"{body_part} {view}"
    ds.Manufacturer = "Synthetic"
    ds.PatientSex = "O"
    ds.ReferringPhysicianName = ""
    if modality == "CR":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    elif modality == "CT":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    if rle:
        ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    eligible = modality in ("DX", "CR") and view in ("PA", "AP") and body_part == "CHEST"
    return Made(buffer.getvalue(), study, ds.SeriesInstanceUID, ds.SOPInstanceUID, modality, eligible)


def archive() -> list[Made]:
    """Three studies: 2024-01-10 (DX PA, DX MONOCHROME1 RLE, a lateral), 2024-03-05 (CR PA, a CT slice,
    a DX of the knee), 2025-06-01 (DX AP)."""
    from pydicom.uid import generate_uid

    first, second, third = generate_uid(), generate_uid(), generate_uid()
    return [
        instance(study=first, study_date="20240110", seed=1),
        instance(study=first, study_date="20240110", photometric="MONOCHROME1", rle=True, seed=2),
        instance(study=first, study_date="20240110", view="LL", seed=3),
        instance(study=second, study_date="20240305", modality="CR", seed=4),
        instance(study=second, study_date="20240305", modality="CT", view="", body_part="CHEST", seed=5),
        instance(study=second, study_date="20240305", body_part="KNEE", view="AP", seed=6),
        instance(study=third, study_date="20250601", view="AP", seed=7),
    ]
