"""Chunking streams: ``batched`` is itertools.batched (Python 3.12) for the 3.10+ this project supports.

Listing, registration and requeue stream millions of URIs through it without building a list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), without materialising the input."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch
