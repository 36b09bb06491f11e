"""Reading reports back from Orthanc, and dicom3tools' dciodvfy on them."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from deepcovid.dicomweb import first_part
from tests.fixtures.orthanc import OrthancServer

SR_MODALITY = "SR"


def sr_instances(server: OrthancServer, study: str) -> list[str]:
    """SOP Instance UIDs of the SR instances of ``study``, by QIDO-RS."""
    series = httpx.get(
        f"{server.base}/dicom-web/studies/{study}/series", params={"Modality": SR_MODALITY}, timeout=30
    ).json()
    out = []
    for item in series or []:
        uid = item["0020000E"]["Value"][0]
        instances = httpx.get(f"{server.base}/dicom-web/studies/{study}/series/{uid}/instances", timeout=30)
        out += [i["00080018"]["Value"][0] for i in instances.json()]
    return out


def fetch(server: OrthancServer, study: str, sop: str) -> tuple[bytes, Dataset]:
    """One instance by WADO-RS: its bytes and dataset."""
    series = httpx.get(
        f"{server.base}/dicom-web/studies/{study}/instances", params={"SOPInstanceUID": sop}, timeout=30
    ).json()[0]["0020000E"]["Value"][0]
    response = httpx.get(
        f"{server.base}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=30,
    )
    response.raise_for_status()
    data = first_part(response.headers["Content-Type"], response.content)
    return data, dcmread(io.BytesIO(data))


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """The lines dciodvfy reports as errors ([] when dicom3tools is absent: the caller skips)."""
    tool = shutil.which("dciodvfy")
    assert tool is not None
    path = tmp_path / "report.dcm"
    path.write_bytes(data)
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def concept_values(ds: Dataset) -> dict[str, object]:
    """Every content item of an SR by concept code value: its number, code or text."""
    out: dict[str, object] = {}

    def walk(items: list[Dataset]) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
            if "MeasuredValueSequence" in item:
                out[name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif "ConceptCodeSequence" in item:
                out[name] = item.ConceptCodeSequence[0].CodeValue
            elif "TextValue" in item:
                out[name] = item.TextValue
            elif "ReferencedSOPSequence" in item:
                out.setdefault("referenced", []).append(
                    item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                )  # type: ignore[union-attr]
            walk(list(item.get("ContentSequence", [])))

    walk(list(ds.ContentSequence))
    return out
