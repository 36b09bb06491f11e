"""``deepcovid worker``: a scoring worker, which is ``celery -A worker worker`` on the configured queue."""

from __future__ import annotations

import os
import shlex
import sys

import typer

from deepcovid.settings import get_settings


def celery_worker_args(
    queue: str, pool: str, concurrency: int | None, name: str | None, loglevel: str, events: bool
) -> list[str]:
    """The ``celery -A worker worker`` command line the ``deepcovid worker`` command runs."""
    args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queue, "--pool", pool]
    args += ["--loglevel", loglevel]
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    if name:
        args += ["-n", name]
    if events:
        args.append("-E")
    return args


def worker_command(
    queue: str = typer.Option(None, "--queue", "-Q", help="Queue to consume (default: DEEPCOVID_QUEUE)."),
    pool: str = typer.Option(
        "prefork", help="Celery pool: prefork (with -c 1 per GPU); solo enforces no time limit."
    ),
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Pool processes (default: CPUs)."),
    name: str = typer.Option(None, "--name", "-n", help="Worker node name, e.g. gpu0@%h."),
    loglevel: str = typer.Option("INFO", help="Log level."),
    events: bool = typer.Option(True, help="Send task events so Flower shows tasks."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the celery command and exit."),
) -> None:
    """Run a scoring worker: `celery -A worker worker` on the configured queue and broker."""
    from deepcovid.artifacts import open_artifacts  # boto3 with the S3 store: only for this command

    settings = get_settings()
    open_artifacts(settings)  # refused inside the archive: one line now, not a failed map per image
    args = celery_worker_args(queue or settings.queue, pool, concurrency, name, loglevel, events)
    if dry_run:
        typer.echo(shlex.join(args))
        return
    os.execv(args[0], args)
