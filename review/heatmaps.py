"""The Grad-CAM maps the viewer overlays: the ensemble's and each network's, for one image and bundle.

The ``heatmaps`` row of an (image, bundle) names the artifact the worker stored (``deepcovid.heatmaps``).
An image without one (heatmaps off, not flagged, or the store failed) has its maps computed here with
``deepcovid.explain`` from the source bytes (the bundle loaded once per process); either way they are kept
in a small in-memory cache, so the viewer always has them.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.engine import Engine

from db.models import Heatmap
from deepcovid import defaults
from deepcovid.artifacts import ArtifactError, ArtifactStore, open_artifacts
from deepcovid.errors import ImageError, UserError
from deepcovid.explain import CropGeometry
from deepcovid.heatmaps import load_heatmap
from deepcovid.overlay import COLOUR_MAP, crop_in_display
from deepcovid.results import ENSEMBLE_KEY
from deepcovid.settings import Settings

log = logging.getLogger(__name__)
heatmaps = Heatmap.__table__
MAX_ALPHA = 0.85  # the hottest pixel's opacity before the reviewer's own opacity control


class HeatmapUnavailable(Exception):
    """No map can be shown for this image; the message says why (never a URI)."""


@dataclass(frozen=True)
class HeatMaps:
    """Maps (224x224 in [0, 1]) by architecture and ``ENSEMBLE_KEY``, and where they lie on the image."""

    maps: dict[str, np.ndarray]
    geometry: CropGeometry

    @property
    def layers(self) -> list[str]:
        """The ensemble's map first, then each network's."""
        return [ENSEMBLE_KEY, *(k for k in self.maps if k != ENSEMBLE_KEY)]


def stored_maps(store: ArtifactStore | None, key: str) -> HeatMaps | None:
    """The maps stored under a ``heatmaps`` row's key; None when there is no store or the artifact cannot be
    read, and the maps are then computed."""
    if store is None:
        return None
    try:
        stored = load_heatmap(store, key)
    except ArtifactError as exc:
        log.info("stored heatmap unreadable, computing it instead: %s", exc)
        return None
    return HeatMaps(stored.maps, stored.geometry)


def _open_store(settings: Settings) -> ArtifactStore | None:
    """The workers' artifact store, or None when the settings refuse it (the maps are then computed)."""
    try:
        return open_artifacts(settings)
    except UserError as exc:
        log.warning("heatmap artifact store not used: %s", exc)
        return None


class HeatmapSource:
    """Maps for the viewer, from the artifact store or computed, cached per (image, bundle)."""

    def __init__(self, engine: Engine, settings: Settings, read: Callable[[str], bytes]) -> None:
        self.engine = engine
        self.settings = settings
        self.read = read  # uri -> bytes, through the storage layer
        self._cache: OrderedDict[tuple[int, str], HeatMaps] = OrderedDict()
        self._ensembles: dict[str, Any] = {}
        self._lock = threading.Lock()  # one Grad-CAM at a time: it uses every core
        self._store = _open_store(settings)

    def maps(self, image_id: int, bundle_id: str, uri: str) -> HeatMaps:
        key = (image_id, bundle_id)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(heatmaps).where(
                        heatmaps.c.image_id == image_id, heatmaps.c.bundle_id == bundle_id
                    )
                ).first()
            found = stored_maps(self._store, row.key) if row is not None and row.key else None
            if found is None:
                found = self._compute(bundle_id, uri)
            self._cache[key] = found
            while len(self._cache) > defaults.HEATMAP_CACHE:
                self._cache.popitem(last=False)
            return found

    def _compute(self, bundle_id: str, uri: str) -> HeatMaps:
        from deepcovid.explain import explain_bytes  # torch and captum: only once a map is asked for

        ensemble = self._ensemble(bundle_id)
        try:
            explained = explain_bytes(ensemble, self.read(uri))
        except ImageError as exc:
            raise HeatmapUnavailable(f"the image cannot be explained: {exc.reason}") from None
        return HeatMaps(explained.explanation.maps, explained.geometry)

    def _ensemble(self, bundle_id: str) -> Any:
        # torch: loaded with the first map asked for, not when the workbench starts
        from deepcovid.bundle import BundleError, find_bundle
        from deepcovid.ensemble import Ensemble

        if bundle_id not in self._ensembles:
            try:
                bundle = find_bundle(bundle_id, self.settings.effective_bundles_dir)
            except BundleError as exc:
                raise HeatmapUnavailable(str(exc)) from None
            self._ensembles.clear()  # one bundle's networks in memory at a time
            # Grad-CAM reads the torch networks' activations: load those, not the int8 ones (which keep none).
            no_int8 = self.settings.model_copy(update={"cpu_int8": "off"})
            self._ensembles[bundle_id] = Ensemble.from_bundle(bundle, device="cpu", settings=no_int8)
        return self._ensembles[bundle_id]


def heat_png(maps: HeatMaps, layer: str, size: tuple[int, int]) -> bytes:
    """One map as a transparent PNG of ``size`` (the rendered image's), coloured where it is hot and only
    over the crop the networks saw, to lay over the image."""
    import matplotlib

    if layer not in maps.maps:
        raise KeyError(layer)
    left, top, right, bottom = crop_in_display(maps.geometry, size)
    box = (max(1, right - left), max(1, bottom - top))
    heat = Image.fromarray(np.clip(maps.maps[layer], 0, 1).astype(np.float32), mode="F")
    values = np.clip(np.asarray(heat.resize(box, Image.Resampling.BILINEAR)), 0.0, 1.0)
    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    colours = matplotlib.colormaps[COLOUR_MAP](values)
    colours[..., 3] = MAX_ALPHA * values
    region = rgba[top : top + box[1], left : left + box[0]]
    h, w = region.shape[:2]
    region[:] = np.rint(colours[:h, :w] * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, "PNG")
    return out.getvalue()
