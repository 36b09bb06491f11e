"""The review worklist on PostgreSQL with 100,000 predictions in one job: the first page of every order,
a page deep in (keyset, no OFFSET), the filters, the viewer's next image, and the whole worklist page
over HTTP (sign-in, progress header, audit entry, template). Target: the first page in under 200 ms.

Builds a throwaway database (created and dropped here), fills it through the same writes workers use,
marks a few percent of the images reviewed or disputed, then times each query interleaved, median of
``--repeats``.

    .venv/bin/python benchmarks/worklist.py [--images 100000] [--repeats 7] [--pg-admin-url URL]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from db_write import DEFAULT_PG_ADMIN, throwaway_pg
from machine import interleaved, load_average, median
from rich.console import Console
from rich.table import Table

from db.engine import make_engine, writer
from db.jobs import create_job
from db.migrate import upgrade
from db.models import ImageReview
from db.rows import ImageRef
from db.tables import images
from db.writes import register_images, write_results
from deepcovid.networks import ARCHITECTURES
from deepcovid.results import ImageResult
from deepcovid.status import ReviewState, Role, Verdict
from review import worklist
from review.worklist import Worklist

BUNDLE = "be" * 32
CHUNK = 5000


def _scored(uri: str, i: int) -> ImageResult:
    """Scores spread over [0, 1) with the networks disagreeing by varying amounts; some DICOM dates."""
    score = ((i * 7919) % 10007) / 10007
    spread = ((i * 104729) % 1009) / 2018
    probs = {a: min(1.0, max(0.0, score + spread * (k - 1.5) / 1.5)) for k, a in enumerate(ARCHITECTURES)}
    dicom = {"StudyDate": f"2026{1 + i % 12:02d}{1 + i % 28:02d}"} if i % 3 == 0 else {}
    return ImageResult(
        uri=uri,
        status="scored",
        probabilities=probs,
        decisions={a: p >= 0.5 for a, p in probs.items()},
        ensemble_score=score,
        ensemble_decision=score >= 0.5,
        disagreement=spread,
        thresholds={**dict.fromkeys(ARCHITECTURES, 0.5), "ensemble": 0.5},
        info={"dicom": dicom} if dicom else {},
        size=1000,
    )


def fill(engine: Any, count: int) -> int:
    """A job of ``count`` scored images (1% failed), 3% reviewed and 1% disputed."""
    job = create_job(engine, source="/archive", bundle_id=BUNDLE)
    uris = [f"/archive/{i:07d}.png" for i in range(count)]
    register_images(engine, job, BUNDLE, [ImageRef(uri=u) for u in uris])
    for start in range(0, count, CHUNK):
        results = [
            _scored(u, start + k) if (start + k) % 100 else ImageResult.failed(u, "corrupt", "bad")
            for k, u in enumerate(uris[start : start + CHUNK])
        ]
        write_results(
            engine, job_id=job, bundle_id=BUNDLE, results=results, worker_host="bench", device="cpu"
        )
    with writer(engine).begin() as conn:
        ids = [row.id for row in conn.execute(sa.select(images.c.id).order_by(images.c.id))]
        rows = [
            {
                "image_id": id_,
                "state": ReviewState.disputed if n % 4 == 0 else ReviewState.reviewed,
                "consensus": None if n % 4 == 0 else Verdict.covid,
                "reviews": 2,
            }  # fmt: skip
            for n, id_ in enumerate(ids[::25])
        ]
        conn.execute(sa.insert(ImageReview.__table__), rows)
        conn.execute(sa.text("ANALYZE"))
    return job


def _ms(action: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        action()
        return (time.perf_counter() - started) * 1000

    return run


def _http_page(url: str, job: int, tmp: Path) -> Callable[[], object]:
    """The worklist page as a signed-in reviewer's browser gets it (through the whole app)."""
    from fastapi.testclient import TestClient

    from deepcovid.settings import Settings
    from review.accounts import add_user
    from review.app import create_app

    engine = make_engine(url)
    add_user(engine, "bench", "bench-password", Role.reviewer)
    settings = Settings(database_url=url, data_dir=tmp, secret_key="bench")  # type: ignore[arg-type]
    client = TestClient(create_app(settings, engine), follow_redirects=False)
    login = client.get("/login").text
    token = login.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    client.post("/login", data={"username": "bench", "password": "bench-password", "csrf": token})

    def get() -> object:
        response = client.get(f"/jobs/{job}")
        assert response.status_code == 200, response.status_code
        return response

    return get


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN)
    args = parser.parse_args()
    console = Console()
    console.print(f"load avg: {load_average()} (1/5/15 min, at start)")
    with throwaway_pg(args.pg_admin_url) as url, tempfile.TemporaryDirectory() as tmp:
        upgrade(url)
        engine = make_engine(url)
        started = time.perf_counter()
        job = fill(engine, args.images)
        console.print(f"filled {args.images:,} images in {time.perf_counter() - started:.0f} s")
        default = Worklist(job_id=job)
        middle = worklist.page(engine, default, limit=args.images // 2).rows[-1]
        variants: dict[str, Callable[[], float]] = {
            f"first page, {name}": _ms(lambda s=name: worklist.page(engine, Worklist(job_id=job, sort=s)))
            for name in worklist.SORTS
        }
        variants["page after row 50,000 (flagged first)"] = _ms(
            lambda: worklist.page(engine, default, after=middle.cursor)
        )
        variants["first page, unreviewed only"] = _ms(
            lambda: worklist.page(engine, Worklist(job_id=job, review=ReviewState.unreviewed))
        )
        variants["first page, disputed only"] = _ms(
            lambda: worklist.page(engine, Worklist(job_id=job, review=ReviewState.disputed))
        )
        variants["first page, failed: corrupt"] = _ms(
            lambda: worklist.page(engine, Worklist(job_id=job, decision="failed", reason="corrupt"))
        )
        variants["first page, all jobs"] = _ms(lambda: worklist.page(engine, Worklist()))
        variants["viewer: next image"] = _ms(lambda: worklist.neighbour(engine, default, middle, 1))
        variants["HTTP: GET /jobs/N (whole page)"] = _ms(_http_page(url, job, Path(tmp)))
        timings = interleaved(variants, args.repeats)
    table = Table(
        title=f"Worklist on PostgreSQL, {args.images:,} predictions in one job (ms, {args.repeats} runs)"
    )
    for column in ("query", "median ms", "min ms", "max ms"):
        table.add_column(column, justify="left" if column == "query" else "right")
    for name, values in timings.items():
        table.add_row(name, f"{median(values):.1f}", f"{min(values):.1f}", f"{max(values):.1f}")
    console.print(table)
    console.print(f"load avg: {load_average()} (1/5/15 min, at the end)")


if __name__ == "__main__":
    main()
