"""Evaluate a bundle on labelled test data: the paper's tables with CIs, curves, histograms, metrics.json.

Scoring is the screener's own: ``deepcovid.pipeline.score_chunk`` reading through ``Storage``, so the
reported numbers are those of the worker, not of a re-implementation.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from db.schema import open_database
from deepcovid import defaults
from deepcovid.bundle import Bundle, load_bundle
from deepcovid.ensemble import Ensemble, combine
from deepcovid.errors import UserError
from deepcovid.pipeline import score_chunk
from deepcovid.results import ENSEMBLE_KEY, ImageResult
from deepcovid.settings import Settings, get_settings
from deepcovid.storage import open_storage
from training.calibration import calibration_summary, uncalibrated
from training.data import Sample, class_counts, data_id, decode_samples, load_labelled
from training.gallery import heatmap_review
from training.groups import group_values, metrics_by_group
from training.metrics import strict_json, summarize
from training.registry import record_evaluation_for
from training.report import RELIABILITY, render_report, write_plots, write_reliability
from training.shortcut import source_probe

log = logging.getLogger(__name__)

CAVEATS = (
    "For software testing and research only: not for clinical use.",
    "Intervals are 95%: Wilson score for sensitivity/specificity (Clopper-Pearson exact in metrics.json), "
    "stratified bootstrap for AUC. The paper's +-2.7% is the normal approximation 1.96*sqrt(p(1-p)/n) "
    "at p=0.98, n=100.",
    "Operating thresholds were chosen on the training run's validation split; numbers here are only "
    "unbiased if this data shares no patient with the training or validation data.",
)


@dataclass
class Scored:
    """Scores for the images that decoded; failures are counted by reason, not scored."""

    samples: list[Sample]
    labels: np.ndarray
    probabilities: dict[str, np.ndarray]
    ensemble_scores: np.ndarray
    thresholds: dict[str, float]
    policy: str
    failed: list[tuple[Sample, str]] = field(default_factory=list)
    temperatures: dict[str, float] = field(default_factory=dict)  # per network; 1 where absent

    @property
    def scores(self) -> dict[str, np.ndarray]:
        """Every scorer's scores: each network's, then the ensemble's under ``ENSEMBLE_KEY``."""
        return {**self.probabilities, ENSEMBLE_KEY: self.ensemble_scores}

    @property
    def uncalibrated_scores(self) -> dict[str, np.ndarray]:
        """``scores`` as they would be without temperature scaling (for the before/after comparison)."""
        raw = {
            arch: uncalibrated(p, self.temperatures.get(arch, 1.0)) for arch, p in self.probabilities.items()
        }
        ensemble = combine(raw, self.thresholds, self.policy, self.thresholds[ENSEMBLE_KEY]).ensemble_score
        return {**raw, ENSEMBLE_KEY: ensemble}


def score_samples(
    ensemble: Ensemble,
    samples: Sequence[Sample],
    *,
    batch_size: int | None = None,
    settings: Settings | None = None,
) -> Scored:
    """Score labelled samples exactly as the worker would: ``score_chunk`` reading through ``Storage``.

    Reads are confined to the folder that holds the samples (as a worker's are to its storage roots).
    ``batch_size`` overrides the settings' per-device batch size.
    """
    settings = settings or get_settings()
    if batch_size is not None:
        settings = settings.model_copy(update={"batch_size": batch_size})
    storage = open_storage(settings, extra_roots=[_common_folder(samples)] if samples else ())
    uris = [os.path.abspath(sample.path) for sample in samples]
    results: list[ImageResult] = []
    # Chunks as the producer makes them: decoded images are held only until their chunk is scored.
    for start in range(0, len(uris), defaults.CHUNK_SIZE):
        chunk = uris[start : start + defaults.CHUNK_SIZE]
        results += score_chunk(chunk, storage=storage, ensemble=ensemble, settings=settings)
    return _assemble(ensemble, samples, results)


def _common_folder(samples: Sequence[Sample]) -> str:
    """The deepest folder holding every sample (symbolic links resolved, as ``Storage`` checks them)."""
    return os.path.commonpath([os.path.dirname(os.path.realpath(s.path)) for s in samples])


def _assemble(ensemble: Ensemble, samples: Sequence[Sample], results: Sequence[ImageResult]) -> Scored:
    scored = [(s, r) for s, r in zip(samples, results, strict=True) if r.scored]
    return Scored(
        samples=[s for s, _ in scored],
        labels=np.array([s.label for s, _ in scored], dtype=int),
        probabilities={
            arch: np.array([r.probabilities[arch] for _, r in scored], dtype=np.float64)
            for arch in ensemble.architectures
        },
        ensemble_scores=np.array([r.ensemble_score for _, r in scored], dtype=np.float64),
        thresholds={**ensemble.thresholds, ENSEMBLE_KEY: ensemble.ensemble_threshold},
        policy=ensemble.policy,
        failed=[(s, r.reason or "") for s, r in zip(samples, results, strict=True) if not r.scored],
        temperatures=dict(ensemble.temperatures),
    )


def compute_metrics(
    scored: Scored,
    *,
    thresholds: Sequence[float] = defaults.TABLE_THRESHOLDS,
    n_resamples: int = defaults.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Per network and for the ensemble: the paper's table, operating point, AUC, AP, calibration."""
    return {
        name: summarize(
            scored.labels,
            scores,
            scored.thresholds[name],
            thresholds=thresholds,
            n_resamples=n_resamples,
            seed=seed,
        )
        for name, scores in scored.scores.items()
    }


def evaluate_bundle(
    bundle: Bundle | Path | str,
    data: Path | Sequence[Sample],
    out_dir: Path,
    *,
    device: str = "auto",
    batch_size: int = defaults.EVAL_BATCH_SIZE,
    record_db: bool = True,
    settings: Settings | None = None,
    n_resamples: int = defaults.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    heatmaps: bool = True,
    by: str | None = None,
    probe: bool = True,
) -> dict[str, Any]:
    """Score ``data`` with ``bundle``, write report.md, metrics.json and the plots into ``out_dir``;
    with ``heatmaps``, also a gallery of ensemble heatmaps and their mass at the border
    (``training.gallery``).

    ``by`` names a labels column: the ensemble's metrics per value of it are added, and with ``probe``
    the shortcut probe (``training.shortcut``: how well that column can be read off the networks'
    features).

    With ``record_db`` the metrics are also recorded in the bundle registry (registering the bundle
    first if needed); an unreachable or unmigrated database is reported, not fatal.
    """
    settings = settings or get_settings()
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    source = str(Path(data).resolve()) if isinstance(data, (str, Path)) else None
    samples = load_labelled(Path(data)) if isinstance(data, (str, Path)) else list(data)
    if by is not None:
        group_values(samples, by)  # an unknown column is refused before any scoring
    ensemble = Ensemble.from_bundle(bundle, device=device, settings=settings)
    scored = score_samples(ensemble, samples, batch_size=batch_size, settings=settings)
    if scored.labels.size == 0:
        raise ValueError("none of the evaluation images could be decoded")
    per_scorer = compute_metrics(scored, n_resamples=n_resamples, seed=seed)
    metrics = strict_json(
        {
            "bundle_id": bundle.bundle_id,
            "eval_data_id": data_id(samples),
            "data_source": source,
            "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": str(ensemble.device),
            "precision": ensemble.precision,
            "policy": scored.policy,
            "thresholds": scored.thresholds,
            "temperatures": scored.temperatures,
            "n_images": len(samples),
            "n_scored": int(scored.labels.size),
            "counts": class_counts(scored.samples),
            "failed": dict(Counter(reason for _, reason in scored.failed)),
            "operating": _operating(per_scorer[ENSEMBLE_KEY]),
            "models": {k: v for k, v in per_scorer.items() if k != ENSEMBLE_KEY},
            ENSEMBLE_KEY: per_scorer[ENSEMBLE_KEY],
            "calibration": calibration_summary(
                scored.labels, scored.uncalibrated_scores, scored.scores, scored.temperatures
            ),
            "caveats": list(CAVEATS),
            **({"by": _by_group(scored, ensemble, by, probe, n_resamples, seed)} if by else {}),
        }
    )
    if heatmaps:
        metrics["heatmaps"] = heatmap_review(
            ensemble, scored.samples, scored.labels, scored.probabilities, Path(out_dir), seed=seed
        )
    _write_report(scored, per_scorer, metrics, Path(out_dir))
    if record_db:
        metrics["recorded"] = record_in_registry(bundle, metrics, settings)
    return metrics


def _by_group(
    scored: Scored, ensemble: Ensemble, column: str, probe: bool, n_resamples: int, seed: int
) -> dict[str, Any]:
    """The ensemble's metrics per value of ``column`` and, with ``probe``, the shortcut probe."""
    values = group_values(scored.samples, column)
    rows = metrics_by_group(
        scored.labels,
        scored.ensemble_scores,
        values,
        scored.thresholds[ENSEMBLE_KEY],
        n_resamples=n_resamples,
        seed=seed,
    )
    result: dict[str, Any] = {"column": column, "groups": rows}
    if probe:
        images = decode_samples(scored.samples).images
        networks = {arch: ensemble.networks[arch] for arch in ensemble.architectures}
        result["probe"] = source_probe(networks, images, scored.labels, values, column)
    return result


def _operating(ensemble: dict[str, Any]) -> dict[str, Any]:
    """The headline: the ensemble at its operating threshold."""
    op = ensemble["operating_point"]
    return {
        "scorer": ENSEMBLE_KEY,
        "threshold": op["threshold"],
        "sensitivity": op["sensitivity"]["value"],
        "specificity": op["specificity"]["value"],
        "auc": ensemble["roc_auc"]["auc"],
    }


def _write_report(
    scored: Scored, per_scorer: dict[str, dict[str, Any]], metrics: dict[str, Any], out_dir: Path
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plots(scored.labels, scored.scores, scored.thresholds, scored.policy, per_scorer, out_dir)
    before, calibration = scored.uncalibrated_scores, metrics["calibration"]
    write_reliability(scored.labels, before, scored.scores, calibration, out_dir / RELIABILITY)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_report(metrics), encoding="utf-8")


def record_in_registry(bundle: Bundle, metrics: dict[str, Any], settings: Settings) -> bool:
    """Store the evaluation against the bundle in the database; False (with a warning) if it cannot."""
    try:
        engine = open_database(settings, write=True)
    except UserError as exc:
        log.warning("evaluation not recorded in the database: %s", exc.message)
        return False
    record_evaluation_for(engine, bundle, metrics, settings=settings)
    return True
