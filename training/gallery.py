"""Where the networks looked, for the evaluation report: a gallery of ensemble heatmaps (the top true
positives, false positives and false negatives) and, per class, the share of heatmap mass in the outer
border and in the top corners, where labels and markers sit.

The maps are the screener's own (``deepcovid.explain``: the ensemble as the worker runs it). The cost is
bounded: only the gallery's images and a capped sample per class are explained. Gallery files get opaque
names (``tp-1.png``); no file name of the data set appears in them or in the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepcovid import defaults
from deepcovid.batches import collate
from deepcovid.ensemble import Ensemble, combine
from deepcovid.errors import DecodeError
from deepcovid.explain import explain_batch, explain_bytes
from deepcovid.overlay import overlay_png
from deepcovid.preprocess import load_image
from deepcovid.results import ENSEMBLE_KEY
from training.data import LABELS, Sample

GALLERY_DIR = "gallery"
KINDS = {"tp": "true positive", "fp": "false positive", "fn": "false negative"}


def region_masks(size: int = 224) -> dict[str, np.ndarray]:
    """Boolean masks of the map: the outer border and the two top corner squares."""
    border = max(1, round(size * defaults.HEATMAP_BORDER))
    corner = max(1, round(size * defaults.HEATMAP_CORNER))
    outer = np.ones((size, size), dtype=bool)
    outer[border:-border, border:-border] = False
    corners = np.zeros((size, size), dtype=bool)
    corners[:corner, :corner] = True
    corners[:corner, -corner:] = True
    return {"border": outer, "top_corners": corners}


def mass_shares(heat: np.ndarray) -> dict[str, float]:
    """The share of one map's total in each region of ``region_masks`` (0 for an empty map)."""
    total = float(heat.sum())
    masks = region_masks(heat.shape[0])
    return {name: (float(heat[mask].sum()) / total if total > 0 else 0.0) for name, mask in masks.items()}


def pick(
    labels: np.ndarray, scores: np.ndarray, decisions: np.ndarray, per_kind: int
) -> dict[str, list[int]]:
    """Indices of the gallery: the most confident true positives and false positives (highest score first)
    and the most confidently missed positives (lowest score first)."""
    order = np.argsort(-scores, kind="stable")
    tp = [int(i) for i in order if labels[i] == 1 and decisions[i]]
    fp = [int(i) for i in order if labels[i] == 0 and decisions[i]]
    fn = [int(i) for i in order[::-1] if labels[i] == 1 and not decisions[i]]
    return {"tp": tp[:per_kind], "fp": fp[:per_kind], "fn": fn[:per_kind]}


def heatmap_review(
    ensemble: Ensemble,
    samples: Sequence[Sample],
    labels: np.ndarray,
    probabilities: dict[str, np.ndarray],
    out_dir: Path,
    *,
    per_kind: int = defaults.GALLERY_PER_KIND,
    sample_per_class: int = defaults.HEATMAP_MASS_SAMPLE,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the gallery's overlays into ``out_dir/gallery`` and measure heatmap mass per class; returns
    the report's ``heatmaps`` section (file names relative to ``out_dir``)."""
    scored = combine(probabilities, ensemble.thresholds, ensemble.policy, ensemble.ensemble_threshold)
    scores, decisions = scored.ensemble_score, scored.ensemble_decision
    gallery_dir = out_dir / GALLERY_DIR
    gallery_dir.mkdir(parents=True, exist_ok=True)
    gallery: list[dict[str, Any]] = []
    for kind, indices in pick(labels, scores, decisions, per_kind).items():
        for n, i in enumerate(indices, 1):
            name = f"{GALLERY_DIR}/{kind}-{n}.png"
            try:
                explained = explain_bytes(ensemble, samples[i].path.read_bytes())
            except (OSError, DecodeError):
                continue
            caption = f"{KINDS[kind]}, ensemble score {float(scores[i]):.3f}"
            heat = explained.explanation.maps[ENSEMBLE_KEY]
            png = overlay_png(explained.pixels, heat, explained.geometry, caption=caption, max_side=512)
            (out_dir / name).write_bytes(png)
            gallery.append({"kind": kind, "file": name, "score": float(scores[i])})
    return {
        "gallery": gallery,
        "mass": _mass_by_class(ensemble, samples, labels, sample_per_class, seed),
        "sample_per_class": sample_per_class,
        "border_fraction": defaults.HEATMAP_BORDER,
        "corner_fraction": defaults.HEATMAP_CORNER,
        "uniform": {name: float(mask.mean()) for name, mask in region_masks().items()},
    }


def _mass_by_class(
    ensemble: Ensemble, samples: Sequence[Sample], labels: np.ndarray, cap: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Per class: the mean share of ensemble-map mass in each region over a capped random sample."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for label, name in enumerate(LABELS):
        members = np.flatnonzero(labels == label)
        chosen = rng.choice(members, size=min(cap, members.size), replace=False) if members.size else []
        shares: list[dict[str, float]] = []
        for start in range(0, len(chosen), defaults.EVAL_BATCH_SIZE):
            inputs = []
            for i in chosen[start : start + defaults.EVAL_BATCH_SIZE]:
                try:
                    inputs.append(load_image(samples[int(i)].path.read_bytes())[0])
                except (OSError, DecodeError):
                    continue
            if inputs:
                shares += [
                    mass_shares(e.maps[ENSEMBLE_KEY]) for e in explain_batch(ensemble, collate(inputs))
                ]
        out[name] = {
            "n": len(shares),
            **{
                region: (float(np.mean([s[region] for s in shares])) if shares else None)
                for region in region_masks()
            },
        }
    return out
