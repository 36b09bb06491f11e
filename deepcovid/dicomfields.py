"""The DICOM attributes the decoder keeps for audit and the results database stores, with their lengths.

Plain data, importable without pydicom: the database's row builder reads it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# DICOM attributes kept for audit, each cut to the longest value its VR allows (UI 64, CS 16, DA 8).
# Patient name, id and birth date are deliberately absent.
DICOM_KEYWORDS: dict[str, int] = {
    "StudyInstanceUID": 64,
    "SeriesInstanceUID": 64,
    "SOPInstanceUID": 64,
    "Modality": 16,
    "ViewPosition": 16,
    "BodyPartExamined": 16,
    "StudyDate": 8,  # YYYYMMDD: the review worklist sorts by it
}
# The kept attributes the results database stores in columns of their own, by column name.
DICOM_COLUMNS: dict[str, str] = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_uid": "SOPInstanceUID",
    "view": "ViewPosition",
    "study_date": "StudyDate",
}


def dicom_columns(info: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The ``DICOM_COLUMNS`` values of an image, from the ``info`` the decoder produced (None if absent)."""
    dicom = (info or {}).get("dicom") or {}
    return {column: dicom.get(keyword) or None for column, keyword in DICOM_COLUMNS.items()}
