"""Where an image and a job stand: one vocabulary from a scored result through to the database."""

from __future__ import annotations

from enum import Enum


class ImageStatus(str, Enum):
    """An image's state in a job; a scoring result is ``scored`` or ``failed``."""

    queued = "queued"
    scored = "scored"
    failed = "failed"
    skipped = "skipped"

    @property
    def finished(self) -> bool:
        return self in (ImageStatus.scored, ImageStatus.failed)


class JobStatus(str, Enum):
    """A scan job's state."""

    running = "running"
    finished = "finished"
    cancelled = "cancelled"
