"""What scoring one image produces: the record handed from the scoring pipeline to the database.

Kept free of torch so the database layer and the CLI can import it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from deepcovid.status import ImageStatus

ENSEMBLE_KEY = "ensemble"
"""The key of the ensemble's own threshold (and scores) beside the networks' in every per-scorer dict."""


@dataclass
class HeatmapOutcome:
    """The Grad-CAM artifact made for a scored image: its opaque key, or why there is none (the score
    stands either way), and where the 224x224 crop lies on the image (``CropGeometry.as_dict``)."""

    key: str | None = None
    error: str | None = None
    geometry: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageResult:
    """The outcome for one image URI: either a score or a failure with its reason."""

    uri: str
    status: ImageStatus
    # Failure (status failed): a reason from deepcovid.errors.REASONS and a human detail.
    reason: str | None = None
    detail: str | None = None
    # Score (status scored): per-architecture COVID probability and decision at its threshold.
    probabilities: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, bool] = field(default_factory=dict)
    ensemble_score: float | None = None
    ensemble_decision: bool | None = None
    disagreement: float | None = None
    # Thresholds used: one per architecture plus ENSEMBLE_KEY.
    thresholds: dict[str, float] = field(default_factory=dict)
    # What the decoder learnt: format, width, height, bit_depth, mode and, for DICOM,
    # study/series/SOP instance UIDs, modality, view position, body part. Never patient identity.
    info: dict[str, Any] = field(default_factory=dict)
    size: int | None = None  # bytes read
    heatmap: HeatmapOutcome | None = None  # None: no map was asked for (DEEPCOVID_HEATMAPS)

    def __post_init__(self) -> None:
        self.status = ImageStatus(self.status)

    @classmethod
    def failed(cls, uri: str, reason: str, detail: str = "", **kw: Any) -> ImageResult:
        return cls(uri=uri, status=ImageStatus.failed, reason=reason, detail=detail, **kw)

    @property
    def scored(self) -> bool:
        return self.status is ImageStatus.scored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
