"""Metrics per group of a labels column (source, view, finding, sex, age band): where the score comes from.

One row per value of the column: sensitivity and specificity at the bundle's operating threshold with
Wilson intervals, and ROC AUC with a stratified bootstrap interval (undefined where a group holds one
class only, as a source that holds only COVID images does: that is worth seeing too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepcovid import defaults
from training.data import Sample
from training.metrics import auc_with_ci, operating_point

MISSING = "(blank)"


def group_values(samples: Sequence[Sample], column: str) -> list[str]:
    """Each sample's value in ``column`` (``MISSING`` when blank); DataError-style ValueError when no
    sample has the column at all (folder data, or a misspelt name)."""
    known = {name for s in samples for name, _ in s.columns}
    if column not in known:
        names = ", ".join(sorted(known)) or "none: evaluate a CSV such as labels.csv"
        raise ValueError(f"--by: no column {column!r} in the labels (columns: {names})")
    return [s.column(column) or MISSING for s in samples]


def metrics_by_group(
    labels: np.ndarray,
    scores: np.ndarray,
    values: Sequence[str],
    threshold: float,
    *,
    n_resamples: int = defaults.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows per group value (largest group first) for the ensemble ``scores`` at ``threshold``."""
    values = np.asarray(values)
    rows = []
    for value in sorted(set(values.tolist()), key=lambda v: (-int(np.sum(values == v)), v)):
        mask = values == value
        y, s = labels[mask], scores[mask]
        op = operating_point(y, s, threshold)
        rows.append(
            {
                "value": value,
                "n": int(mask.sum()),
                "n_covid": int(y.sum()),
                "n_non_covid": int((y == 0).sum()),
                "sensitivity": op["sensitivity"],
                "specificity": op["specificity"],
                "roc_auc": auc_with_ci(y, s, n_resamples=n_resamples, seed=seed),
            }
        )
    return rows
