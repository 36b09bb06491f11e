"""Write throughput of the results database: register_images and chunked write_results upserts.

Runs on a temporary SQLite file and on a throwaway PostgreSQL database (created and dropped here), then
prints rows per second. Targets: >= 20,000 registered images/s and >= 10,000 prediction rows/s on
PostgreSQL.

    .venv/bin/python benchmarks/db_write.py [--sizes 5000 50000] [--chunk 256] [--pg-admin-url URL]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from db.engine import dispose_engines, make_engine
from db.jobs import create_job
from db.migrate import upgrade
from db.rows import ImageRef
from db.writes import register_images, write_results
from deepcovid.results import ImageResult

ARCHS = ("resnet18", "resnet50", "squeezenet1_1", "densenet121")
DEFAULT_PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _result(uri: str, i: int) -> ImageResult:
    score = (i % 997) / 997
    return ImageResult(
        uri=uri,
        status="scored",
        probabilities={arch: score for arch in ARCHS},
        decisions={arch: score >= 0.5 for arch in ARCHS},
        ensemble_score=score,
        ensemble_decision=score >= 0.5,
        disagreement=0.01,
        thresholds={**dict.fromkeys(ARCHS, 0.5), "ensemble": 0.5},
        info={"format": "PNG", "width": 1024, "height": 1024, "bit_depth": 8, "mode": "L"},
        size=250_000,
    )


def _timed(action: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (the database server's CPU is not counted)."""
    start, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - start, time.process_time() - cpu


def bench(
    url: str, backend: str, sizes: list[int], chunk: int
) -> list[tuple[str, str, int, tuple[float, float]]]:
    """Rows (backend, operation, rows, seconds) for each size on a freshly migrated database."""
    upgrade(url)
    engine = make_engine(url)
    rows: list[tuple[str, str, int, tuple[float, float]]] = []
    for size in sizes:
        prefix = f"/archive/{uuid.uuid4().hex[:8]}"
        refs = [ImageRef(uri=f"{prefix}/{i:07d}.png", storage="file", size=250_000) for i in range(size)]
        job = create_job(engine, source=prefix, bundle_id="bench", options={})
        queued: list[str] = []
        seconds = _timed(lambda: queued.extend(register_images(engine, job, "bench", refs)))  # noqa: B023
        rows.append((backend, "register_images (new)", size, seconds))
        results = [_result(uri, i) for i, uri in enumerate(queued)]

        def write_all(results: list[ImageResult] = results) -> None:
            for start in range(0, len(results), chunk):
                write_results(
                    engine,
                    job_id=job,  # noqa: B023
                    bundle_id="bench",
                    results=results[start : start + chunk],
                    worker_host=socket.gethostname(),
                    device="cpu",
                )

        rows.append((backend, f"write_results (chunks of {chunk})", size, _timed(write_all)))
        rows.append((backend, f"write_results again (redelivery, {chunk})", size, _timed(write_all)))
        job2 = create_job(engine, source=prefix, bundle_id="bench", options={})
        seconds = _timed(lambda: register_images(engine, job2, "bench", refs))  # noqa: B023
        rows.append((backend, "register_images (all scored: skip)", size, seconds))
    return rows


@contextmanager
def throwaway_pg(admin_url: str) -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    libpq = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"dc_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    finally:
        dispose_engines()
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN)
    parser.add_argument("--skip-postgresql", action="store_true")
    args = parser.parse_args()

    results: list[tuple[str, str, int, tuple[float, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        results += bench(f"sqlite:///{Path(tmp) / 'bench.db'}", "sqlite", args.sizes, args.chunk)
        dispose_engines()
    if not args.skip_postgresql:
        with throwaway_pg(args.pg_admin_url) as url:
            results += bench(url, "postgresql", args.sizes, args.chunk)

    table = Table(title=f"Results database writes on {socket.gethostname()}")
    for column in ("backend", "operation", "rows", "seconds", "rows/s", "client CPU s"):
        table.add_column(column, justify="left" if column in ("backend", "operation") else "right")
    for backend, operation, rows, (seconds, cpu) in results:
        table.add_row(
            backend, operation, f"{rows:,}", f"{seconds:.2f}", f"{rows / seconds:,.0f}", f"{cpu:.2f}"
        )
    console = Console()
    console.print(table)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(f"{os.cpu_count()} CPUs, load average {load:.1f} when finished")


if __name__ == "__main__":
    main()
