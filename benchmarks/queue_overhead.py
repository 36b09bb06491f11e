"""What the distributed path costs: the same images through a real Celery worker vs the embedded ``screen``.

- celery: ``producer.enqueue.enqueue`` (list, register, send) into a unique queue on the local Redis, one
  ``celery -A worker worker --pool solo`` subprocess scoring it, results in a throwaway PostgreSQL
  database (created and dropped here); timed from the enqueue call until the job is finished in the
  database. The worker is started and warmed up (bundle loaded) before timing, as a running fleet is.
- embedded: ``producer.screen.screen`` on a SQLite file in a temporary directory: listing, registering,
  loading the ensemble, scoring and writing, all in this process (``--rescore`` each round).

Both score the same images with the same random-weight 4-network bundle and settings; rounds are
interleaved (celery, embedded, celery, ...). Target: celery >= 90% of embedded.

    .venv/bin/python benchmarks/queue_overhead.py [--images 16] [--repeats 3] [--size 1024] \
        [--redis redis://127.0.0.1:6379/13] [--pg-admin postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ensemble_throughput import make_images, random_bundle  # noqa: E402
from machine import describe, interleaved, median  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
PG_BASE = os.environ.get("BENCH_PG_BASE", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/13")


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def start_worker(env: dict[str, str], queue: str, log_path: Path) -> subprocess.Popen[bytes]:
    args = [
        sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queue,
        "--pool", "solo", "-n", f"{queue}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while " ready." not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(
                f"the celery worker did not start:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=None, help="default: Settings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--redis", default=REDIS)
    args = parser.parse_args()

    from db.engine import dispose_engines, make_engine
    from db.migrate import upgrade
    from db.queries import job_progress
    from db.registry import register_bundle, set_active
    from deepcovid.bundle import install_bundle, load_bundle
    from deepcovid.devices import batch_size_for, resolve_device
    from deepcovid.queue import make_celery
    from deepcovid.settings import Settings
    from deepcovid.status import JobStatus
    from producer.enqueue import enqueue
    from producer.screen import screen

    tag = uuid.uuid4().hex[:8]
    queue = f"bench-queue-{tag}"
    database = f"bench_queue_{tag}"
    with tempfile.TemporaryDirectory(prefix="deepcovid-queue-bench-") as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        paths, origin = make_images(images, args.images, args.size)
        bundle = load_bundle(install_bundle(random_bundle(root / "bundle-src"), root / "bundles"))
        common: dict[str, str] = {
            "DEEPCOVID_STORAGE_ROOTS": str(images),
            "DEEPCOVID_BUNDLES_DIR": str(root / "bundles"),
            "DEEPCOVID_DEVICE": args.device,
        }
        if args.batch_size:
            common["DEEPCOVID_BATCH_SIZE"] = str(args.batch_size)
        pg_url = f"{PG_BASE}/{database}"
        worker_env = {
            **os.environ,
            **common,
            "DEEPCOVID_DATA_DIR": str(root / "worker-state"),
            "DEEPCOVID_DATABASE_URL": pg_url,
            "DEEPCOVID_BROKER_URL": args.redis,
            "DEEPCOVID_QUEUE": queue,
            "PYTHONPATH": str(ROOT),
        }
        celery_settings = Settings(
            storage_roots=[images],
            bundles_dir=root / "bundles",
            device=args.device,
            data_dir=root / "worker-state",
            database_url=pg_url,
            broker_url=args.redis,
            queue=queue,
            **({"batch_size": args.batch_size} if args.batch_size else {}),
        )
        embedded_settings = Settings(
            storage_roots=[images],
            bundles_dir=root / "bundles",
            device=args.device,
            data_dir=root / "embedded-state",
            database_url=None,
            **({"batch_size": args.batch_size} if args.batch_size else {}),
        )

        _admin(f'CREATE DATABASE "{database}"')
        worker = None
        app = make_celery(celery_settings)
        try:
            upgrade(pg_url)
            engine = make_engine(pg_url)
            register_bundle(
                engine, bundle_id=bundle.bundle_id, manifest=bundle.manifest, path=str(bundle.path)
            )
            set_active(engine, bundle.bundle_id)
            worker = start_worker(worker_env, queue, root / "worker.log")

            def via_celery() -> float:
                start = time.perf_counter()
                summary = enqueue(
                    str(images), settings=celery_settings, bundle_id=bundle.bundle_id, rescore=True, app=app
                )
                while job_progress(engine, summary.job_id).state != JobStatus.finished:
                    if worker is not None and worker.poll() is not None:
                        raise SystemExit(f"the worker died:\n{(root / 'worker.log').read_text()[-3000:]}")
                    time.sleep(0.05)
                elapsed = time.perf_counter() - start
                progress = job_progress(engine, summary.job_id)
                if progress.counts.get("scored", 0) != len(paths):
                    raise SystemExit(f"celery path scored {progress.counts} of {len(paths)} images")
                return len(paths) / elapsed

            scoring_only: list[float] = []

            def embedded() -> float:
                start = time.perf_counter()
                marks: list[float] = []
                summary = screen(
                    str(images),
                    settings=embedded_settings,
                    bundle=str(bundle.path),
                    rescore=True,
                    on_start=lambda _summary: marks.append(time.perf_counter()),
                )
                end = time.perf_counter()
                if summary.scored != len(paths):
                    raise SystemExit(f"embedded path scored {summary.scored} of {len(paths)} images")
                scoring_only.append(len(paths) / (end - marks[0]))
                return len(paths) / (end - start)

            print(describe(args.device))
            batch = batch_size_for(celery_settings, resolve_device(args.device))
            print(
                f"images  : {len(paths)} x {args.size}x{args.size} 8-bit gray PNG ({origin}); "
                f"batch {batch}, decode_threads {celery_settings.decode_threads}, "
                f"chunk {celery_settings.chunk_size}; medians of {args.repeats} interleaved rounds"
            )
            print(f"celery  : worker --pool solo, queue {queue} on {args.redis}, PostgreSQL db {database}")
            print("warming up (worker loads the bundle; SQLite created and migrated) ...", file=sys.stderr)
            via_celery()
            embedded()
            variants: dict[str, Callable[[], float]] = {"celery": via_celery, "embedded": embedded}
            scoring_only.clear()
            rates = interleaved(
                variants, args.repeats, log=lambda line: print(line, file=sys.stderr, flush=True)
            )
            rates["scoring"] = scoring_only
        finally:
            if worker is not None:
                stop(worker)
            dispose_engines()
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
            _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    celery_rate, embedded_rate = median(rates["celery"]), median(rates["embedded"])
    print()
    print(f"{'path':<52}{'images/s':>10}{'min..max':>16}")
    for name, label in (
        ("celery", "celery: enqueue -> worker (solo) -> PostgreSQL"),
        ("embedded", "embedded: deepcovid screen -> SQLite"),
        ("scoring", "  embedded after the ensemble is loaded"),
    ):
        values = rates[name]
        print(f"{label:<52}{median(values):>10.2f}{f'{min(values):.2f}..{max(values):.2f}':>16}")
    print(f"celery / embedded: {celery_rate / embedded_rate:.0%} (target >= 90%)")
    print(
        f"celery / embedded after loading: {celery_rate / median(rates['scoring']):.0%} "
        "(the stricter comparison: a warm worker vs an embedded run that has its ensemble loaded)"
    )


if __name__ == "__main__":
    main()
