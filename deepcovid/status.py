"""Where an image and a job stand: one vocabulary from a scored result through to the database."""

from __future__ import annotations

from enum import Enum


class ImageStatus(str, Enum):
    """An image's state in one job; a scoring result is ``scored`` or ``failed``, and an image a closed job
    never finished is ``cancelled``."""

    queued = "queued"
    scored = "scored"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (ImageStatus.scored, ImageStatus.failed)


class JobStatus(str, Enum):
    """A scan job's state: ``interrupted`` can be resumed; ``failed`` and ``cancelled`` are final."""

    running = "running"
    finished = "finished"
    interrupted = "interrupted"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def resumable(self) -> bool:
        return self in (JobStatus.running, JobStatus.interrupted)


class Role(str, Enum):
    """What a review workbench account may do: reviewers review; admins also manage users and adjudicate."""

    reviewer = "reviewer"
    admin = "admin"


class Verdict(str, Enum):
    """A reviewer's reading of one image; ``label`` is the button a reviewer presses."""

    covid = "covid"
    not_covid = "not_covid"
    indeterminate = "indeterminate"
    not_chest = "not_chest_xray"

    @property
    def label(self) -> str:
        return VERDICT_LABELS[self]

    @property
    def training_label(self) -> str | None:
        """The class ``deepcovid train`` reads (training.data.LABELS), or None when it names no class."""
        return {Verdict.covid: "covid", Verdict.not_covid: "non_covid"}.get(self)


VERDICT_LABELS: dict[Verdict, str] = {
    Verdict.covid: "COVID-19",
    Verdict.not_covid: "Not COVID-19",
    Verdict.indeterminate: "Indeterminate",
    Verdict.not_chest: "Not a chest X-ray",
}


class ReviewState(str, Enum):
    """Where an image stands with its reviewers: ``disputed`` until verdicts agree or an admin adjudicates."""

    unreviewed = "unreviewed"
    reviewed = "reviewed"
    disputed = "disputed"


class PublishStatus(str, Enum):
    """Where an image's DICOM SR report stands with one destination PACS."""

    published = "published"  # the PACS stored it (again, if it was sent before: same UIDs)
    failed = "failed"  # the last attempt failed; `deepcovid publish` sends it again
    skipped = "skipped"  # no report can be made: the source is not a DICOM
