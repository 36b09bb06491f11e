"""The worklist: a job's images (or every job's) in a reviewer's order, filtered, paged by keyset.

Rows come in two segments: the scored images (those with a prediction) in the chosen order, then the
images without one (failed, queued) by id. In the first, every sort key is descending and the image id
(and, across jobs, the job id) breaks ties, so one row comparison, ``(keys) < (position)``, starts a page
after any row, and the indexes 0004 adds on ``predictions`` serve the default, score and disagreement
orders without sorting the job (a page of 100,000 predictions reads about a page of rows). A page starts
after (or, going back, before) a row's position whatever the table's size: no OFFSET. The cursor carries
that position (a segment tag, scores, a date, ids), never a URI.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from db.models import ImageReview
from db.tables import images, job_images, predictions
from deepcovid.defaults import WORKLIST_PAGE
from deepcovid.errors import REASONS
from deepcovid.networks import ARCHITECTURES
from deepcovid.results import ENSEMBLE_KEY
from deepcovid.status import ImageStatus, ReviewState, Verdict

image_reviews = ImageReview.__table__

SCORED, UNSCORED = "a", "b"  # the segments, in their order
_distance = sa.func.abs(predictions.c.ensemble_score - predictions.c.thresholds[ENSEMBLE_KEY].as_float())

# name -> (label, descending keys of the scored segment)
SORTS: dict[str, tuple[str, list[sa.ColumnElement[Any]]]] = {
    "flagged": (
        "flagged first, then ensemble score",
        [predictions.c.ensemble_decision, predictions.c.ensemble_score],
    ),
    "score": ("ensemble score", [predictions.c.ensemble_score]),
    "disagreement": ("disagreement between the networks", [predictions.c.disagreement]),
    "uncertain": ("closeness to the threshold", [-_distance]),
    "date": ("study date, newest first", [sa.func.coalesce(images.c.study_date, "")]),
}

# Decision filter -> (condition, the one segment it can match)
DECISIONS: dict[str, tuple[sa.ColumnElement[bool], str]] = {
    "flagged": (predictions.c.ensemble_decision.is_(True), SCORED),
    "not_flagged": (predictions.c.ensemble_decision.is_(False), SCORED),
    "failed": (job_images.c.state == ImageStatus.failed, UNSCORED),
    "queued": (job_images.c.state == ImageStatus.queued, UNSCORED),
}


class BadQuery(ValueError):
    """A worklist parameter or cursor that names nothing this worklist offers."""


@dataclass(frozen=True)
class Worklist:
    """Which rows, in which order: everything a worklist URL says besides the page."""

    job_id: int | None = None  # None: every job
    sort: str = "flagged"
    decision: str | None = None
    review: ReviewState | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.review is not None and not isinstance(self.review, ReviewState):
            try:
                object.__setattr__(self, "review", ReviewState(self.review))
            except ValueError:
                raise BadQuery(f"unknown review state {self.review!r}") from None
        if self.sort not in SORTS:
            raise BadQuery(f"unknown sort {self.sort!r}")
        if self.decision is not None and self.decision not in DECISIONS:
            raise BadQuery(f"unknown decision {self.decision!r}")
        if self.reason is not None and self.reason not in REASONS:
            raise BadQuery(f"unknown failure reason {self.reason!r}")

    @classmethod
    def from_params(cls, job_id: int | None, params: Mapping[str, str]) -> Worklist:
        return cls(
            job_id=job_id,
            sort=params.get("sort") or "flagged",
            decision=params.get("decision") or None,
            review=params.get("review") or None,  # type: ignore[arg-type]  # checked in __post_init__
            reason=params.get("reason") or None,
        )

    def params(self) -> dict[str, str]:
        """The query parameters that rebuild this worklist (defaults left out)."""
        out = {"sort": self.sort} if self.sort != "flagged" else {}
        if self.decision:
            out["decision"] = self.decision
        if self.review:
            out["review"] = self.review.value
        if self.reason:
            out["reason"] = self.reason
        if self.job_id is None:
            out["all"] = "1"
        return out

    def with_sort(self, sort: str) -> Worklist:
        return replace(self, sort=sort)


@dataclass
class Row:
    """One image of the worklist, as the table and the viewer show it."""

    job_id: int
    image_id: int
    state: ImageStatus
    failure_reason: str | None
    bundle_id: str | None
    ensemble_score: float | None
    ensemble_decision: bool | None
    disagreement: float | None
    threshold: float | None
    probabilities: dict[str, float | None]
    decisions: dict[str, bool | None]
    study_date: str | None
    view: str | None
    review_state: ReviewState
    consensus: Verdict | None
    position: list[Any] = field(repr=False, default_factory=list)  # segment, then its keys

    @property
    def cursor(self) -> str:
        return encode_cursor(self.position)


@dataclass
class Page:
    rows: list[Row]
    next_cursor: str | None  # after the last row, when there are more
    previous_cursor: str | None  # before the first row, when this is not the first page


def encode_cursor(position: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, worklist: Worklist) -> list[Any]:
    """The position a cursor holds, checked against the worklist's keys; BadQuery if it does not fit."""
    try:
        position = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError):
        raise BadQuery("the page cursor is damaged") from None
    if not isinstance(position, list) or not position or position[0] not in (SCORED, UNSCORED):
        raise BadQuery("the page cursor is damaged")
    if len(position) != 1 + len(_keys(worklist, position[0])):
        raise BadQuery("the page cursor belongs to another order")
    if not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in position[1:]):
        raise BadQuery("the page cursor is damaged")
    return position


def _keys(worklist: Worklist, segment: str) -> list[sa.ColumnElement[Any]]:
    """The segment's keys in order; the scored segment's are all descending, the other's ascending."""
    if segment == UNSCORED:
        return [job_images.c.job_id, job_images.c.image_id]
    ties = [predictions.c.image_id] + ([job_images.c.job_id] if worklist.job_id is None else [])
    keys = [*SORTS[worklist.sort][1], *ties]
    if worklist.review in (ReviewState.reviewed, ReviewState.disputed):
        # Few images are reviewed: sorting them beats walking the order's index past every unreviewed
        # one, which PostgreSQL would otherwise choose (1.1 s rather than milliseconds for 100,000 rows).
        keys = [_unindexed(k) for k in keys]
    return keys


def _unindexed(key: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The same order, as an expression no index serves."""
    if isinstance(key.type, sa.Boolean):
        return sa.case((key.is_(True), 1), else_=0)
    if isinstance(key.type, (sa.Integer, sa.Float)):
        return key + 0
    return key


def _segments(worklist: Worklist) -> list[str]:
    """The segments this worklist's filters can match, in order."""
    if worklist.reason:
        return [UNSCORED]
    if worklist.decision:
        return [DECISIONS[worklist.decision][1]]
    return [SCORED, UNSCORED]


def _columns() -> list[Any]:
    return [
        job_images.c.job_id,
        job_images.c.image_id,
        job_images.c.state,
        job_images.c.failure_reason,
        predictions.c.bundle_id,
        predictions.c.ensemble_score,
        predictions.c.ensemble_decision,
        predictions.c.disagreement,
        predictions.c.thresholds,
        *(predictions.c[f"{a}_{k}"] for a in ARCHITECTURES for k in ("probability", "decision")),
        images.c.study_date,
        images.c.view,
        image_reviews.c.state.label("review_state"),
        image_reviews.c.consensus,
    ]


def _select(worklist: Worklist, segment: str, *, filtered: bool = True) -> sa.Select[Any]:
    keys = _keys(worklist, segment)
    if segment == SCORED:
        joined = job_images.join(predictions, predictions.c.id == job_images.c.prediction_id)
    else:
        joined = job_images.outerjoin(predictions, sa.false())  # no prediction: its columns are NULL
    joined = joined.join(images, images.c.id == job_images.c.image_id).outerjoin(
        image_reviews, image_reviews.c.image_id == job_images.c.image_id
    )
    stmt = sa.select(*_columns(), *(k.label(f"_k{i}") for i, k in enumerate(keys))).select_from(joined)
    if segment == UNSCORED:
        stmt = stmt.where(job_images.c.prediction_id.is_(None))
    if worklist.job_id is not None:
        stmt = stmt.where(job_images.c.job_id == worklist.job_id)
    if not filtered:
        return stmt
    if worklist.decision:
        stmt = stmt.where(DECISIONS[worklist.decision][0])
    if worklist.review is ReviewState.unreviewed:
        stmt = stmt.where(image_reviews.c.image_id.is_(None))
    elif worklist.review is not None:
        stmt = stmt.where(image_reviews.c.state == worklist.review)
    if worklist.reason:
        stmt = stmt.where(job_images.c.failure_reason == worklist.reason)
    return stmt


def _fetch(
    conn: Connection, worklist: Worklist, segment: str, after: list[Any] | None, backwards: bool, limit: int
) -> list[Row]:
    """Up to ``limit`` rows of one segment after ``after`` (its keys), or before it going ``backwards``
    (then nearest first)."""
    keys = _keys(worklist, segment)
    descending = (segment == SCORED) != backwards
    stmt = _select(worklist, segment)
    if after is not None:
        typed = [
            sa.literal(bool(v) if isinstance(k.type, sa.Boolean) else v, k.type)
            for k, v in zip(keys, after, strict=True)
        ]
        here, there = sa.tuple_(*keys), sa.tuple_(*typed)
        stmt = stmt.where(here < there if descending else here > there)
    stmt = stmt.order_by(*(k.desc() if descending else k.asc() for k in keys)).limit(limit)
    return [_row(r, segment, len(keys)) for r in conn.execute(stmt)]


def _row(r: sa.Row[Any], segment: str, nkeys: int) -> Row:
    thresholds = r.thresholds or {}
    return Row(
        job_id=r.job_id,
        image_id=r.image_id,
        state=ImageStatus(r.state),
        failure_reason=r.failure_reason,
        bundle_id=r.bundle_id,
        ensemble_score=r.ensemble_score,
        ensemble_decision=r.ensemble_decision,
        disagreement=r.disagreement,
        threshold=thresholds.get(ENSEMBLE_KEY),
        probabilities={a: getattr(r, f"{a}_probability") for a in ARCHITECTURES},
        decisions={a: getattr(r, f"{a}_decision") for a in ARCHITECTURES},
        study_date=r.study_date,
        view=r.view,
        review_state=ReviewState(r.review_state) if r.review_state else ReviewState.unreviewed,
        consensus=Verdict(r.consensus) if r.consensus else None,
        position=[segment, *(_plain(getattr(r, f"_k{i}")) for i in range(nkeys))],
    )


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def _walk(conn: Connection, worklist: Worklist, position: list[Any] | None, backwards: bool, limit: int
          ) -> list[Row]:  # fmt: skip
    """Up to ``limit`` rows after (before) ``position``, across segments, nearest first."""
    order = _segments(worklist)
    if backwards:
        order.reverse()
    if position is not None:
        if position[0] not in order:
            return []
        order = order[order.index(position[0]) :]
    rows: list[Row] = []
    for i, segment in enumerate(order):
        after = position[1:] if position is not None and i == 0 else None
        rows += _fetch(conn, worklist, segment, after, backwards, limit - len(rows))
        if len(rows) >= limit:
            break
    return rows


def page(
    engine: Engine,
    worklist: Worklist,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = WORKLIST_PAGE,
) -> Page:
    """One page of the worklist: the first, the one after cursor ``after``, or the one before ``before``."""
    backwards = before is not None
    cursor = before if backwards else after
    position = decode_cursor(cursor, worklist) if cursor else None
    with engine.connect() as conn:
        rows = _walk(conn, worklist, position, backwards, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
        return Page(rows, rows[-1].cursor if rows else None, rows[0].cursor if rows and more else None)
    return Page(
        rows, rows[-1].cursor if rows and more else None, rows[0].cursor if rows and position else None
    )


def find(engine: Engine, worklist: Worklist, job_id: int, image_id: int) -> Row | None:
    """One image of a job (whatever the filters say), with its position in the worklist's order."""
    with engine.connect() as conn:
        for segment in (SCORED, UNSCORED):
            stmt = _select(worklist, segment, filtered=False).where(
                job_images.c.job_id == job_id, job_images.c.image_id == image_id
            )
            found = conn.execute(stmt).first()
            if found is not None:
                return _row(found, segment, len(_keys(worklist, segment)))
    return None


def neighbour(engine: Engine, worklist: Worklist, row: Row, step: int) -> Row | None:
    """The row after (``step`` 1) or before (-1) ``row`` in the worklist."""
    with engine.connect() as conn:
        rows = _walk(conn, worklist, row.position, step < 0, 1)
    return rows[0] if rows else None
