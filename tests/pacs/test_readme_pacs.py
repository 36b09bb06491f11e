"""The README's "Screening a PACS" commands, run as written against a private Orthanc (its address and the
output folder substituted), so that section cannot rot."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from tests.fixtures.orthanc import OrthancServer
from tests.pacs.instances import archive
from tests.pacs.sr_check import sr_instances

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Screening a PACS, and sending the results back to it"
PACS = "dicomweb://pacs.internal:8042/dicom-web"


def pacs_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme[readme.index(SECTION) :], re.S)
    assert block is not None, f"no bash block under {SECTION!r}"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [shlex.split(line) for line in lines if line]


def test_the_readme_screens_a_pacs_and_publishes_back(
    producer_env, orthanc: OrthancServer, tiny_bundle_path: Path, tmp_path: Path
) -> None:
    from cli.main import app
    from db.engine import dispose_engines

    made = [m for m in archive() if m.eligible]  # the README's screen expects no failure
    for item in made:
        orthanc.upload(item.data)
    runner = CliRunner()
    registered = runner.invoke(app, ["bundle", "register", str(tiny_bundle_path), "--promote"])
    assert registered.exit_code == 0, registered.output
    substitutes = {PACS: orthanc.dicomweb, "reports/": str(tmp_path / "reports")}
    try:
        for command in pacs_commands():
            args = [substitutes.get(a, a) for a in command[1:]]
            result = runner.invoke(app, args, env={"COLUMNS": "200"})
            assert result.exit_code == 0, (command, result.output)
    finally:
        dispose_engines()
    in_2024 = [m for m in made if m.study != made[-1].study]
    assert sum(len(sr_instances(orthanc, s)) for s in {m.study for m in made}) == len(in_2024)
    assert len(list((tmp_path / "reports").glob("*.dcm"))) == len(in_2024)
