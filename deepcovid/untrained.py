"""Untrained bundles: random or ImageNet backbones with fresh two-class heads, for tests and first runs.

Every problem (an unknown network, a missing checkpoint) is found before any network is built, and all
missing checkpoints are reported at once, so one run of ``bundle init`` says everything to fix.
Their manifests say ``kind: untrained``; ``is_untrained`` and ``untrained_warning`` let every command that
promotes or screens with one say so without loading torch (which ``init_bundle`` imports when it runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode

if TYPE_CHECKING:
    from deepcovid.bundle import Bundle

UNTRAINED_KIND = "untrained"
"""``provenance.kind`` in the manifest of a bundle made by ``bundle init``."""


def is_untrained(manifest: Mapping[str, Any] | None) -> bool:
    """Whether a bundle manifest (a file's or a registry record's) is one ``bundle init`` made."""
    return ((manifest or {}).get("provenance") or {}).get("kind") == UNTRAINED_KIND


def untrained_warning(bundle_id: str) -> str:
    """The one line every command prints before it promotes or screens with an untrained bundle."""
    return (
        f"bundle {bundle_id} is UNTRAINED (made by `deepcovid bundle init`): its scores are meaningless, "
        "use it for pipeline checks only (--allow-untrained silences this warning)"
    )


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
    import torch  # only when a bundle is made: commands that just ask is_untrained stay free of torch

    from deepcovid.bundle import BundleError, save_bundle
    from deepcovid.networks import ARCHITECTURES, PretrainedWeightsUnavailable, build_network, locate_weights

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
                "kind": UNTRAINED_KIND,
                "pretrained": str(source),
                "seed": seed,
                "note": "heads are randomly initialised; not fit for screening",
            },
        )
    except (PretrainedWeightsUnavailable, BundleError) as exc:
        raise UserError(ExitCode.FAILURES, str(exc)) from None
