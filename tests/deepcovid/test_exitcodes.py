"""One ExitCode enum: the docs' table and the commands' help are generated from it."""

from __future__ import annotations

from pathlib import Path

from deepcovid.exitcodes import ExitCode, help_text, markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_docs_table_is_generated_from_the_enum() -> None:
    assert markdown_table() in DOCS.read_text(encoding="utf-8")


def test_every_code_is_described_and_distinct() -> None:
    assert len({int(code) for code in ExitCode}) == len(ExitCode)
    assert all(code.describe for code in ExitCode)
    assert help_text((ExitCode.OK, ExitCode.INTERRUPTED)).startswith("Exit codes: 0 ")
