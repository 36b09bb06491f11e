"""The evaluation report's heatmap statistics: border and top-corner mass, and the gallery's picks."""

from __future__ import annotations

import numpy as np
import pytest

from training.gallery import mass_shares, pick, region_masks


def test_region_masks_cover_the_border_and_the_top_corners() -> None:
    masks = region_masks(100)
    assert masks["border"].mean() == pytest.approx(1 - 0.8**2)  # a 10% border on each side
    assert masks["top_corners"].sum() == 2 * 20 * 20 and not masks["top_corners"][50:].any()


def test_mass_shares_of_a_label_in_a_corner_and_of_a_lung_in_the_middle() -> None:
    label = np.zeros((224, 224), np.float32)
    label[2:20, 5:30] = 1.0  # burned-in text at the top left
    assert mass_shares(label) == {"border": 1.0, "top_corners": 1.0}
    lung = np.zeros((224, 224), np.float32)
    lung[60:160, 50:110] = 1.0
    assert mass_shares(lung) == {"border": 0.0, "top_corners": 0.0}
    assert mass_shares(np.zeros((224, 224), np.float32)) == {"border": 0.0, "top_corners": 0.0}


def test_the_gallery_shows_the_most_confident_mistakes_and_hits() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1])
    scores = np.array([0.9, 0.7, 0.2, 0.8, 0.3, 0.6, 0.1])
    picked = pick(labels, scores, scores >= 0.5, per_kind=2)
    assert picked == {"tp": [0, 1], "fp": [3, 5], "fn": [6, 2]}
