"""How much decoding may hold: the pixel and byte limits an image's header is checked against before any
pixel is decoded, and the byte budget every decode thread of a process shares.

The header check refuses one image too large on its own; the budget stops N threads from each holding an
image near the limit at the same time. An image's *decoded bytes* are what its decoder holds for it
(rows x columns x samples x bytes per sample, see ``Settings.max_decoded_bytes``); turning them into
8-bit pixels adds at most as much again, so one process's decodes hold about twice the limit at most.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from deepcovid.errors import DecodeError


def check_pixels(width: int, height: int, limit: int) -> None:
    """Refuse a declared size over ``limit`` pixels (``too_large``) or without pixels (``corrupt``)."""
    if width * height > limit:
        raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds {limit}")
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"declared size {width}x{height}")


def check_decoded_bytes(nbytes: int, limit: int, what: str) -> None:
    """Refuse an image whose header says decoding it would hold more than ``limit`` bytes."""
    if nbytes > limit:
        raise DecodeError(
            "too_large",
            f"{what} decodes to {nbytes} bytes, over the limit of {limit} (DEEPCOVID_MAX_DECODED_BYTES)",
        )


class ByteBudget:
    """A counting semaphore for bytes: ``hold(n, limit)`` waits until the bytes held, ``n`` included, fit
    within ``limit``.

    An image alone always proceeds, so nothing waits forever: the header check has already refused any
    image over the limit.
    """

    def __init__(self) -> None:
        self._held = 0
        self._changed = threading.Condition()

    @property
    def held(self) -> int:
        """Bytes held right now by every decode in progress."""
        return self._held

    @contextmanager
    def hold(self, nbytes: int, limit: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._held == 0 or self._held + nbytes <= limit)
            self._held += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._held -= nbytes
                self._changed.notify_all()


DECODING = ByteBudget()
"""The budget every decode of this process holds its decoded bytes against (Celery pool processes and
``screen`` each have their own)."""
