"""Commands contributed by the `producer` package."""

from __future__ import annotations

import typer


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Attach this package's commands to the CLI (called by deepcovid.cli)."""
