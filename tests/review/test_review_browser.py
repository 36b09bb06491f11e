"""End to end in a real browser: Playwright drives Debian's chromium against the workbench served by
uvicorn on a free port (SQLite, synthetic images, a random-weight bundle for the heatmaps).

Skips when chromium or Playwright is absent here; CI installs both (.ci/run). With
DEEPCOVID_SCREENSHOTS=1 the worklist and viewer screenshots are written into docs/ for the README.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from db.models import Review
from tests.fixtures.services import REPO_ROOT
from tests.review.conftest import PASSWORD
from training.data import load_labelled

CHROMIUM = "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]
OVERLAY_TIMEOUT_MS = 180_000  # the first Grad-CAM loads the bundle on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(review_settings: Any, seeded: Any) -> Iterator[str]:
    import uvicorn

    from review.app import create_app

    port = _free_port()
    config = uvicorn.Config(create_app(review_settings, seeded.engine), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if running.started:
                break
            threading.Event().wait(0.05)
        assert running.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        running.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def attacker(tmp_path: Path) -> Iterator[Any]:
    """Another origin (127.0.0.1 on another port) whose page posts a verdict form to the workbench."""
    site = tmp_path / "attacker"
    site.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join(timeout=10)


def _browser(p: Any) -> Any:
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


def _screenshot(page: Any, name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    page.screenshot(path=str(out), type="png")
    if os.environ.get("DEEPCOVID_SCREENSHOTS") == "1":  # small enough for the repository (< 150 KB)
        from PIL import Image

        shot = Image.open(out).convert("RGB")
        shot = shot.resize((shot.width * 3 // 4, shot.height * 3 // 4), Image.Resampling.LANCZOS)
        shot.quantize(colors=64).save(REPO_ROOT / "docs" / name, optimize=True)


def test_review_workflow_in_a_real_browser(server: str, seeded: Any, attacker: Any, tmp_path: Path) -> None:
    job, ids = seeded.job_id, seeded.ids
    names = {v: k for k, v in ids.items()}
    with playwright_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            context = browser.new_context(viewport={"width": 1180, "height": 720}, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(30_000)

            # 1. Sign in (asked for on the way to the worklist).
            page.goto(f"{server}/jobs/{job}")
            assert "/login" in page.url
            page.get_by_label("Username").fill("ada")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()

            # 2. The job's worklist, flagged first.
            page.wait_for_url(f"{server}/jobs/{job}")
            first_link = page.locator("table.worklist tbody tr").first.locator("a").first
            assert first_link.inner_text() == f"#{ids['a.png']}"
            assert "scored" in page.locator("#progress").inner_text()
            _screenshot(page, "review-worklist.png", tmp_path)

            # 3. The top image, with its ensemble heatmap over it.
            first_link.click()
            page.wait_for_url(f"**/jobs/{job}/images/{ids['a.png']}**")
            page.wait_for_function(
                "() => { const i = document.getElementById('heat-ensemble');"
                " return i && i.complete && i.naturalWidth > 0 && i.classList.contains('on'); }",
                timeout=OVERLAY_TIMEOUT_MS,
            )
            assert page.locator("#xray").evaluate("i => i.naturalWidth") > 0
            page.locator("#opacity").fill("40")
            assert page.locator("#heat-ensemble").evaluate("i => getComputedStyle(i).opacity") == "0.4"
            _screenshot(page, "review-viewer.png", tmp_path)

            # 4. COVID-19 with the keyboard: recorded, and on to the next image in the worklist.
            page.keyboard.press("1")
            page.wait_for_url(f"**/images/{ids['b.png']}**")
            assert page.get_by_text(f"Verdict recorded for image #{ids['a.png']}").is_visible()
            with seeded.engine.connect() as conn:
                verdicts = conn.execute(
                    sa.select(Review.__table__.c.image_id, Review.__table__.c.verdict)
                ).all()
            assert [(names[i], v) for i, v in verdicts] == [("a.png", "covid")]

            # 5. Back and forth with k and j.
            page.keyboard.press("k")
            page.wait_for_url(f"**/images/{ids['a.png']}**")
            assert "yours: COVID-19" in page.locator("#verdict-form legend").inner_text()
            page.keyboard.press("j")
            page.wait_for_url(f"**/images/{ids['b.png']}**")

            # 6. Export the labels from the worklist.
            page.get_by_role("link", name="Worklist").click()
            with page.expect_download() as download:
                page.get_by_role("link", name="Export labels").click()
            saved = tmp_path / "labels.csv"
            download.value.save_as(str(saved))
            samples = load_labelled(saved)
            assert [(Path(s.name).name, s.label) for s in samples] == [("a.png", 1)]

            # A cross-site form post (another site's page, the signed-in browser) is refused.
            site, origin = attacker
            target = f"{server}/jobs/{job}/images/{ids['c.png']}/review"
            (site / "index.html").write_text(
                f'<form method="post" action="{target}"><input name="verdict" value="not_chest_xray">'
                '<button id="go">go</button></form>'
            )
            evil = context.new_page()
            evil.goto(f"{origin}/index.html")
            with evil.expect_response(target) as answer:
                evil.click("#go")
            # Same site (another port), so the browser sends the session cookie: the origin check refuses.
            assert answer.value.status == 403
            with seeded.engine.connect() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(Review.__table__)).scalar() == 1

            # An anonymous browser is sent to sign in, and gets no image.
            anonymous = browser.new_context()
            lost = anonymous.new_page()
            lost.goto(f"{server}/jobs/{job}/images/{ids['a.png']}")
            assert "/login" in lost.url
            assert anonymous.request.get(f"{server}/media/{job}/{ids['a.png']}/image.png").status == 401
        finally:
            browser.close()
