"""Core commands: ``inspect`` and ``bundle init`` / ``bundle show``."""

from __future__ import annotations

import typer


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Attach the core commands to the CLI (called by deepcovid.cli)."""
    register_inspect(app)
    register_bundle_commands(groups["bundle"])


def register_inspect(app: typer.Typer) -> None:
    """`deepcovid inspect PATH...` (owned by the decoding work)."""


def register_bundle_commands(bundle_app: typer.Typer) -> None:
    """`deepcovid bundle init` and `deepcovid bundle show` (owned by the bundle work)."""
