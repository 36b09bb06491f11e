"""The README's first command, `make demo`, run in a reduced form so the README cannot rot."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.services import free_port, port_open, wait_for

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
    _serve_the_demo_database(demo)


def _serve_the_demo_database(demo: Path) -> None:
    """The README's review commands on the demo's database: an admin signs in and sees the job's worklist
    with an image in it, rendered from the demo archive."""
    env = {
        **os.environ,
        "DEEPCOVID_DATA_DIR": str(demo / "state"),
        "DEEPCOVID_STORAGE_ROOTS": str(demo / "archive"),
    }
    deepcovid = str(Path(sys.prefix) / "bin" / "deepcovid")
    password = "demo password 1"
    added = subprocess.run(
        [deepcovid, "users", "add", "ada", "--role", "admin", "--password-stdin"],
        input=password + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    port = free_port()
    server = subprocess.Popen(
        [deepcovid, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: port_open(port) or server.poll() is not None, 60, "deepcovid serve")
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
            assert token is not None
            signed_in = client.post(
                "/login", data={"username": "ada", "password": password, "csrf": token.group(1), "next": "/"}
            )
            assert signed_in.status_code == 303, signed_in.text
            worklist = client.get("/jobs/1")
            assert worklist.status_code == 200
            viewers = re.findall(r'href="(/jobs/1/images/[^"]+)"', worklist.text)
            assert len(viewers) == 8, "one row per image of the demo's job"
            rendered = []
            for viewer in viewers:
                page = client.get(viewer.replace("&amp;", "&"))
                assert page.status_code == 200
                image = re.search(r'src="(/media/[^"]+/image\.png)"', page.text)
                assert image is not None
                rendered.append(client.get(image.group(1)).headers.get("content-type"))
            assert rendered.count("image/png") == 6  # the two broken files have no picture to show
    finally:
        server.terminate()
        server.wait(timeout=30)
