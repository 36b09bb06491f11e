"""Closing the loop: reviewers' consensus as a labels file for training and evaluation, and the screener's
PPV and sensitivity measured against it.

Only images whose review is settled (agreeing verdicts, or an admin's adjudication) with a verdict that
names a class (COVID-19, Not COVID-19) count; Indeterminate and Not a chest X-ray are left out of both.
Sensitivity needs reviewed images the screener did not flag: reviewers mostly see flagged ones, so where
none was reviewed, or none of those reviewed was COVID-19, it is not computable and says so.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.models import ImageReview
from db.tables import images, job_images, predictions
from deepcovid.defaults import STREAM_BATCH
from deepcovid.private import make_private_file
from deepcovid.status import ReviewState, Verdict

image_reviews = ImageReview.__table__
LABEL_COLUMNS = ("path", "label", "patient_id", "verdict")


@dataclass
class ReviewedMetrics:
    """One bundle's screening decisions against the reviewers' settled verdicts."""

    bundle_id: str
    reviewed: int = 0  # settled COVID-19 / Not COVID-19 verdicts on images this bundle scored
    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0
    true_negative: int = 0

    @property
    def flagged(self) -> int:
        return self.true_positive + self.false_positive

    @property
    def ppv(self) -> float | None:
        return self.true_positive / self.flagged if self.flagged else None

    @property
    def sensitivity(self) -> float | None:
        positives = self.true_positive + self.false_negative
        if not positives or not (self.false_negative + self.true_negative):
            return None  # no reviewed image the screener passed: missed cases cannot be seen
        return self.true_positive / positives

    @property
    def sensitivity_note(self) -> str:
        if self.sensitivity is not None:
            return ""
        if not self.false_negative + self.true_negative:
            return "no unflagged image was reviewed"
        return "no reviewed image is COVID-19"

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "reviewed": self.reviewed,
            "flagged": self.flagged,
            "true_positive": self.true_positive,
            "false_positive": self.false_positive,
            "false_negative": self.false_negative,
            "true_negative": self.true_negative,
            "ppv": self.ppv,
            "sensitivity": self.sensitivity,
        }


_CLASS_VERDICTS = (Verdict.covid, Verdict.not_covid)


def _settled() -> sa.ColumnElement[bool]:
    return sa.and_(
        image_reviews.c.state == ReviewState.reviewed, image_reviews.c.consensus.in_(_CLASS_VERDICTS)
    )


def reviewed_metrics(engine: Engine, *, job_id: int | None = None) -> list[ReviewedMetrics]:
    """Per bundle: the screener's calls on reviewed images against the consensus (one job's, if given)."""
    if job_id is not None:
        source = job_images.join(predictions, predictions.c.id == job_images.c.prediction_id)
        where = [job_images.c.job_id == job_id]
    else:
        source, where = predictions, []
    stmt = (
        sa.select(
            predictions.c.bundle_id,
            predictions.c.image_id,
            predictions.c.ensemble_decision,
            image_reviews.c.consensus,
        )  # fmt: skip
        .select_from(source.join(image_reviews, image_reviews.c.image_id == predictions.c.image_id))
        .where(_settled(), predictions.c.ensemble_decision.is_not(None), *where)
        .distinct()
    )
    out: dict[str, ReviewedMetrics] = {}
    seen: set[tuple[str, int]] = set()
    with engine.connect() as conn:
        for bundle_id, image_id, flagged, agreed in conn.execute(stmt):
            if (bundle_id, image_id) in seen:  # scored in several jobs by the same bundle
                continue
            seen.add((bundle_id, image_id))
            m = out.setdefault(bundle_id, ReviewedMetrics(bundle_id))
            m.reviewed += 1
            covid = Verdict(agreed) is Verdict.covid
            if flagged:
                m.true_positive += covid
                m.false_positive += not covid
            else:
                m.false_negative += covid
                m.true_negative += not covid
    return sorted(out.values(), key=lambda m: m.bundle_id)


@dataclass
class Exported:
    written: int
    left_out: dict[str, int]  # verdicts that name no class, and disputed images


def _label_rows(engine: Engine, job_id: int | None) -> Iterator[sa.Row[Any]]:
    stmt = sa.select(
        images.c.uri, images.c.study_uid, image_reviews.c.state, image_reviews.c.consensus
    ).select_from(images.join(image_reviews, image_reviews.c.image_id == images.c.id))
    if job_id is not None:
        members = sa.select(job_images.c.image_id).where(job_images.c.job_id == job_id)
        stmt = stmt.where(images.c.id.in_(members))
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=STREAM_BATCH).execute(
            stmt.order_by(images.c.id)
        )
        yield from result


def export_labels(engine: Engine, out: Path, *, job_id: int | None = None) -> Exported:
    """Write ``out`` (0600: it holds paths) as ``path,label,patient_id,verdict``, the CSV ``deepcovid
    train`` and ``evaluate`` read; ``patient_id`` is the DICOM study UID, the only grouping kept."""
    left_out: dict[str, int] = {}
    written = 0
    make_private_file(out)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_COLUMNS)
        for row in _label_rows(engine, job_id):
            verdict = Verdict(row.consensus) if row.consensus else None
            label = verdict.training_label if verdict else None
            if ReviewState(row.state) is not ReviewState.reviewed or label is None:
                why = verdict.value if verdict else ReviewState(row.state).value
                left_out[why] = left_out.get(why, 0) + 1
                continue
            writer.writerow([row.uri, label, row.study_uid or "", verdict.value])
            written += 1
    return Exported(written, left_out)
