"""Helpers for the db tests: building ImageResults and jobs quickly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from deepcovid.results import ImageResult

ARCHS = ("resnet18", "resnet50", "squeezenet1_1", "densenet121")


def scored_result(uri: str, score: float = 0.2, *, threshold: float = 0.5, **info: Any) -> ImageResult:
    """A scored result whose four networks all say ``score`` (decision at ``threshold``)."""
    return ImageResult(
        uri=uri,
        status="scored",
        probabilities={arch: score for arch in ARCHS},
        decisions={arch: score >= threshold for arch in ARCHS},
        ensemble_score=score,
        ensemble_decision=score >= threshold,
        disagreement=0.0,
        thresholds={**{arch: threshold for arch in ARCHS}, "ensemble": threshold},
        info=dict(info),
        size=1234,
    )


@pytest.fixture
def make_scored() -> Callable[..., ImageResult]:
    return scored_result
