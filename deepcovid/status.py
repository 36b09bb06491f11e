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


class PublishStatus(str, Enum):
    """Where an image's DICOM SR report stands with one destination PACS."""

    published = "published"  # the PACS stored it (again, if it was sent before: same UIDs)
    failed = "failed"  # the last attempt failed; `deepcovid publish` sends it again
    skipped = "skipped"  # no report can be made: the source is not a DICOM
