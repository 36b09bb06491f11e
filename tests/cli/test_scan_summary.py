"""``screen``'s closing summary read by people: rounded scores, whole URIs, the job's flagged count."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from cli.scan import print_screen_summary
from producer.screen import ScreenSummary

LONG_URI = "/archive/" + "emergency-department-exports/" * 4 + "patient-0042/image-0001.dcm"


@pytest.fixture(autouse=True)
def _narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def _summary(**fields: object) -> ScreenSummary:
    values: dict = {
        "job_id": 7,
        "bundle_id": "cxr-3802f45d",
        "database_url": "sqlite:////data/deepcovid.db",
        "listed": 1_250,
        "to_score": 1_000,
        "skipped": 250,
        "scored": 990,
        "failed": Counter({"truncated": 10}),
        "flagged_now": 2,
        "flagged": 5,
        "top_flagged": [(2 / 3, LONG_URI), (1 / 3, "/archive/b.png")],
    }
    values.update(fields)
    return ScreenSummary(**values)


def test_the_summary_rounds_scores_and_keeps_uris_whole_when_piped(capsys: pytest.CaptureFixture) -> None:
    print_screen_summary(_summary())
    out = capsys.readouterr().out
    assert any(LONG_URI in line for line in out.splitlines())
    assert "0.667" in out and "0.333" in out
    assert not re.search(r"\d\.\d{4,}", out) and "…" not in out
    assert "listed 1,250; already scored 250; scored now 990; failed 10" in out
    assert "/data/deepcovid.db" in out


def test_the_summary_gives_the_jobs_flagged_count_and_this_runs_share(capsys: pytest.CaptureFixture) -> None:
    print_screen_summary(_summary())
    assert "flagged COVID-positive 5 (2 of them scored now)" in capsys.readouterr().out
    print_screen_summary(_summary(skipped=0, flagged_now=5))  # a first run: nothing to explain
    out = capsys.readouterr().out
    assert "flagged COVID-positive 5" in out and "scored now)" not in out
