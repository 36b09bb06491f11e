"""Registering bundles, recording their evaluations, and the promotion gate.

A bundle's registry ``metrics`` hold one compact summary per evaluation data set, keyed by
``eval_data_id`` (sha256 of the sorted (name, label) list), so a candidate is only ever compared
with the active bundle on the very same images. Promotion refuses a candidate whose ensemble
sensitivity at its operating threshold is lower than the active bundle's on shared evaluation data,
or that has no evaluation on the active bundle's data at all; ``force`` overrides both. Registering
never activates a bundle, not even the first one: activation is always an explicit decision.
Old predictions keep naming the bundle that made them; nothing here deletes or rewrites them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from db.models import BundleRecord
from db.registry import (
    UnknownBundle,
    active_bundle,
    get_bundle,
    record_evaluation,
    register_bundle,
    set_active,
)
from deepcovid.bundle import Bundle, install_bundle
from deepcovid.results import ENSEMBLE_KEY
from deepcovid.settings import Settings
from deepcovid.untrained import is_untrained


class PromotionRefused(RuntimeError):
    """The candidate bundle did not pass the promotion gate (use --force to override)."""


def register(engine: Engine, bundle: Bundle, *, settings: Settings) -> Path:
    """Install the verified bundle into the bundles directory and record it; returns the installed path."""
    installed = install_bundle(bundle, settings.effective_bundles_dir)
    register_bundle(engine, bundle_id=bundle.bundle_id, manifest=bundle.manifest, path=str(installed))
    return installed


def evaluation_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The part of an evaluation's metrics.json worth keeping in the database."""
    ensemble = metrics[ENSEMBLE_KEY]
    op = ensemble["operating_point"]
    return {
        "eval_data_id": metrics["eval_data_id"],
        "data_source": metrics.get("data_source"),
        "evaluated_at": metrics.get("evaluated_at"),
        "n_scored": metrics.get("n_scored"),
        "counts": metrics.get("counts"),
        "operating": metrics["operating"],
        ENSEMBLE_KEY: {
            "threshold": op["threshold"],
            "sensitivity": op["sensitivity"],
            "specificity": op["specificity"],
            "roc_auc": ensemble["roc_auc"],
            "average_precision": ensemble["average_precision"],
        },
        "models": {
            arch: {
                "threshold": m["operating_point"]["threshold"],
                "sensitivity": m["operating_point"]["sensitivity"]["value"],
                "specificity": m["operating_point"]["specificity"]["value"],
                "auc": m["roc_auc"]["auc"],
            }
            for arch, m in metrics["models"].items()
        },
    }


def record_evaluation_for(
    engine: Engine, bundle: Bundle, metrics: dict[str, Any], *, settings: Settings
) -> None:
    """Add this evaluation to the bundle's registry record, registering the bundle first if needed."""
    try:
        record = get_bundle(engine, bundle.bundle_id)
    except UnknownBundle:
        register(engine, bundle, settings=settings)
        record = get_bundle(engine, bundle.bundle_id)
    stored = dict(record.metrics or {})
    evaluations = dict(stored.get("evaluations") or {})
    evaluations[metrics["eval_data_id"]] = evaluation_summary(metrics)
    stored["evaluations"] = evaluations
    stored["latest_eval_data_id"] = metrics["eval_data_id"]
    record_evaluation(engine, bundle.bundle_id, stored)


def _evaluations(record: Any) -> dict[str, dict[str, Any]]:
    return dict((record.metrics or {}).get("evaluations") or {})


def promotion_check(engine: Engine, candidate_id: str) -> tuple[bool, str]:
    """Whether ``candidate_id`` may become active, and why (or why not)."""
    candidate = get_bundle(engine, candidate_id)  # UnknownBundle (a LookupError) when not registered
    active = active_bundle(engine)
    if active is None:
        return True, "no bundle is active yet"
    if active.bundle_id == candidate.bundle_id:
        return True, f"bundle {candidate.bundle_id} is already active"
    active_evals, candidate_evals = _evaluations(active), _evaluations(candidate)
    if not active_evals:
        return False, _no_active_evaluation(active, candidate, candidate_evals)
    shared = sorted(set(active_evals) & set(candidate_evals))
    if not shared:
        sources = sorted({str(e.get("data_source")) for e in active_evals.values()})
        return False, (
            f"bundle {candidate.bundle_id} has no evaluation on the data the active bundle "
            f"{active.bundle_id} was evaluated on ({', '.join(sources)}): run "
            f"`deepcovid evaluate {candidate.path} {sources[0]} --out REPORT_DIR`, then promote again; "
            f"or skip the gate with `deepcovid bundle promote {candidate.bundle_id} --force`"
        )
    lines = []
    worse = False
    for data_id in shared:
        a = active_evals[data_id]["operating"]
        c = candidate_evals[data_id]["operating"]
        a_sens, c_sens = a.get("sensitivity"), c.get("sensitivity")
        if a_sens is None or c_sens is None:
            return False, f"evaluation {data_id[:12]} has no COVID images, so sensitivity cannot be compared"
        worse = worse or c_sens < a_sens
        lines.append(
            f"on {active_evals[data_id].get('data_source') or data_id[:12]}: sensitivity {c_sens:.4f} "
            f"(specificity {c.get('specificity')}) vs active {a_sens:.4f} "
            f"(specificity {a.get('specificity')})"
        )
    if worse:
        return False, (
            f"bundle {candidate.bundle_id} is less sensitive than the active bundle {active.bundle_id} "
            f"at its operating threshold: " + "; ".join(lines) + " (pass --force to promote anyway)"
        )
    return True, "; ".join(lines)


def _no_active_evaluation(
    active: BundleRecord, candidate: BundleRecord, candidate_evals: dict[str, dict[str, Any]]
) -> str:
    """Why the gate cannot compare, and the exact commands that let it (or skip it)."""
    force = f"`deepcovid bundle promote {candidate.bundle_id} --force`"
    if is_untrained(active.manifest):
        return (
            f"the active bundle {active.bundle_id} is untrained (made by `deepcovid bundle init`), so there "
            f"is no evaluation to compare against: replace it with {force}"
        )
    sources = sorted({str(e["data_source"]) for e in candidate_evals.values() if e.get("data_source")})
    if sources:  # evaluate the active bundle on the data the candidate was evaluated on
        run = f"`deepcovid evaluate {active.path} {sources[0]} --out REPORT_DIR`"
    else:
        run = (
            f"`deepcovid evaluate {active.path} TEST_DATA --out REPORT_DIR` and "
            f"`deepcovid evaluate {candidate.path} TEST_DATA --out REPORT_DIR` (the same labelled TEST_DATA)"
        )
    return (
        f"the active bundle {active.bundle_id} has no recorded evaluation to compare against: run {run}, "
        f"then promote again; or skip the gate with {force}"
    )


def promote_bundle(engine: Engine, candidate_id: str, *, force: bool = False) -> str:
    """Make the candidate the active bundle for new jobs if the gate allows (or ``force``)."""
    allowed, reason = promotion_check(engine, candidate_id)
    if not allowed and not force:
        raise PromotionRefused(f"not promoted: {reason}")
    set_active(engine, candidate_id)
    prefix = "promoted (forced past the gate)" if not allowed else "promoted"
    return f"{prefix}: bundle {candidate_id} is now active for new jobs ({reason})"
