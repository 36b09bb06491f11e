"""The evaluation report: report.md and its plots (ROC, precision-recall, calibration, reliability before
and after temperature scaling, histograms, confusion matrices), drawn from the scores and the metrics
``training.evaluate`` computed.

Plots are drawn on matplotlib ``Figure`` objects, not pyplot: no global figure state, no GUI backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deepcovid.results import ENSEMBLE_KEY
from training.calibration import ECE_BINS, reliability_bins
from training.data import LABELS
from training.metrics import pr_points, roc_points

Scores = Mapping[str, np.ndarray]  # per scorer (each network, then ENSEMBLE_KEY), one score per image
RELIABILITY = "reliability.png"


def plot_names(scorers: Sequence[str]) -> list[str]:
    """Every PNG of a report for these scorers: ``write_plots``'s, and ``write_reliability``'s."""
    names = ["roc.png", "pr.png", "calibration.png", RELIABILITY]
    for name in scorers:
        names += [f"histogram_{name}.png", f"confusion_{name}.png"]
    return names


def write_plots(
    labels: np.ndarray,
    scores: Scores,
    thresholds: Mapping[str, float],
    policy: str,
    per_scorer: Mapping[str, dict[str, Any]],
    out_dir: Path,
) -> list[Path]:
    """Draw every plot of ``plot_names`` into ``out_dir``; returns the files written."""
    written = [
        _roc(labels, scores, per_scorer, out_dir / "roc.png"),
        _precision_recall(labels, scores, per_scorer, out_dir / "pr.png"),
        _calibration(scores, per_scorer, out_dir / "calibration.png"),
    ]
    for name, s in scores.items():
        written.append(
            _histogram(name, labels, s, thresholds[name], policy, out_dir / f"histogram_{name}.png")
        )
        matrix = np.array(per_scorer[name]["confusion_matrix"])
        written.append(_confusion(name, matrix, thresholds[name], out_dir / f"confusion_{name}.png"))
    return written


def _both_classes(labels: np.ndarray) -> bool:
    return bool(0 < labels.sum() < labels.size)


def _roc(labels: np.ndarray, scores: Scores, per_scorer: Mapping[str, dict[str, Any]], path: Path) -> Path:
    fig, ax = _figure(6, 6)
    for name, s in scores.items():
        if _both_classes(labels):
            fpr, tpr, _ = roc_points(labels, s)
            auc = per_scorer[name]["roc_auc"]["auc"]
            ax.plot(fpr, tpr, lw=2.5 if name == ENSEMBLE_KEY else 1.2, label=f"{name} (AUC {auc:.3f})")
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
    return _save(fig, path)


def _precision_recall(
    labels: np.ndarray, scores: Scores, per_scorer: Mapping[str, dict[str, Any]], path: Path
) -> Path:
    fig, ax = _figure(6, 6)
    for name, s in scores.items():
        if _both_classes(labels):
            precision, recall, _ = pr_points(labels, s)
            ap = per_scorer[name]["average_precision"]
            ax.plot(recall, precision, lw=2.5 if name == ENSEMBLE_KEY else 1.2, label=f"{name} (AP {ap:.3f})")
    ax.axhline(labels.mean() if labels.size else 0, ls=":", color="grey")
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title="Precision-recall",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _calibration(scores: Scores, per_scorer: Mapping[str, dict[str, Any]], path: Path) -> Path:
    fig, ax = _figure(6, 6)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    for name in scores:
        cal = per_scorer[name]["calibration"]
        if cal:
            ax.plot(cal["predicted"], cal["observed"], "o-", label=name)
    ax.set(xlabel="mean predicted COVID probability", ylabel="observed COVID fraction", title="Calibration")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def write_reliability(
    labels: np.ndarray,
    before: Scores,
    after: Scores,
    calibration: Mapping[str, Mapping[str, Any]],
    path: Path,
) -> Path:
    """Reliability diagrams (``ECE_BINS`` equal-width bins), one panel per scorer: observed COVID fraction
    against mean predicted probability, before and after temperature scaling, with both ECEs."""
    names = list(after)
    fig = Figure(figsize=(4 * len(names), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names, strict=True):
        ax.plot([0, 1], [0, 1], ls=":", color="grey")
        cal = calibration.get(name, {})
        for scores, key, style, label in (
            (before, "ece_before", "s--", "before"),
            (after, "ece_after", "o-", "after"),
        ):
            bins = reliability_bins(labels, scores[name])
            ax.plot(bins["predicted"], bins["observed"], style, label=f"{label} (ECE {_ece(cal.get(key))})")
        temperature = cal.get("temperature")
        title = name if temperature is None else f"{name} (T = {temperature:.3f})"
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted COVID probability", title=title)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel(f"observed COVID fraction ({ECE_BINS} bins)")
    return _save(fig, path)


def _ece(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _histogram(
    name: str, labels: np.ndarray, s: np.ndarray, threshold: float, policy: str, path: Path
) -> Path:
    fig, ax = _figure(7, 4)
    bins = np.linspace(0, 1, 41)
    for label, colour in ((1, "tab:red"), (0, "tab:blue")):
        ax.hist(
            s[labels == label],
            bins=bins,
            alpha=0.6,
            color=colour,
            label=f"{LABELS[label]} (n={(labels == label).sum()})",
        )
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3f}")
    xlabel = "predicted COVID probability" if name != ENSEMBLE_KEY else f"ensemble score ({policy})"
    ax.set(xlabel=xlabel, ylabel="images", title=f"{name}: scores by true class")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _confusion(name: str, matrix: np.ndarray, threshold: float, path: Path) -> Path:
    fig, ax = _figure(4, 4)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black", fontsize=14)
    ax.set_xticks([0, 1], ["non_covid", "covid"])
    ax.set_yticks([0, 1], ["non_covid", "covid"])
    ax.set(xlabel="predicted", ylabel="true", title=f"{name} @ {threshold:.3f}")
    return _save(fig, path)


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _rate_cell(rate: dict[str, Any]) -> str:
    if rate["value"] is None:
        return "n/a"
    low, high = rate["wilson"]
    return f"{_pct(rate['value'])} ({rate['successes']}/{rate['n']}; {_pct(low)}-{_pct(high)})"


def render_report(metrics: Mapping[str, Any]) -> str:
    """report.md: summary across scorers, then the paper's threshold table per scorer."""
    scorers = {**metrics["models"], ENSEMBLE_KEY: metrics[ENSEMBLE_KEY]}
    lines = _summary(metrics, scorers)
    lines += _calibration_section(metrics.get("calibration"))
    lines += _heatmap_section(metrics.get("heatmaps"))
    lines += _group_section(metrics.get("by"))
    for name, m in scorers.items():
        lines += _scorer_section(name, m)
    lines += _caveats(metrics)
    return "\n".join(lines) + "\n"


def _summary(metrics: Mapping[str, Any], scorers: Mapping[str, dict[str, Any]]) -> list[str]:
    """The title, what was evaluated, and one operating-point row per scorer."""
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
    for name, m in scorers.items():
        op, auc = m["operating_point"], m["roc_auc"]
        auc_cell = _auc_cell(auc)
        ap = "n/a" if m["average_precision"] is None else f"{m['average_precision']:.3f}"
        lines.append(
            f"| {'**ensemble**' if name == ENSEMBLE_KEY else name} | {op['threshold']:.4f} | "
            f"{_rate_cell(op['sensitivity'])} | {_rate_cell(op['specificity'])} | {auc_cell} | {ap} |"
        )
    lines += ["", "![ROC](roc.png) ![Precision-recall](pr.png) ![Calibration](calibration.png)", ""]
    return lines


def _calibration_section(calibration: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
    """Each scorer's temperature and its ECE before and after temperature scaling."""
    if not calibration:
        return []
    lines = [
        "## Calibration",
        "",
        f"Temperature scaling (fitted on validation), ECE over {ECE_BINS} equal-width bins on this data.",
        "",
        "| scorer | temperature | ECE before | ECE after |",
        "|---|---:|---:|---:|",
    ]
    for name, c in calibration.items():
        t = "-" if c.get("temperature") is None else f"{c['temperature']:.3f}"
        label = "**ensemble**" if name == ENSEMBLE_KEY else name
        lines.append(f"| {label} | {t} | {_ece(c.get('ece_before'))} | {_ece(c.get('ece_after'))} |")
    return lines + ["", f"![Reliability]({RELIABILITY})", ""]


def _heatmap_section(heatmaps: Mapping[str, Any] | None) -> list[str]:
    """Where the ensemble looked: heatmap mass at the border and top corners per class, and the gallery."""
    if not heatmaps:
        return []
    border, corner = heatmaps["border_fraction"], heatmaps["corner_fraction"]
    uniform = heatmaps["uniform"]
    lines = [
        "## Where the networks looked (Grad-CAM)",
        "",
        f"Share of the ensemble heatmap's mass in the outer {border:.0%} border of the crop the networks "
        f"see, and in its two top corner squares ({corner:.0%} of the side), where labels and markers "
        f"sit; mean over a random sample of at most {heatmaps['sample_per_class']} images per class. "
        f"A map spread evenly would give {_pct(uniform['border'])} and {_pct(uniform['top_corners'])}: "
        "much more than that means the networks look at text and borders rather than the lungs.",
        "",
        "| class | images | border | top corners |",
        "|---|---:|---:|---:|",
    ]
    for name, m in heatmaps["mass"].items():
        lines.append(f"| {name} | {m['n']} | {_pct(m['border'])} | {_pct(m['top_corners'])} |")
    lines += ["", "Gallery: ensemble heatmaps over the images (opaque names; scores are the ensemble's).", ""]
    for kind, title in (("tp", "True positives"), ("fp", "False positives"), ("fn", "False negatives")):
        shown = [g for g in heatmaps["gallery"] if g["kind"] == kind]
        images = " ".join(f"![{g['kind']} {g['score']:.3f}]({g['file']})" for g in shown)
        lines += [f"**{title}** ({len(shown)}): {images or 'none'}", ""]
    return lines


def _auc_cell(auc: Mapping[str, Any]) -> str:
    if auc["auc"] is None:
        return "n/a"
    return f"{auc['auc']:.3f} ({auc['ci_low']:.3f}-{auc['ci_high']:.3f})"


def _group_section(by: Mapping[str, Any] | None) -> list[str]:
    """The ensemble per value of a labels column, then the shortcut probe on that column."""
    if not by:
        return []
    column = by["column"]
    lines = [
        f"## By {column}",
        "",
        "The ensemble at its operating threshold on each group (AUC is undefined where a group holds one "
        "class only).",
        "",
        f"| {column} | images (COVID / non-COVID) | sensitivity (95% CI) | specificity (95% CI) | "
        "ROC AUC (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for row in by["groups"]:
        lines.append(
            f"| {row['value']} | {row['n']} ({row['n_covid']} / {row['n_non_covid']}) | "
            f"{_rate_cell(row['sensitivity'])} | {_rate_cell(row['specificity'])} | "
            f"{_auc_cell(row['roc_auc'])} |"
        )
    return lines + [""] + _probe_section(by.get("probe"))


def _probe_section(probe: Mapping[str, Any] | None) -> list[str]:
    if not probe:
        return []
    column = probe["column"]
    lines = [
        f"### Shortcut probe: can {column} be read off the networks' features?",
        "",
        f"Cross-validated ({probe['folds']}-fold) ROC AUC of a logistic regression on each network's "
        f"penultimate features. Near 0.5 within a class: the features do not tell the {column} values "
        f"apart there. Near 1.0: they encode {column}, and where the classes come from different values of "
        "it, part of the score can be that rather than the disease.",
        "",
        f"| network | label | {column} (all) | {column} within non-COVID | {column} within COVID |",
        "|---|---:|---:|---:|---:|",
    ]
    for arch, m in probe["networks"].items():
        within = m["column_auc_within_class"]
        cells = [m["label_auc"], m["column_auc"], within.get("non_covid"), within.get("covid")]
        lines.append(f"| {arch} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in cells) + " |")
    return lines + [""]


def _scorer_section(name: str, m: Mapping[str, Any]) -> list[str]:
    """One scorer's threshold table (the paper's layout), its confusion counts and its plots."""
    lines = [
        f"## {name}",
        "",
        "| threshold | sensitivity (95% CI) | specificity (95% CI) | paper-style |",
        "|---:|---|---|---|",
    ]
    for row in m["table"]:
        sens = row["sensitivity"]
        paper = "n/a" if sens["value"] is None else f"{_pct(sens['value'])} ± {100 * sens['normal_pm']:.1f}%"
        marker = " **(operating)**" if row["operating"] else ""
        lines.append(
            f"| {row['threshold']:.4f}{marker} | {_rate_cell(sens)} | "
            f"{_rate_cell(row['specificity'])} | {paper} |"
        )
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    return lines + [
        "",
        f"Confusion at the operating threshold: TP {tp}, FN {fn}, TN {tn}, FP {fp}.",
        "",
        f"![{name} histogram](histogram_{name}.png) ![{name} confusion](confusion_{name}.png)",
        "",
    ]


def _caveats(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Caveats", ""] + [f"- {c}" for c in metrics["caveats"]]
    covid = metrics["counts"]["covid"]
    if covid < 100:
        lines.append(
            f"- Only {covid} COVID images: sensitivity intervals are wide; "
            "do not compare bundles on "
            "differences inside them."
        )
    return lines
