"""The README's "Screening your own archive on one box" commands, run exactly as written (paths substituted)
on a fresh data dir, so that section cannot rot (issue 18): no `db upgrade` is needed first."""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fixtures.images import xray_png_bytes

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Screening your own archive on one box"
PLACEHOLDERS = {"/archive/xrays": "archive", "/path/to/bundle": "bundle"}


def onebox_commands() -> list[list[str]]:
    """The section's first fenced block: one command per line, comments dropped, split as a shell would."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, f"no bash block under {SECTION!r}"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_the_section_lists_the_flow() -> None:
    verbs = [" ".join(command[1:3]) for command in onebox_commands()]
    assert all(command[0] == "deepcovid" for command in onebox_commands())
    assert verbs[:3] == ["inspect /archive/xrays", "bundle register", "screen /archive/xrays"]
    assert any(verb.startswith("results ") for verb in verbs)


def test_the_onebox_flow_runs_as_written_on_a_fresh_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import app
    from db.engine import dispose_engines
    from deepcovid.settings import get_settings
    from deepcovid.untrained import init_bundle

    for name in ("DEEPCOVID_DATABASE_URL", "DEEPCOVID_BUNDLES_DIR", "DEEPCOVID_STORAGE_ROOTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEEPCOVID_DATA_DIR", str(tmp_path / "fresh-data-dir"))
    monkeypatch.setenv("DEEPCOVID_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)  # job1.csv lands here; no stray .env is read
    get_settings.cache_clear()

    archive = tmp_path / "archive"
    (archive / "ward").mkdir(parents=True)
    for i in range(3):  # every file decodes, so inspect exits 0 and screen has no failure
        (archive / "ward" / f"img{i}.png").write_bytes(xray_png_bytes(64, opacity=bool(i % 2), seed=i))
    init_bundle(
        tmp_path / "bundle",
        pretrained="none",
        architectures=["squeezenet1_1"],
        policy="mean",
        ensemble_threshold=0.5,
    )

    runner = CliRunner()
    try:
        for command in onebox_commands():
            args = [str(tmp_path / PLACEHOLDERS[a]) if a in PLACEHOLDERS else a for a in command[1:]]
            assert not [a for a in args if a.startswith(("/archive", "/path/to"))], args
            result = runner.invoke(app, args, env={"COLUMNS": "200"})
            assert result.exit_code == 0, (command, result.output)
            assert "Traceback" not in result.output
    finally:
        dispose_engines()
        get_settings.cache_clear()

    with (tmp_path / "job1.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["uri"] for row in rows) == sorted(str(p) for p in (archive / "ward").iterdir())
