"""Keyset pages: every order walks all rows once, forwards and back, whatever the page size; filters hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deepcovid.status import Role, Verdict
from review import worklist
from review.accounts import add_user
from review.verdicts import record_verdict
from review.worklist import BadQuery, Worklist
from tests.review.conftest import PASSWORD, seed_job

# Ties on purpose: equal scores and disagreements must still page without loss or repetition.
SCORES = {f"img{i:02d}.png": (round((i * 37 % 23) / 23, 2), round((i % 4) / 10, 2)) for i in range(23)}


@pytest.fixture
def job(migrated_engine: Any, tmp_path: Path) -> Any:
    return seed_job(migrated_engine, tmp_path / "archive", "ab" * 32, SCORES)


def _walk(engine: Any, wl: Worklist, size: int) -> list[tuple[int, int]]:
    seen, cursor = [], None
    while True:
        page = worklist.page(engine, wl, after=cursor, limit=size)
        seen += [(r.job_id, r.image_id) for r in page.rows]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


@pytest.mark.parametrize("sort", list(worklist.SORTS))
def test_every_order_pages_through_all_rows_once_both_ways(migrated_engine: Any, job: Any, sort: str) -> None:
    wl = Worklist(job_id=job.job_id, sort=sort)
    whole = [(r.job_id, r.image_id) for r in worklist.page(migrated_engine, wl, limit=1000).rows]
    assert len(whole) == len(SCORES) + 1  # and the failed image
    for size in (1, 5, 7):
        assert _walk(migrated_engine, wl, size) == whole
    # Back from the last page to the first.
    last = worklist.page(migrated_engine, wl, after=worklist.page(migrated_engine, wl, limit=20).next_cursor)
    back = worklist.page(migrated_engine, wl, before=last.rows[0].cursor, limit=20)
    assert [(r.job_id, r.image_id) for r in back.rows] == whole[:20]
    assert back.previous_cursor is None


def test_flagged_first_then_by_score(migrated_engine: Any, job: Any) -> None:
    rows = worklist.page(migrated_engine, Worklist(job_id=job.job_id), limit=1000).rows
    decisions = [bool(r.ensemble_decision) for r in rows]
    assert decisions == sorted(decisions, reverse=True)
    flagged = [r.ensemble_score for r in rows if r.ensemble_decision]
    assert flagged == sorted(flagged, reverse=True)


def test_neighbours_follow_the_order(migrated_engine: Any, job: Any) -> None:
    wl = Worklist(job_id=job.job_id, sort="uncertain")
    rows = worklist.page(migrated_engine, wl, limit=1000).rows
    third = worklist.find(migrated_engine, wl, job.job_id, rows[2].image_id)
    assert worklist.neighbour(migrated_engine, wl, third, 1).image_id == rows[3].image_id
    assert worklist.neighbour(migrated_engine, wl, third, -1).image_id == rows[1].image_id
    assert worklist.neighbour(migrated_engine, wl, rows[0], -1) is None


def test_review_state_filters(migrated_engine: Any, job: Any) -> None:
    rex = add_user(migrated_engine, "rex", PASSWORD, Role.reviewer)
    bea = add_user(migrated_engine, "bea", PASSWORD, Role.reviewer)
    first, second = job.ids["img00.png"], job.ids["img01.png"]
    record_verdict(migrated_engine, rex, first, job.bundle_id, Verdict.covid)
    record_verdict(migrated_engine, bea, first, job.bundle_id, Verdict.covid)
    record_verdict(migrated_engine, rex, second, job.bundle_id, Verdict.covid)
    record_verdict(migrated_engine, bea, second, job.bundle_id, Verdict.indeterminate)

    def ids(**filters: Any) -> set[int]:
        wl = Worklist(job_id=job.job_id, **filters)
        return {r.image_id for r in worklist.page(migrated_engine, wl, limit=1000).rows}

    assert ids(review="reviewed") == {first}
    assert ids(review="disputed") == {second}
    assert first not in ids(review="unreviewed") and len(ids(review="unreviewed")) == len(SCORES) - 1


def test_bad_parameters_and_cursors_are_refused(migrated_engine: Any, job: Any) -> None:
    with pytest.raises(BadQuery):
        Worklist.from_params(1, {"review": "maybe"})
    with pytest.raises(BadQuery):
        Worklist(sort="random")
    wl = Worklist(job_id=job.job_id, sort="date")
    for cursor in ("!!!", "WzEsMl0", worklist.encode_cursor([["x"], 1, 2])):
        with pytest.raises(BadQuery):
            worklist.page(migrated_engine, wl, after=cursor)
