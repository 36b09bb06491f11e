"""Producer throughput: list + register + send 100,000 files into the local Redis and PostgreSQL.

Builds a tree of empty ``.png`` files (about 1,000 per directory) in a temporary directory, creates a
throwaway PostgreSQL database and a unique Redis queue (no worker consumes it), and measures each stage in
a fresh child process so peak RSS is the producer's alone. Everything is removed afterwards.

    .venv/bin/python benchmarks/enqueue.py [--files 100000] [--per-dir 1000] [--chunk-size 256]

Targets: >= 20,000 images/s and < 300 MB peak RSS for the full enqueue.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
PG_BASE = os.environ.get("BENCH_PG_BASE", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
TARGET_RATE = 20_000
TARGET_RSS_MB = 300


def make_tree(root: Path, files: int, per_dir: int) -> None:
    for i in range(files):
        d = root / f"d{i // per_dir // 100:03d}" / f"s{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:07d}.png").touch()


def cpu_seconds() -> float:
    """User + system CPU time of this process: the producer's own cost, whatever else the box runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------
# Child: one stage, measured in a fresh interpreter


def child(stage: str, source: str, db_url: str, queue: str, chunk_size: int) -> None:
    os.environ.update(
        DEEPCOVID_DATABASE_URL=db_url,
        DEEPCOVID_BROKER_URL=REDIS,
        DEEPCOVID_QUEUE=queue,
        DEEPCOVID_STORAGE_ROOTS=source,
        DEEPCOVID_CHUNK_SIZE=str(chunk_size),
    )
    from deepcovid.settings import Settings
    from producer.enqueue import enqueue
    from producer.listing import walk_local

    settings = Settings()
    rss_before = peak_rss_mb()
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    if stage == "listing":
        count = sum(1 for _ in walk_local(source))
        extra = {}
    else:
        summary = enqueue(source, settings=settings, rescore=stage.startswith("enqueue --rescore"))
        count = summary.listed
        extra = {"queued": summary.queued, "chunks": summary.chunks}
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    print(
        json.dumps(
            {
                "stage": stage,
                "count": count,
                "seconds": elapsed,
                "cpu": cpu,
                "rss_mb": peak_rss_mb(),
                "base_mb": rss_before,
            }
            | extra
        )
    )


def run_child(stage: str, source: Path, db_url: str, queue: str, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, str(source), db_url, queue, str(chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Setup and teardown of the throwaway database and queue


def create_database(name: str) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_BASE}/{name}"
    from db.migrate import upgrade

    upgrade(url)
    import sqlalchemy as sa

    from db.engine import dispose_engines, make_engine
    from db.models import BundleRecord

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(BundleRecord).values(
                bundle_id="bench-bundle", manifest={}, path="/nonexistent", active=True
            )
        )
    dispose_engines()
    return url


def mark_all_scored(url: str) -> None:
    """Pretend a worker scored everything (no worker runs here), so a re-run has everything to skip."""
    import sqlalchemy as sa

    from db.engine import dispose_engines, make_engine

    with make_engine(url).begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO predictions (image_id, bundle_id, thresholds, scored_at) "
                "SELECT id, 'bench-bundle', '{}', now() FROM images ON CONFLICT DO NOTHING"
            )
        )
        conn.execute(sa.text("UPDATE images SET state = 'scored'"))
    dispose_engines()


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def queue_length_and_delete(queue: str) -> int:
    from kombu import Connection

    with Connection(REDIS) as conn:
        channel = conn.default_channel
        _, count, _ = channel.queue_declare(queue, passive=True)
        channel.queue_delete(queue)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--per-dir", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, source, db_url, queue, chunk_size = args.child
        child(stage, source, db_url, queue, int(chunk_size))
        return

    from machine import cpu_model, load_average

    load_at_start = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="deepcovid-bench-"))
    name = f"deepcovid_bench_{uuid.uuid4().hex[:8]}"
    queue = f"deepcovid-bench-{uuid.uuid4().hex[:8]}"
    rows = []
    try:
        t0 = time.perf_counter()
        make_tree(tmp / "archive", args.files, args.per_dir)
        print(f"made {args.files:,} files in {time.perf_counter() - t0:.1f}s under {tmp}", file=sys.stderr)
        url = create_database(name)
        source = tmp / "archive"
        for stage in ("listing", "enqueue (first run)"):
            rows.append(run_child(stage, source, url, queue, args.chunk_size))
        mark_all_scored(url)
        for stage in ("enqueue (re-run, all scored)", "enqueue --rescore"):
            rows.append(run_child(stage, source, url, queue, args.chunk_size))
        queued_messages = queue_length_and_delete(queue)
    finally:
        drop_database(name)
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(
        f"Producer benchmark: {args.files:,} files, {args.per_dir} per directory, "
        f"chunk size {args.chunk_size}"
    )
    print(f"cpu     : {cpu_model()}, {os.cpu_count()} logical cores")
    print(f"load avg: {load_at_start} (1/5/15 min, at start)")
    print(f"services: PostgreSQL {PG_BASE.split('@')[-1]}, Redis {REDIS.split('@')[-1]} (same machine)")
    print()
    header = (
        f"{'stage':30} {'images':>9} {'queued':>9} {'wall s':>7} {'images/s':>9} "
        f"{'CPU s':>6} {'images/CPU s':>12} {'peak RSS MB':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rate = row["count"] / row["seconds"] if row["seconds"] else float("inf")
        cpu_rate = row["count"] / row["cpu"] if row["cpu"] else float("inf")
        queued = f"{row['queued']:,}" if "queued" in row else ""
        print(
            f"{row['stage']:30} {row['count']:>9,} {queued:>9} {row['seconds']:>7.2f} {rate:>9,.0f} "
            f"{row['cpu']:>6.2f} {cpu_rate:>12,.0f} {row['rss_mb']:>11.0f}"
        )
    print()
    print(f"load avg: {load_average()} (1/5/15 min, at the end)")
    print(
        "wall-clock images/s includes PostgreSQL and Redis server time; CPU s is the producer process alone"
    )
    print()
    print(f"messages left in the queue before deleting it: {queued_messages:,}")
    first = next(r for r in rows if r["stage"] == "enqueue (first run)")
    rate = first["count"] / first["seconds"]
    verdict = "meets" if rate >= TARGET_RATE and first["rss_mb"] < TARGET_RSS_MB else "MISSES"
    print(
        f"first-run enqueue {verdict} the target (>= {TARGET_RATE:,} images/s, < {TARGET_RSS_MB} MB peak RSS)"
    )


if __name__ == "__main__":
    main()
