"""Untrained bundles: random or ImageNet backbones with fresh two-class heads, for tests and first runs.

Every problem (an unknown network, a missing checkpoint) is found before any network is built, and all
missing checkpoints are reported at once, so one run of ``bundle init`` says everything to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from deepcovid.bundle import Bundle, BundleError, save_bundle
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.networks import ARCHITECTURES, PretrainedWeightsUnavailable, build_network, locate_weights


def pretrained_source(pretrained: str, architectures: Sequence[str]) -> str | Path:
    """``none``, ``imagenet``, or the checkpoint file or directory ``pretrained`` names, once it exists."""
    if pretrained in ("none", "imagenet"):
        return pretrained
    source = Path(pretrained).expanduser()
    if not source.exists():
        raise UserError(
            ExitCode.FAILURES,
            f"--pretrained {pretrained}: no such file or directory (or use none / imagenet)",
        )
    if source.is_file() and len(architectures) != 1:
        raise UserError(
            ExitCode.FAILURES,
            "--pretrained FILE needs exactly one --arch; pass a directory for several networks",
        )
    return source


def init_bundle(
    out: Path,
    *,
    pretrained: str,
    architectures: Sequence[str] = (),
    policy: str,
    ensemble_threshold: float,
    seed: int = 0,
) -> Bundle:
    """Write an untrained bundle of ``architectures`` (default: all four) to ``out`` and return it."""
    architectures = list(dict.fromkeys(architectures)) or list(ARCHITECTURES)
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        raise UserError(
            ExitCode.FAILURES,
            f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}",
        )
    source = pretrained_source(pretrained, architectures)
    if source != "none":
        missing = []
        for arch in architectures:
            try:
                locate_weights(arch, source)
            except PretrainedWeightsUnavailable as exc:
                missing.append(str(exc))
        if missing:
            raise UserError(ExitCode.FAILURES, "\n\n".join(missing))
    torch.manual_seed(seed)
    try:
        networks = {arch: build_network(arch, source) for arch in architectures}
        return save_bundle(
            out,
            networks,
            ensemble_policy=policy,
            ensemble_threshold=ensemble_threshold,
            provenance={
                "kind": "untrained",
                "pretrained": str(source),
                "seed": seed,
                "note": "heads are randomly initialised; not fit for screening",
            },
        )
    except (PretrainedWeightsUnavailable, BundleError) as exc:
        raise UserError(ExitCode.FAILURES, str(exc)) from None
