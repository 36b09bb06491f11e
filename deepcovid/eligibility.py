"""Which DICOM images are scored at all: frontal chest projection radiographs, by their header.

The networks learned frontal (PA/AP) chest radiographs; a lateral view, a knee or a CT slice would get a
score that means nothing. The rules read Modality, BodyPartExamined, ViewPosition and SeriesDescription
before any pixel is decoded, for DICOMs from every source (files, S3, a PACS), and a refused image fails
as ``not_eligible`` with the rule that matched. The detail names the rule and the attribute's coded value
(never free text: a SeriesDescription is reported by the word of the rule, not quoted).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deepcovid.errors import DecodeError

if TYPE_CHECKING:
    from deepcovid.settings import Settings


@dataclass(frozen=True)
class Eligibility:
    """The rules (each from its DEEPCOVID_* setting); an empty entry stands for a missing attribute."""

    modalities: frozenset[str]
    body_parts: frozenset[str]
    views: frozenset[str]  # ineligible ViewPosition values
    series_words: tuple[str, ...]  # ineligible words of SeriesDescription

    @classmethod
    def from_settings(cls, settings: Settings) -> Eligibility | None:
        """The configured rules, or None when DEEPCOVID_ELIGIBILITY=false."""
        if not settings.eligibility:
            return None
        return cls(
            frozenset(settings.eligible_modalities),
            frozenset(settings.eligible_body_parts),
            frozenset(settings.ineligible_views),
            tuple(w for w in settings.ineligible_series_words if w),
        )

    def check(self, attribute: Callable[[str], str]) -> None:
        """Raise ``not_eligible`` naming the first rule the header breaks; ``attribute(keyword)`` gives
        an attribute's value ("" when absent)."""
        modality = _code(attribute("Modality"))
        if self.modalities and modality not in self.modalities:
            raise _refused("modality", "DEEPCOVID_ELIGIBLE_MODALITIES", modality)
        body_part = _code(attribute("BodyPartExamined"))
        if self.body_parts and body_part not in self.body_parts:
            raise _refused("body part", "DEEPCOVID_ELIGIBLE_BODY_PARTS", body_part)
        view = _code(attribute("ViewPosition"))
        if view in self.views:
            raise _refused("view position", "DEEPCOVID_INELIGIBLE_VIEWS", view)
        words = set(re.split(r"[^A-Z0-9]+", attribute("SeriesDescription").upper()))
        for word in self.series_words:
            if word in words:
                raise DecodeError(
                    "not_eligible",
                    f"rule DEEPCOVID_INELIGIBLE_SERIES_WORDS: the series description has the word {word}",
                )


def _code(value: str) -> str:
    """A code string as compared: trimmed, upper case, at most 16 characters (the CS limit)."""
    return value.strip().upper()[:16]


def _refused(what: str, setting: str, value: str) -> DecodeError:
    shown = value if re.fullmatch(r"[A-Z0-9 _]*", value) else "(not a code string)"
    return DecodeError("not_eligible", f"rule {setting}: {what} {shown or '(missing)'}")
