"""Evaluate a bundle on labelled test data: the paper's tables with CIs, curves, histograms, metrics.json.

Scoring goes through the worker's own path (``preprocess.load_image`` -> ``collate`` ->
``Ensemble.score``), so the reported numbers are those of the screener, not of a re-implementation.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from training.data import LABELS, Sample, class_counts, data_id, load_labelled
from training.metrics import DEFAULT_TABLE_THRESHOLDS, pr_points, roc_points, summarize

log = logging.getLogger(__name__)

ENSEMBLE = "ensemble"
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


def score_samples(
    ensemble: Any, samples: Sequence[Sample], *, batch_size: int = 32, max_pixels: int | None = None
) -> Scored:
    """Score labelled samples with a ``deepcovid.ensemble.Ensemble`` exactly as the worker would."""
    from deepcovid.errors import ImageError
    from deepcovid.preprocess import collate, load_image

    kept: list[Sample] = []
    failed: list[tuple[Sample, str]] = []
    probabilities: dict[str, list[np.ndarray]] = {arch: [] for arch in ensemble.architectures}
    ensemble_scores: list[np.ndarray] = []

    def flush(images: list[np.ndarray]) -> None:
        batch = ensemble.score(collate(images))
        for arch in ensemble.architectures:
            probabilities[arch].append(np.asarray(batch.probabilities[arch]))
        ensemble_scores.append(np.asarray(batch.ensemble_score))

    pending: list[np.ndarray] = []
    for sample in samples:
        try:
            pixels, _info = load_image(sample.path.read_bytes(), name=sample.path.name, max_pixels=max_pixels)
        except ImageError as exc:
            failed.append((sample, exc.reason))
            continue
        except OSError:
            failed.append((sample, "unreadable"))
            continue
        kept.append(sample)
        pending.append(pixels)
        if len(pending) == batch_size:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    thresholds = {**ensemble.thresholds, ENSEMBLE: ensemble.ensemble_threshold}
    return Scored(
        samples=kept,
        labels=np.array([s.label for s in kept], dtype=int),
        probabilities={a: np.concatenate(p) if p else np.empty(0) for a, p in probabilities.items()},
        ensemble_scores=np.concatenate(ensemble_scores) if ensemble_scores else np.empty(0),
        thresholds=thresholds,
        policy=ensemble.policy,
        failed=failed,
    )


def compute_metrics(
    scored: Scored,
    *,
    thresholds: Sequence[float] = DEFAULT_TABLE_THRESHOLDS,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per network and for the ensemble: the paper's table, operating point, AUC, AP, calibration."""
    scorers = {**scored.probabilities, ENSEMBLE: scored.ensemble_scores}
    return {
        name: summarize(
            scored.labels,
            scores,
            scored.thresholds[name],
            thresholds=thresholds,
            n_resamples=n_resamples,
            seed=seed,
        )
        for name, scores in scorers.items()
    }


def evaluate_bundle(
    bundle: Any,
    data: Path | Sequence[Sample],
    out_dir: Path,
    *,
    device: str = "auto",
    batch_size: int = 32,
    record_db: bool = True,
    settings: Any = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score ``data`` with ``bundle``, write report.md, metrics.json and the plots into ``out_dir``.

    With ``record_db`` the metrics are also recorded in the bundle registry (registering the bundle
    first if needed); an unreachable or unmigrated database is reported, not fatal.
    """
    from deepcovid.bundle import Bundle, load_bundle
    from deepcovid.ensemble import Ensemble

    if settings is None:
        from deepcovid.settings import get_settings

        settings = get_settings()
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    source = str(Path(data).resolve()) if isinstance(data, (str, Path)) else None
    samples = load_labelled(Path(data)) if isinstance(data, (str, Path)) else list(data)
    ensemble = Ensemble.from_bundle(bundle, device=device, settings=settings)
    scored = score_samples(ensemble, samples, batch_size=batch_size, max_pixels=settings.max_image_pixels)
    if scored.labels.size == 0:
        raise ValueError("none of the evaluation images could be decoded")
    per_scorer = compute_metrics(scored, n_resamples=n_resamples, seed=seed)
    ensemble_op = per_scorer[ENSEMBLE]["operating_point"]
    metrics: dict[str, Any] = {
        "bundle_id": bundle.bundle_id,
        "eval_data_id": data_id(samples),
        "data_source": source,
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(ensemble.device),
        "precision": ensemble.precision,
        "policy": scored.policy,
        "thresholds": scored.thresholds,
        "n_images": len(samples),
        "n_scored": int(scored.labels.size),
        "counts": class_counts(scored.samples),
        "failed": dict(Counter(reason for _, reason in scored.failed)),
        "operating": {
            "scorer": ENSEMBLE,
            "threshold": ensemble_op["threshold"],
            "sensitivity": ensemble_op["sensitivity"]["value"],
            "specificity": ensemble_op["specificity"]["value"],
            "auc": per_scorer[ENSEMBLE]["roc_auc"]["auc"],
        },
        "models": {k: v for k, v in per_scorer.items() if k != ENSEMBLE},
        "ensemble": per_scorer[ENSEMBLE],
        "caveats": list(CAVEATS),
    }
    metrics = _json_safe(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plots(scored, per_scorer, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_report(metrics, bundle), encoding="utf-8")
    if record_db:
        metrics["recorded"] = record_in_registry(bundle, metrics, settings)
    return metrics


def record_in_registry(bundle: Any, metrics: dict[str, Any], settings: Any) -> bool:
    """Store the evaluation against the bundle in the database; False (with a warning) if it cannot."""
    from training.registry import RegistryUnavailable, open_registry, record_evaluation_for

    try:
        engine = open_registry(settings)
        record_evaluation_for(engine, bundle, metrics, settings=settings)
    except RegistryUnavailable as exc:
        log.warning("evaluation not recorded in the database: %s", exc)
        return False
    return True


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_names(scorers: Sequence[str]) -> list[str]:
    """Every PNG ``write_plots`` produces for these scorers."""
    names = ["roc.png", "pr.png", "calibration.png"]
    for name in scorers:
        names += [f"histogram_{name}.png", f"confusion_{name}.png"]
    return names


def write_plots(scored: Scored, per_scorer: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    y = scored.labels
    scorers = {**scored.probabilities, ENSEMBLE: scored.ensemble_scores}
    written: list[Path] = []
    both_classes = 0 < y.sum() < y.size

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, s in scorers.items():
        if both_classes:
            fpr, tpr, _ = roc_points(y, s)
            auc = per_scorer[name]["roc_auc"]["auc"]
            ax.plot(fpr, tpr, lw=2.5 if name == ENSEMBLE else 1.2, label=f"{name} (AUC {auc:.3f})")
            op = per_scorer[name]["operating_point"]
            sens, spec = op["sensitivity"]["value"], op["specificity"]["value"]
            if sens is not None and spec is not None:
                ax.plot([1 - spec], [sens], "o", color=ax.lines[-1].get_color())
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity",
        title="ROC (dots: operating points)",
    )
    ax.legend(loc="lower right", fontsize=8)
    written.append(_save(fig, out_dir / "roc.png", plt))

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, s in scorers.items():
        if both_classes:
            precision, recall, _ = pr_points(y, s)
            ap = per_scorer[name]["average_precision"]
            ax.plot(recall, precision, lw=2.5 if name == ENSEMBLE else 1.2, label=f"{name} (AP {ap:.3f})")
    ax.axhline(y.mean() if y.size else 0, ls=":", color="grey")
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title="Precision-recall",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower left", fontsize=8)
    written.append(_save(fig, out_dir / "pr.png", plt))

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    for name in scorers:
        cal = per_scorer[name]["calibration"]
        if cal:
            ax.plot(cal["predicted"], cal["observed"], "o-", label=name)
    ax.set(xlabel="mean predicted COVID probability", ylabel="observed COVID fraction", title="Calibration")
    ax.legend(loc="upper left", fontsize=8)
    written.append(_save(fig, out_dir / "calibration.png", plt))

    bins = np.linspace(0, 1, 41)
    for name, s in scorers.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, colour in ((1, "tab:red"), (0, "tab:blue")):
            ax.hist(
                s[y == label],
                bins=bins,
                alpha=0.6,
                color=colour,
                label=f"{LABELS[label]} (n={(y == label).sum()})",
            )
        ax.axvline(
            scored.thresholds[name], color="black", ls="--", label=f"threshold {scored.thresholds[name]:.3f}"
        )
        xlabel = "predicted COVID probability" if name != ENSEMBLE else f"ensemble score ({scored.policy})"
        ax.set(xlabel=xlabel,
               ylabel="images", title=f"{name}: scores by true class")  # fmt: skip
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"histogram_{name}.png", plt))

        matrix = np.array(per_scorer[name]["confusion_matrix"])
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", color="black", fontsize=14)
        ax.set_xticks([0, 1], ["non_covid", "covid"])
        ax.set_yticks([0, 1], ["non_covid", "covid"])
        ax.set(xlabel="predicted", ylabel="true", title=f"{name} @ {scored.thresholds[name]:.3f}")
        written.append(_save(fig, out_dir / f"confusion_{name}.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _rate_cell(rate: dict[str, Any]) -> str:
    if rate["value"] is None:
        return "n/a"
    low, high = rate["wilson"]
    return f"{_pct(rate['value'])} ({rate['successes']}/{rate['n']}; {_pct(low)}-{_pct(high)})"


def render_report(metrics: dict[str, Any], bundle: Any) -> str:
    """report.md: summary across scorers, then the paper's threshold table per scorer."""
    counts = metrics["counts"]
    lines = [
        f"# Evaluation of bundle `{metrics['bundle_id']}`",
        "",
        f"- Data: {metrics['data_source'] or '(given samples)'} — {metrics['n_scored']} images scored "
        f"({counts['covid']} COVID, {counts['non_covid']} non-COVID) of {metrics['n_images']}",
        f"- Evaluation data id: `{metrics['eval_data_id']}`",
        f"- Undecodable images: {sum(metrics['failed'].values())} {metrics['failed'] or ''}".rstrip(),
        f"- Ensemble policy: {metrics['policy']}; device {metrics['device']} ({metrics['precision']}); "
        f"evaluated {metrics['evaluated_at']}",
        "",
        "## Operating points",
        "",
        "| scorer | threshold | sensitivity (95% CI) | specificity (95% CI) | ROC AUC (95% CI) | AP |",
        "|---|---:|---|---|---|---:|",
    ]
    scorers = {**metrics["models"], ENSEMBLE: metrics["ensemble"]}
    for name, m in scorers.items():
        op, auc = m["operating_point"], m["roc_auc"]
        auc_cell = (
            "n/a" if auc["auc"] is None else f"{auc['auc']:.3f} ({auc['ci_low']:.3f}-{auc['ci_high']:.3f})"
        )
        ap = "n/a" if m["average_precision"] is None else f"{m['average_precision']:.3f}"
        lines.append(
            f"| {'**ensemble**' if name == ENSEMBLE else name} | {op['threshold']:.4f} | "
            f"{_rate_cell(op['sensitivity'])} | {_rate_cell(op['specificity'])} | {auc_cell} | {ap} |"
        )
    lines += ["", "![ROC](roc.png) ![Precision-recall](pr.png) ![Calibration](calibration.png)", ""]
    for name, m in scorers.items():
        lines += [
            f"## {name}",
            "",
            "| threshold | sensitivity (95% CI) | specificity (95% CI) | paper-style |",
            "|---:|---|---|---|",
        ]
        for row in m["table"]:
            sens = row["sensitivity"]
            paper = (
                "n/a" if sens["value"] is None else f"{_pct(sens['value'])} ± {100 * sens['normal_pm']:.1f}%"
            )
            marker = " **(operating)**" if row["operating"] else ""
            lines.append(
                f"| {row['threshold']:.4f}{marker} | {_rate_cell(sens)} | "
                f"{_rate_cell(row['specificity'])} | {paper} |"
            )
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        lines += [
            "",
            f"Confusion at the operating threshold: TP {tp}, FN {fn}, TN {tn}, FP {fp}.",
            "",
            f"![{name} histogram](histogram_{name}.png) ![{name} confusion](confusion_{name}.png)",
            "",
        ]
    lines += ["## Caveats", ""] + [f"- {c}" for c in metrics["caveats"]]
    if counts["covid"] < 100:
        lines.append(
            f"- Only {counts['covid']} COVID images: sensitivity intervals are wide; "
            "do not compare bundles on "
            "differences inside them."
        )
    return "\n".join(lines) + "\n"
