"""Send a job's DICOM SR reports to a PACS by STOW-RS, or write them to a folder, recording each image's
publish state.

The source instance's header is needed for each report (its patient and study modules are copied into
it): from the PACS by WADO-RS metadata for a ``dicomweb://`` image, else read from its file or object.
It is held only while the report is built. A failure is recorded against the image with a URI-free
reason and never stops the others; publishing again sends the same UIDs, so the PACS replaces rather
than duplicates, and by default only what is not yet published is sent.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.engine import Engine

from db.publications import ScoredImage, record_publications, scored_images
from deepcovid.chunking import batched
from deepcovid.dicomweb import DicomWebReader, is_dicomweb, parse_dicomweb
from deepcovid.errors import ImageError, TransientError, UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.formats import is_dicom
from deepcovid.settings import Settings
from deepcovid.status import PublishStatus
from deepcovid.storage import Storage, open_storage
from pacs.report import Scores, build_report

log = logging.getLogger(__name__)

STOW_BATCH = 16
"""Reports per STOW-RS request: few round trips, yet one refused request fails few images."""
_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
_REFERENCED_SOP_INSTANCE, _FAILURE_REASON = "00081155", "00081197"


@dataclass
class PublishSummary:
    """What one publish did, by image count."""

    destination: str
    published: int = 0
    failed: int = 0
    skipped: int = 0
    already: int = 0  # published before, not sent again
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: dict[str, Any]) -> None:
        state = PublishStatus(outcome["state"])
        setattr(self, state.value, getattr(self, state.value) + 1)
        if outcome.get("reason"):
            self.reasons[outcome["reason"]] = self.reasons.get(outcome["reason"], 0) + 1


def destination_root(destination: str) -> str:
    """The ``dicomweb://`` service root a destination names; UserError for anything else."""
    try:
        location = parse_dicomweb(destination)
    except ValueError as exc:
        raise UserError(ExitCode.USAGE, f"--to wants a dicomweb:// service root: {exc}") from None
    if location.study:
        raise UserError(ExitCode.USAGE, "--to wants a service root, e.g. dicomweb://pacs:8042/dicom-web")
    return location.root


class Publisher:
    """Reads source headers and sends reports, with the workers' storage and DICOMweb policy."""

    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        self.settings = settings
        self.storage = storage or open_storage(settings)
        self.reader: DicomWebReader = self.storage.dicomweb

    def header(self, uri: str) -> Dataset | None:
        """The source instance's attributes without pixels; None when it is not a DICOM."""
        if is_dicomweb(uri):
            location = self.reader.locate(uri)
            response = self.reader.request(
                location,
                "GET",
                location.instance_path + "/metadata",
                headers={"Accept": "application/dicom+json"},
            )
            attributes = response.json()[0]
            for tag in [t for t, v in attributes.items() if "BulkDataURI" in v]:
                del attributes[tag]  # pixels and other bulk data: the report needs none of them
            return Dataset.from_json(attributes)
        data = self.storage.read(uri)
        if not is_dicom(data):
            return None
        return dcmread(io.BytesIO(data), stop_before_pixels=True)

    def reports(self, images: Sequence[ScoredImage]) -> Iterator[tuple[ScoredImage, Dataset | None, str]]:
        """``(image, report or None, why not)`` for each image; a failure is the image's only."""
        for image in images:
            try:
                source = self.header(image.uri)
                if source is None:
                    yield image, None, "not_a_dicom"
                    continue
                scores = Scores(
                    image.bundle_id, image.probability, image.decision, image.threshold, image.networks
                )
                yield image, build_report(source, scores), ""
            except ImageError as exc:
                yield image, None, exc.reason
            except TransientError as exc:
                yield image, None, _short(str(exc))
            except Exception as exc:  # a header highdicom refuses: this image's report only
                log.debug("building a report failed", exc_info=True)  # DEBUG: may name the source
                yield image, None, f"report_error: {type(exc).__name__}"

    def stow(self, root: str, reports: Sequence[Dataset]) -> dict[str, str]:
        """Send ``reports`` in one STOW-RS request; the reason each SOP UID failed ("" when stored)."""
        location = parse_dicomweb(root)
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for report in reports:
            part = io.BytesIO()
            report.save_as(part, enforce_file_format=True)
            body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(part.getvalue())
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        uids = [str(r.SOPInstanceUID) for r in reports]
        try:
            response = self.reader.request(
                location, "POST", "/studies", headers=headers, content=body.getvalue()
            )
        except (ImageError, TransientError) as exc:
            return dict.fromkeys(uids, _short(str(exc)))
        return _stow_outcome(response, uids)


def _stow_outcome(response: Any, uids: list[str]) -> dict[str, str]:
    """Per SOP UID: "" if the PACS lists it as stored, else why not."""
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        answer = {}
    if isinstance(answer, list):
        answer = answer[0] if answer else {}
    stored = {
        str((item.get(_REFERENCED_SOP_INSTANCE) or {}).get("Value", [""])[0])
        for item in (answer.get(_REFERENCED_SOP_SEQUENCE) or {}).get("Value", [])
    }
    failed = {
        str((item.get(_REFERENCED_SOP_INSTANCE) or {}).get("Value", [""])[0]): (
            item.get(_FAILURE_REASON) or {}
        ).get("Value", [""])[0]
        for item in (answer.get(_FAILED_SOP_SEQUENCE) or {}).get("Value", [])
    }
    out = {}
    for uid in uids:
        if uid in failed:
            out[uid] = f"stow_refused: failure reason {failed[uid]}"
        elif uid in stored or not answer:  # a 200 with no body: everything was stored
            out[uid] = ""
        else:
            out[uid] = "stow_refused: not in the PACS's answer"
    return out


def _short(text: str) -> str:
    return text[:255]


def publish_job(
    engine: Engine,
    job_id: int,
    destination: str,
    settings: Settings,
    *,
    again: bool = False,
    uris: Sequence[str] | None = None,
    publisher: Publisher | None = None,
) -> PublishSummary:
    """STOW the reports of the job's scored images (of ``uris`` only, when given) to ``destination``;
    those already published there are skipped unless ``again``. Records each image's publish state."""
    root = destination_root(destination)
    publisher = publisher or Publisher(settings)
    summary = PublishSummary(root)
    pending = []
    for image in scored_images(engine, job_id, root, uris=uris):
        if image.published and not again:
            summary.already += 1
        else:
            pending.append(image)
    for batch in batched(pending, STOW_BATCH):
        outcomes = []
        built = []
        for image, report, why in publisher.reports(batch):
            if report is None:
                state = PublishStatus.skipped if why == "not_a_dicom" else PublishStatus.failed
                outcomes.append(_outcome(image, state, None, why))
            else:
                built.append((image, report))
        if built:
            sent = publisher.stow(root, [report for _, report in built])
            for image, report in built:
                why = sent[str(report.SOPInstanceUID)]
                state = PublishStatus.failed if why else PublishStatus.published
                outcomes.append(_outcome(image, state, str(report.SOPInstanceUID), why or None))
        record_publications(engine, root, outcomes)
        for outcome in outcomes:
            summary.add(outcome)
    if summary.failed:
        log.warning("job %d: %d reports could not be published", job_id, summary.failed)
    return summary


def _outcome(
    image: ScoredImage, state: PublishStatus, sop_uid: str | None, reason: str | None
) -> dict[str, Any]:
    return {
        "image_id": image.image_id,
        "bundle_id": image.bundle_id,
        "state": state,
        "sop_uid": sop_uid,
        "reason": reason,
    }


def write_reports(engine: Engine, job_id: int, out: Path, settings: Settings) -> PublishSummary:
    """Write the job's reports to ``out`` as ``<SOP Instance UID>.dcm`` (for archives not in a PACS)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = PublishSummary(str(out))
    publisher = Publisher(settings)
    images = list(scored_images(engine, job_id, "file:"))
    for _image, report, why in publisher.reports(images):
        if report is None:
            state = PublishStatus.skipped if why == "not_a_dicom" else PublishStatus.failed
            summary.add({"state": state, "reason": why})
            continue
        report.save_as(out / f"{report.SOPInstanceUID}.dcm", enforce_file_format=True)
        summary.add({"state": PublishStatus.published})
    return summary
