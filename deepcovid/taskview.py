"""What a worker shows of a chunk message: ``celery inspect active|reserved|scheduled``, the task-received
event Flower lists, and the request's repr count the URIs and never list them.

Celery takes these from the message's ``argsrepr``/``kwargsrepr`` headers when asked for a "safe" view,
and from the raw arguments otherwise; a message sent without those headers (a retry, another client)
would show the URIs either way. So the view is rebuilt here from the arguments themselves. The worker
loads this class by name (``ChunkTask.Request`` in deepcovid.queue), so the producer never imports it.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

from deepcovid.queue import chunk_reprs


class SafeRequest(Request):
    """A chunk request whose every view shows ``<N URIs>`` instead of its URIs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._argsrepr = f"<{len(self._args)} args>" if self._args else "()"
        self._kwargsrepr = _kwargsrepr(self._kwargs)

    def info(self, safe: bool = False) -> dict[str, Any]:
        """The request as ``celery inspect`` reports it: always the safe view."""
        return super().info(safe=True)


def _kwargsrepr(kwargs: Any) -> str:
    """The chunk's keyword arguments with the URIs counted; anything unexpected is not shown at all."""
    if not isinstance(kwargs, dict):
        return "<hidden>"
    job_id, bundle_id, uris = kwargs.get("job_id"), kwargs.get("bundle_id"), kwargs.get("uris")
    if not isinstance(job_id, int) or not isinstance(bundle_id, str) or not isinstance(uris, list):
        return f"<{len(kwargs)} hidden arguments>"
    return chunk_reprs(job_id, bundle_id, uris)["kwargsrepr"]
