"""Score one chunk of URIs: read and decode in a thread pool while the ensemble scores the previous batch.

Decoding (Pillow, pydicom, numpy) and inference (torch) both release the GIL, so a pool of
``decode_threads`` keeps the next batch ready while the current one is being scored.
One failing image is recorded as failed and never fails the others.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deepcovid.defaults import DECODE_WINDOW_BATCHES
from deepcovid.devices import batch_size_for
from deepcovid.eligibility import Eligibility
from deepcovid.errors import ImageError, TransientError
from deepcovid.preprocess import load_image
from deepcovid.results import ImageResult
from deepcovid.settings import HeatmapMode, Settings
from deepcovid.status import ImageStatus
from deepcovid.storage import Storage

if TYPE_CHECKING:  # torch comes with the ensemble handed in: pool processes import this module fast
    from deepcovid.artifacts import ArtifactStore
    from deepcovid.ensemble import Ensemble

# URIs may carry patient names: never logged, at any level. Failures log their reason, and unexpected ones
# their stack without the exception's message (which may quote a path).
log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    """One image read and preprocessed, waiting for its batch."""

    pixels: np.ndarray
    info: dict[str, Any]
    size: int


def _must_propagate() -> tuple[type[BaseException], ...]:
    """Exceptions that end the chunk rather than one image: retry signals and Celery's time limit."""
    kinds: list[type[BaseException]] = [TransientError]
    try:
        from billiard.exceptions import SoftTimeLimitExceeded

        kinds.append(SoftTimeLimitExceeded)
    except ImportError:  # pragma: no cover - billiard ships with celery
        pass
    return tuple(kinds)


def _name_of(uri: str) -> str:
    """The file name: the decoder uses its extension as a hint (e.g. ``.dcm``)."""
    return os.path.basename(uri.rstrip("/"))


def _prepare(
    storage: Storage,
    uri: str,
    settings: Settings,
    propagate: tuple[type[BaseException], ...],
    eligibility: Eligibility | None,
) -> Any:
    size: int | None = None
    try:
        data = storage.read(uri)
        size = len(data)
        pixels, info = load_image(
            data,
            name=_name_of(uri),
            max_pixels=settings.max_image_pixels,
            max_decoded_bytes=settings.max_decoded_bytes,
            eligibility=eligibility,
        )
        return _Prepared(pixels=pixels, info=info.as_dict(), size=size)
    except ImageError as exc:
        log.debug("an image failed: %s", exc.reason)
        return ImageResult.failed(uri, exc.reason, exc.detail, size=size)
    except propagate:
        raise
    except Exception as exc:
        log.debug("unexpected %s reading or decoding an image:\n%s", type(exc).__name__, _stack(exc))
        return ImageResult.failed(uri, "internal_error", type(exc).__name__, size=size)


def _stack(exc: BaseException) -> str:
    return "".join(traceback.format_tb(exc.__traceback__))


def _score_batch(
    uris: Sequence[str],
    pending: list[tuple[int, _Prepared]],
    ensemble: Ensemble,
    propagate: tuple[type[BaseException], ...],
    maps: _Maps | None = None,
) -> list[tuple[int, ImageResult]]:
    """Score a batch (and make the maps ``maps`` asks for, from the same forward pass); if the batch as a
    whole fails, score its images one by one to isolate the cause."""
    from deepcovid.batches import collate  # torch: pool processes import this module and must start fast

    try:
        inputs = collate([p.pixels for _, p in pending])
        batch = ensemble.score(inputs, keep_activations=True) if maps else ensemble.score(inputs)
    except propagate:
        raise
    except Exception as exc:
        if len(pending) == 1:
            i, prepared = pending[0]
            log.error("scoring one image failed with %s", type(exc).__name__)
            log.debug("where scoring failed:\n%s", _stack(exc))
            failed = ImageResult.failed(
                uris[i], "internal_error", type(exc).__name__, info=prepared.info, size=prepared.size
            )
            return [(i, failed)]
        log.warning(
            "a batch of %d failed with %s; scoring its images one by one", len(pending), type(exc).__name__
        )
        out: list[tuple[int, ImageResult]] = []
        for item in pending:
            out.extend(_score_batch(uris, [item], ensemble, propagate, maps))
        return out
    results = [batch.to_result(j, uris[i], info=p.info, size=p.size) for j, (i, p) in enumerate(pending)]
    if maps is not None:
        from deepcovid.heatmaps import attach_heatmaps  # torch, as above

        sizes = [(int(p.info["width"]), int(p.info["height"])) for _, p in pending]
        attach_heatmaps(ensemble, batch, results, sizes, maps.mode, maps.store, propagate, inputs)
    return [(i, result) for (i, _), result in zip(pending, results, strict=True)]


@dataclass
class _Maps:
    """Which scored images get Grad-CAM maps, and where they are stored."""

    mode: HeatmapMode
    store: ArtifactStore


def score_chunk(
    uris: Sequence[str],
    *,
    storage: Storage,
    ensemble: Ensemble,
    settings: Settings,
    on_batch: Callable[[int], None] | None = None,
    on_results: Callable[[list[ImageResult]], None] | None = None,
    artifacts: ArtifactStore | None = None,
) -> list[ImageResult]:
    """One ImageResult per URI, in the order given.

    With ``artifacts``, the images DEEPCOVID_HEATMAPS asks for get Grad-CAM maps stored there, made from
    the scoring pass itself (``deepcovid.heatmaps``); each result's ``heatmap`` says which key or why not.

    ``on_batch(n)`` is called after each batch with the number of images finished (scored or
    failed) since the previous call, for progress bars; ``on_results`` gets those results themselves,
    so a worker can commit them before a time limit stops the chunk. TransientError propagates (the
    caller retries the chunk); every other per-image problem becomes a failed result.
    """
    uris = list(uris)
    results: list[ImageResult | None] = [None] * len(uris)
    if not uris:
        return []
    propagate = _must_propagate()
    maps = None
    if artifacts is not None and settings.heatmaps != HeatmapMode.none:
        maps = _Maps(settings.heatmaps, artifacts)
    eligibility = Eligibility.from_settings(settings)
    batch_size = batch_size_for(settings, ensemble.device)
    threads = max(1, min(settings.decode_threads, len(uris)))

    # Decoding runs at most this many images ahead of scoring: a chunk's memory does not grow with its
    # length, and a preprocessed image is dropped as soon as its batch is scored.
    window = batch_size * DECODE_WINDOW_BATCHES + threads
    pool = ThreadPoolExecutor(threads, thread_name_prefix="deepcovid-decode")
    try:
        in_flight: dict[Future[Any], int] = {}
        next_uri = 0
        pending: list[tuple[int, _Prepared]] = []
        finished_since_report: list[int] = []

        def submit_up_to_window() -> None:
            nonlocal next_uri
            while next_uri < len(uris) and len(in_flight) + len(pending) < window:
                future = pool.submit(_prepare, storage, uris[next_uri], settings, propagate, eligibility)
                in_flight[future] = next_uri
                next_uri += 1

        def flush() -> None:
            nonlocal pending, finished_since_report
            if pending:
                for i, result in _score_batch(uris, pending, ensemble, propagate, maps):
                    results[i] = result
                finished_since_report.extend(i for i, _ in pending)
                pending = []
            if finished_since_report:
                if on_results is not None:
                    on_results([results[i] for i in finished_since_report])  # type: ignore[misc]
                if on_batch is not None:
                    on_batch(len(finished_since_report))
            finished_since_report = []

        submit_up_to_window()
        while in_flight:
            # Batches are formed in completion order: one slow image (a large JPEG 2000 DICOM) does not
            # hold back the images decoded after it.
            completed, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in completed:
                i = in_flight.pop(future)
                outcome = future.result()
                if isinstance(outcome, ImageResult):
                    results[i] = outcome
                    finished_since_report.append(i)
                    continue
                pending.append((i, outcome))
                if len(pending) >= batch_size:
                    flush()
            submit_up_to_window()
        flush()
    finally:
        # On an exception the queued reads are dropped instead of finishing the whole chunk.
        pool.shutdown(wait=True, cancel_futures=True)

    done = [r for r in results if r is not None]
    reasons = Counter(r.reason for r in done if r.status is ImageStatus.failed)
    log.info(
        "chunk of %d: %d scored, %d failed%s",
        len(uris),
        len(done) - sum(reasons.values()),
        sum(reasons.values()),
        f" ({', '.join(f'{k}={v}' for k, v in sorted(reasons.items()))})" if reasons else "",
    )
    return done
