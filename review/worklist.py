"""The worklist: a job's images (or every job's) in a reviewer's order, filtered, paged by keyset.

Every order is a list of sort keys, each an expression that is never NULL (COALESCE puts what has no
value last), then the job and image ids, so each row has a unique position. A page starts after (or, going
back, before) the position of a row, whatever the table's size: no OFFSET. The cursor carries that
position's values (scores, a date, ids), never a URI.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.models import ImageReview
from db.tables import images, job_images, predictions
from deepcovid.defaults import WORKLIST_PAGE
from deepcovid.errors import REASONS
from deepcovid.networks import ARCHITECTURES
from deepcovid.results import ENSEMBLE_KEY
from deepcovid.status import ImageStatus, ReviewState, Verdict

image_reviews = ImageReview.__table__

# Beyond any probability or distance to a threshold: what has no score sorts after what has one.
_LAST = 2.0
_threshold = predictions.c.thresholds[ENSEMBLE_KEY].as_float()

# name -> (label, [(key expression, descending)])
SORTS: dict[str, tuple[str, list[tuple[sa.ColumnElement[Any], bool]]]] = {
    "flagged": (
        "flagged first, then ensemble score",
        [
            (sa.case((predictions.c.ensemble_decision.is_(True), 0), else_=1), False),
            (sa.func.coalesce(predictions.c.ensemble_score, -1.0), True),
        ],
    ),
    "score": ("ensemble score", [(sa.func.coalesce(predictions.c.ensemble_score, -1.0), True)]),
    "disagreement": (
        "disagreement between the networks",
        [(sa.func.coalesce(predictions.c.disagreement, -1.0), True)],
    ),
    "uncertain": (
        "closeness to the threshold",
        [(sa.func.coalesce(sa.func.abs(predictions.c.ensemble_score - _threshold), _LAST), False)],
    ),
    "date": ("study date, newest first", [(sa.func.coalesce(images.c.study_date, ""), True)]),
}
TIE_BREAK = [(job_images.c.job_id, False), (job_images.c.image_id, False)]

# Decision filter -> condition
DECISIONS: dict[str, sa.ColumnElement[bool]] = {
    "flagged": predictions.c.ensemble_decision.is_(True),
    "not_flagged": predictions.c.ensemble_decision.is_(False),
    "failed": job_images.c.state == ImageStatus.failed,
    "queued": job_images.c.state == ImageStatus.queued,
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
    position: list[Any] = field(repr=False, default_factory=list)

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
    keys = _keys(worklist)
    if not isinstance(position, list) or len(position) != len(keys):
        raise BadQuery("the page cursor belongs to another order")
    if not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in position):
        raise BadQuery("the page cursor is damaged")
    return position


def _keys(worklist: Worklist) -> list[tuple[sa.ColumnElement[Any], bool]]:
    return [*SORTS[worklist.sort][1], *TIE_BREAK]


def _after(keys: list[tuple[sa.ColumnElement[Any], bool]], position: list[Any], backwards: bool
           ) -> sa.ColumnElement[bool]:  # fmt: skip
    """Rows strictly after ``position`` in the keys' order (before it, ``backwards``)."""
    clauses = []
    for i, (expr, descending) in enumerate(keys):
        later = expr < position[i] if descending != backwards else expr > position[i]
        equal = [keys[j][0] == position[j] for j in range(i)]
        clauses.append(sa.and_(*equal, later))
    return sa.or_(*clauses)


def _base(worklist: Worklist) -> sa.Select[Any]:
    joined = (
        job_images.join(images, images.c.id == job_images.c.image_id)
        .outerjoin(predictions, predictions.c.id == job_images.c.prediction_id)
        .outerjoin(image_reviews, image_reviews.c.image_id == job_images.c.image_id)
    )
    stmt = sa.select(
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
    ).select_from(joined)
    if worklist.job_id is not None:
        stmt = stmt.where(job_images.c.job_id == worklist.job_id)
    if worklist.decision:
        stmt = stmt.where(DECISIONS[worklist.decision])
    if worklist.review is ReviewState.unreviewed:
        stmt = stmt.where(image_reviews.c.image_id.is_(None))
    elif worklist.review is not None:
        stmt = stmt.where(image_reviews.c.state == worklist.review)
    if worklist.reason:
        stmt = stmt.where(job_images.c.failure_reason == worklist.reason)
    return stmt


def _query(worklist: Worklist, position: list[Any] | None, backwards: bool, limit: int) -> sa.Select[Any]:
    keys = _keys(worklist)
    stmt = _base(worklist).add_columns(*(expr.label(f"_k{i}") for i, (expr, _) in enumerate(keys)))
    if position is not None:
        stmt = stmt.where(_after(keys, position, backwards))
    order = [(expr.desc() if descending != backwards else expr.asc()) for expr, descending in keys]
    return stmt.order_by(*order).limit(limit)


def _row(r: sa.Row[Any], nkeys: int) -> Row:
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
        position=[getattr(r, f"_k{i}") for i in range(nkeys)],
    )


def page(
    engine: Engine,
    worklist: Worklist,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = WORKLIST_PAGE,
) -> Page:
    """One page of the worklist: the first, the one after cursor ``after``, or the one before ``before``."""
    nkeys = len(_keys(worklist))
    backwards = before is not None
    cursor = before if backwards else after
    position = decode_cursor(cursor, worklist) if cursor else None
    with engine.connect() as conn:
        rows = [_row(r, nkeys) for r in conn.execute(_query(worklist, position, backwards, limit + 1))]
    more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
        return Page(rows, rows[-1].cursor if rows else None, rows[0].cursor if rows and more else None)
    return Page(
        rows, rows[-1].cursor if rows and more else None, rows[0].cursor if rows and position else None
    )


def find(engine: Engine, worklist: Worklist, job_id: int, image_id: int) -> Row | None:
    """One row of the worklist's job (whatever the filters say), with its position in the worklist order."""
    nkeys = len(_keys(worklist))
    unfiltered = Worklist(job_id=job_id, sort=worklist.sort)
    stmt = _query(unfiltered, None, False, 1).where(
        job_images.c.job_id == job_id, job_images.c.image_id == image_id
    )
    with engine.connect() as conn:
        r = conn.execute(stmt).first()
    return _row(r, nkeys) if r else None


def neighbour(engine: Engine, worklist: Worklist, row: Row, step: int) -> Row | None:
    """The row after (``step`` 1) or before (-1) ``row`` in the worklist."""
    nkeys = len(_keys(worklist))
    with engine.connect() as conn:
        r = conn.execute(_query(worklist, row.position, step < 0, 1)).first()
    return _row(r, nkeys) if r else None
