"""The Celery app that scores chunks: ``celery -A worker worker -Q deepcovid``.

Importing this package must stay light (no torch): Flower and ``celery inspect`` import it too,
and CUDA must never be initialised in a prefork parent.
"""

from __future__ import annotations

from deepcovid.queue import make_celery

app = make_celery()
app.conf.include = ["worker.tasks"]

__all__ = ["app"]
