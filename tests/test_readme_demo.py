"""The README's first command, `make demo`, run in a reduced form so the README cannot rot."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_demo_and_the_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci.splitlines()[-1]


@pytest.mark.slow
def test_make_demo_screens_the_generated_archive(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    proc = subprocess.run(
        [
            "make",
            "demo",
            f"VENV={sys.prefix}",
            f"DEMO_DIR={demo}",
            "DEMO_IMAGES=6",
            "DEMO_EPOCHS=1",
            "DEMO_ARCHS=--arch squeezenet1_1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "scored now 6" in proc.stdout
    db = demo / "state" / "deepcovid.db"
    with sqlite3.connect(db) as conn:
        states = dict(conn.execute("select state, count(*) from job_images group by state").fetchall())
        reasons = {r for (r,) in conn.execute("select failure_reason from job_images where state = 'failed'")}
        predictions = conn.execute("select count(*) from predictions").fetchone()[0]
    assert states == {"scored": 6, "failed": 2}
    assert reasons == {"empty_file", "not_an_image"}
    assert predictions == 6
