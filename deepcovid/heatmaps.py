"""Grad-CAM maps of scored images, stored as artifacts: made right after scoring, read by the review app.

One artifact per (image, bundle), key ``deepcovid.artifacts.artifact_key("heatmaps", uri, bundle)``: a
compressed NumPy ``.npz`` (read with ``allow_pickle=False``) holding

- ``map_<arch>`` for each network and ``map_ensemble``: ``uint8`` 224x224, the map in [0, 1] times 255;
- ``meta``: a JSON string with ``format`` (1), ``bundle_id``, ``policy``, ``architectures``,
  ``probabilities`` (what each map explains, the ensemble's under ``ensemble``) and ``geometry``
  (``CropGeometry.as_dict``: where the 224x224 crop lies on the original image as displayed).

No overlay PNG is stored: drawing one needs the original image at full size, which scoring never decodes.
The review app and the PACS secondary capture draw it from the map and the original
(``overlay_from_store``) at the size they show.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deepcovid.artifacts import ArtifactError, ArtifactStore, artifact_key
from deepcovid.explain import CropGeometry, Explanation, explain_scored
from deepcovid.results import ENSEMBLE_KEY, HeatmapOutcome, ImageResult
from deepcovid.settings import HeatmapMode

if TYPE_CHECKING:
    from deepcovid.ensemble import Ensemble, ScoreBatch

log = logging.getLogger(__name__)

FORMAT = 1
KIND = "heatmaps"
SUFFIX = ".npz"
LEVELS = 255  # a stored map holds round(map * LEVELS) as uint8: finer than any colour map shows


@dataclass
class StoredHeatmap:
    """A map artifact read back: float32 224x224 maps in [0, 1] by architecture and ``ENSEMBLE_KEY``."""

    maps: dict[str, np.ndarray]
    probabilities: dict[str, float]
    geometry: CropGeometry
    bundle_id: str
    policy: str


def heatmap_key(uri: str, bundle_id: str) -> str:
    """The artifact key of an image's maps under a bundle: the same for every delivery, opaque."""
    return artifact_key(KIND, uri, bundle_id, SUFFIX)


def wanted(mode: HeatmapMode, result: ImageResult) -> bool:
    """Whether ``DEEPCOVID_HEATMAPS`` asks for this result's maps."""
    if not result.scored or mode == HeatmapMode.none:
        return False
    return mode == HeatmapMode.all or bool(result.ensemble_decision)


def encode(explanation: Explanation, geometry: CropGeometry, bundle_id: str, policy: str) -> bytes:
    """One image's maps as the artifact's bytes (see the module doc)."""
    meta = {
        "format": FORMAT,
        "bundle_id": bundle_id,
        "policy": policy,
        "architectures": [name for name in explanation.maps if name != ENSEMBLE_KEY],
        "probabilities": explanation.probabilities,
        "geometry": geometry.as_dict(),
    }
    arrays = {
        f"map_{name}": np.round(np.clip(heat, 0.0, 1.0) * LEVELS).astype(np.uint8)
        for name, heat in explanation.maps.items()
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    return buffer.getvalue()


def decode(data: bytes) -> StoredHeatmap:
    """The artifact's bytes read back; raises ArtifactError when they are not a map artifact."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            maps = {
                name.removeprefix("map_"): stored[name].astype(np.float32) / LEVELS
                for name in stored.files
                if name.startswith("map_")
            }
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"not a heatmap artifact ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"heatmap artifact format {meta.get('format')!r}; this version reads {FORMAT}")
    g = meta["geometry"]
    geometry = CropGeometry(int(g["width"]), int(g["height"]), float(g["scale"]), tuple(g["box"]))
    return StoredHeatmap(maps, meta["probabilities"], geometry, meta["bundle_id"], meta["policy"])


def load_heatmap(store: ArtifactStore, key: str) -> StoredHeatmap:
    """The maps stored under ``key`` (the ``heatmaps.key`` column, the results export's ``heatmap``)."""
    return decode(store.get(key))


def overlay_from_store(
    store: ArtifactStore, key: str, pixels: np.ndarray, *, arch: str = ENSEMBLE_KEY, **options: Any
) -> bytes:
    """An overlay PNG of one stored map on the original image's display pixels (``decode`` of the file:
    EXIF-rotated, MONOCHROME1 inverted); ``options`` as ``deepcovid.overlay.overlay_png``."""
    from deepcovid.overlay import overlay_png

    stored = load_heatmap(store, key)
    if arch not in stored.maps:
        raise KeyError(f"no map for {arch!r}; stored: {', '.join(stored.maps)}")
    return overlay_png(pixels, stored.maps[arch], stored.geometry, **options)


def attach_heatmaps(
    ensemble: Ensemble,
    scored: ScoreBatch,
    results: Sequence[ImageResult],
    sizes: Sequence[tuple[int, int]],
    mode: HeatmapMode,
    store: ArtifactStore,
    propagate: tuple[type[BaseException], ...] = (),
    inputs: torch.Tensor | None = None,
) -> None:
    """Make, store and attach (``result.heatmap``) the maps ``mode`` asks for of a batch just scored with
    ``keep_activations``; ``sizes`` are the images' (width, height) as displayed.

    An int8 ensemble keeps no activations: the chosen images of ``inputs`` (the batch it scored, still in
    memory) go once more through its fp32 ``explainer``, so those maps explain the fp32 probability, which
    the int8 gate keeps within ``DEEPCOVID_INT8_TOLERANCE`` of the stored one.

    Failing to make or store a map fails only that map: the result stays scored, and ``heatmap.error``
    says why (never a URI or path). ``propagate``: exceptions that must end the chunk (time limits).
    """
    chosen = [i for i, result in enumerate(results) if wanted(mode, result)]
    if not chosen:
        return
    geometries = {i: CropGeometry.for_size(*sizes[i]) for i in chosen}
    try:
        if ensemble.int8:
            if inputs is None:
                raise ValueError("an int8 ensemble's maps need the scored inputs")
            picked = inputs[torch.as_tensor(chosen, dtype=torch.long)]
            explainer = ensemble.explainer
            rescored = explainer.score(picked, keep_activations=True)
            explanations = explain_scored(explainer, rescored, range(len(chosen)))
        else:
            explanations = explain_scored(ensemble, scored, chosen)
    except propagate:
        raise
    except Exception as exc:
        log.error("making Grad-CAM maps for %d images failed with %s", len(chosen), type(exc).__name__)
        for i in chosen:
            results[i].heatmap = HeatmapOutcome(
                error=f"the map could not be made ({type(exc).__name__})", geometry=geometries[i].as_dict()
            )
        return
    errors: Counter[str] = Counter()
    for i, explanation in zip(chosen, explanations, strict=True):
        outcome = _store(ensemble, results[i].uri, explanation, geometries[i], store, propagate)
        results[i].heatmap = outcome
        if outcome.error:
            errors[outcome.error] += 1
    for error, count in errors.items():
        log.warning("%d of %d Grad-CAM maps not stored: %s", count, len(chosen), error)


def _store(
    ensemble: Ensemble,
    uri: str,
    explanation: Explanation,
    geometry: CropGeometry,
    store: ArtifactStore,
    propagate: tuple[type[BaseException], ...],
) -> HeatmapOutcome:
    key = heatmap_key(uri, ensemble.bundle_id)
    try:
        store.put(key, encode(explanation, geometry, ensemble.bundle_id, ensemble.policy))
    except propagate:
        raise
    except ArtifactError as exc:
        return HeatmapOutcome(error=str(exc)[:255], geometry=geometry.as_dict())
    except Exception as exc:
        return HeatmapOutcome(
            error=f"the map could not be stored ({type(exc).__name__})", geometry=geometry.as_dict()
        )
    return HeatmapOutcome(key=key, geometry=geometry.as_dict())
