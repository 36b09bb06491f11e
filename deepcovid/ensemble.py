"""Scoring a batch with the four networks, and combining their probabilities into one decision.

``combine`` is pure numpy so that evaluation applies exactly the rule that screening applies.

Ensemble policies (the score is what ROC curves are drawn over; the decision is what gets flagged):

- ``mean`` (default): score = mean of the networks' COVID probabilities; COVID when
  score >= ensemble threshold.
- ``majority``: score = fraction of networks whose own decision (probability >= its threshold) is
  COVID; COVID when score >= ensemble threshold. With the default 0.5 a tie (2 of 4) counts as COVID,
  favouring sensitivity as a screening tool should; 0.75 asks for 3 of 4.
- ``any``: score = the highest probability of any network; COVID when any network's own decision is
  COVID (the ensemble threshold is not used). Most sensitive, least specific.

Disagreement is max - min of the networks' probabilities for the image.

A network's probability is softmax(logits / T) with its bundle temperature T (1 for bundles without one):
calibrated before any threshold, since the thresholds were chosen on calibrated validation probabilities.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deepcovid.batches import normalize
from deepcovid.bundle import POLICIES, Bundle, check_preprocessing, load_bundle, load_networks
from deepcovid.cpu import cpu_inference_threads, cpu_streams, partition_networks
from deepcovid.devices import resolve_device
from deepcovid.gradcam import capture_layer
from deepcovid.int8 import load_int8_networks
from deepcovid.networks import COVID_INDEX, prepare_network
from deepcovid.precision import autocast_dtype, int8_refusal, validated_bf16_drift, validated_int8_drift
from deepcovid.preprocess import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE
from deepcovid.results import ENSEMBLE_KEY, ImageResult
from deepcovid.settings import Settings, get_settings
from deepcovid.status import ImageStatus

log = logging.getLogger(__name__)


def _int8_reason(bundle: Bundle, precision: str, settings: Settings) -> str:
    measured = validated_int8_drift(bundle)
    if measured is None:  # int8_refusal has checked; only for the type checker
        return "asked for"
    drift, auc = measured
    if precision == "int8" or settings.cpu_int8 == "on":
        return f"asked for, drift gate skipped (measured {drift:.4f}, AUC change {auc:.4f})"
    return (
        f"validated within {drift:.4f} of fp32 (tolerance {settings.int8_tolerance:.4f}), AUC change "
        f"up to {auc:.4f} on the bundle's validation images"
    )


@dataclass
class ScoreBatch:
    """Per-image outcomes of one batch; every array has one entry per image."""

    probabilities: dict[str, np.ndarray]
    decisions: dict[str, np.ndarray]
    ensemble_score: np.ndarray
    ensemble_decision: np.ndarray
    disagreement: np.ndarray
    thresholds: dict[str, float]
    policy: str = "mean"
    architectures: tuple[str, ...] = field(default=())
    # Each network's activations at its Grad-CAM layer, kept when asked (``Ensemble.score(keep=...)``):
    # the maps of these images come from this very forward pass.
    activations: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ensemble_score.shape[0])

    def result_fields(self, index: int) -> dict[str, Any]:
        """The score fields of ``deepcovid.results.ImageResult`` for image ``index`` (plain Python types)."""
        return {
            "probabilities": {arch: float(p[index]) for arch, p in self.probabilities.items()},
            "decisions": {arch: bool(d[index]) for arch, d in self.decisions.items()},
            "ensemble_score": float(self.ensemble_score[index]),
            "ensemble_decision": bool(self.ensemble_decision[index]),
            "disagreement": float(self.disagreement[index]),
            "thresholds": dict(self.thresholds),
        }

    def rows(self) -> list[dict[str, Any]]:
        return [self.result_fields(i) for i in range(len(self))]

    def to_result(self, index: int, uri: str, **extra: Any) -> ImageResult:
        """A scored ``ImageResult`` for image ``index`` (``extra``: info, size)."""
        return ImageResult(uri=uri, status=ImageStatus.scored, **self.result_fields(index), **extra)


def combine(
    probabilities: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float] | None = None,
    policy: str = "mean",
    ensemble_threshold: float = 0.5,
) -> ScoreBatch:
    """Per-network decisions and the ensemble score/decision from COVID probabilities (see module doc)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown ensemble policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if not probabilities:
        raise ValueError("combine needs the probabilities of at least one network")
    architectures = tuple(probabilities)
    probs = {arch: np.asarray(p, dtype=np.float64).reshape(-1) for arch, p in probabilities.items()}
    lengths = {p.shape[0] for p in probs.values()}
    if len(lengths) != 1:
        raise ValueError(f"networks scored different numbers of images: {sorted(lengths)}")
    given = dict(thresholds or {})
    missing = [arch for arch in architectures if thresholds is not None and arch not in given]
    if missing:
        raise ValueError(f"no threshold for {', '.join(missing)}")
    per_model = {arch: float(given.get(arch, 0.5)) for arch in architectures}

    stacked = np.stack([probs[arch] for arch in architectures])  # [models, images]
    decisions = {arch: probs[arch] >= per_model[arch] for arch in architectures}
    votes = np.stack([decisions[arch] for arch in architectures])
    if policy == "mean":
        score = stacked.mean(axis=0)
        decision = score >= ensemble_threshold
    elif policy == "majority":
        score = votes.mean(axis=0)
        decision = score >= ensemble_threshold
    else:  # any
        score = stacked.max(axis=0)
        decision = votes.any(axis=0)
    return ScoreBatch(
        probabilities=probs,
        decisions=decisions,
        ensemble_score=score,
        ensemble_decision=decision,
        disagreement=stacked.max(axis=0) - stacked.min(axis=0),
        thresholds={**per_model, ENSEMBLE_KEY: float(ensemble_threshold)},
        policy=policy,
        architectures=architectures,
    )


class Ensemble:
    """A bundle's networks loaded once onto one device, ready to score uint8 batches."""

    def __init__(
        self,
        bundle: Bundle,
        networks: Mapping[str, nn.Module],
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        streams: int = 1,
        *,
        int8: bool = False,
    ) -> None:
        self.bundle = bundle
        self.int8 = int8  # networks are deepcovid.int8.Int8Network: OpenVINO int8, fp32 elsewhere
        self.networks = dict(networks)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.architectures = tuple(self.networks)
        self.groups = partition_networks(self.architectures, streams)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self.thresholds = {arch: bundle.thresholds[arch] for arch in self.architectures}
        self.temperatures = {arch: bundle.temperatures[arch] for arch in self.architectures}
        self.policy = bundle.ensemble_policy
        self.ensemble_threshold = bundle.ensemble_threshold
        self._explainer: Ensemble | None = None

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    @property
    def precision(self) -> str:
        if self.int8:
            return "int8"
        return "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | str,
        device: str = "auto",
        precision: str = "auto",
        *,
        settings: Settings | None = None,
    ) -> Ensemble:
        """Load and verify the bundle, put its networks on ``device`` in eval mode, channels_last."""
        settings = settings or get_settings()
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        check_preprocessing(bundle, INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
        target = resolve_device(device)
        streams = cpu_streams(settings.cpu_streams, len(bundle.architectures), target)
        threads = cpu_inference_threads(settings.torch_threads, target, streams)
        if threads:
            torch.set_num_threads(threads)
        refusal = int8_refusal(target, precision, settings, bundle)
        if refusal is None:
            log.info("scoring in int8: %s", _int8_reason(bundle, precision, settings))
            int8 = load_int8_networks(bundle, cpu_inference_threads(settings.torch_threads, target, streams))
            return cls(bundle, int8, target, None, streams, int8=True)
        int8_wanted = precision == "auto" and target.type == "cpu" and settings.cpu_int8 != "off"
        if precision == "int8" or int8_wanted:
            log.info("not scoring in int8: %s", refusal)
        dtype = autocast_dtype(target, precision, settings, bundle)
        networks: dict[str, nn.Module] = {}
        for arch, model in load_networks(bundle).items():
            model = prepare_network(model, target)
            if settings.compile and target.type == "cuda":
                model = torch.compile(model)
            networks[arch] = model
        return cls(bundle, networks, target, dtype, streams)

    @property
    def explainer(self) -> Ensemble:
        """The ensemble Grad-CAM runs on: this one, or, when the networks are int8 (compiled OpenVINO models
        keep no activations), the bundle's fp32 torch networks, loaded on the first map asked for."""
        if not self.int8:
            return self
        if self._explainer is None:
            self._explainer = Ensemble.from_bundle(self.bundle, str(self.device), precision="fp32")
        return self._explainer

    @property
    def bf16_drift(self) -> float | None:
        """What training measured of bf16 on this bundle, when this ensemble scores in bf16 on CPU."""
        if self.device.type != "cpu" or self.autocast_dtype != torch.bfloat16:
            return None
        return validated_bf16_drift(self.bundle)

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch [B,3,H,W], got {batch.dtype} {tuple(batch.shape)}")
        if self.device.type == "cuda" and batch.device.type == "cpu":
            if not batch.is_pinned():
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return normalize(batch)

    @property
    def label(self) -> str:
        """Device and precision, stored with every prediction: ``cpu bfloat16``, ``cuda:0 float16``."""
        return f"{self.device} {self.precision}"

    @property
    def streams(self) -> int:
        return len(self.groups)

    def probabilities(
        self, batch: torch.Tensor, activations: dict[str, torch.Tensor] | None = None
    ) -> dict[str, np.ndarray]:
        """Each network's COVID probability for every image of a uint8 ``[B,3,224,224]`` batch;
        ``activations``, when given, receives each network's activations at its Grad-CAM layer."""
        if batch.shape[0] == 0:
            return {arch: np.zeros(0, dtype=np.float64) for arch in self.architectures}
        inputs = self._prepare(batch)
        if len(self.groups) == 1:
            covid = self._run_group(self.architectures, inputs, activations)
        else:
            pool = self._executor()
            futures = [pool.submit(self._run_group, group, inputs, activations) for group in self.groups]
            by_arch: dict[str, torch.Tensor] = {}
            for group, future in zip(self.groups, futures, strict=True):
                by_arch.update(zip(group, future.result(), strict=True))
            covid = torch.stack([by_arch[arch] for arch in self.architectures])
        covid = covid.to("cpu", dtype=torch.float64).numpy()  # one device sync for all networks
        return {arch: covid[i] for i, arch in enumerate(self.architectures)}

    def _run_group(
        self,
        architectures: Sequence[str],
        inputs: torch.Tensor,
        activations: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """COVID probabilities ``[networks, B]`` of some networks; inference mode and autocast are per
        thread, so each stream enters them itself."""
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode():
            with autocast:
                outputs = [self._forward(arch, inputs, activations) for arch in architectures]
            return torch.stack(
                [
                    torch.softmax(out.float() / self.temperatures[arch], dim=1)[:, COVID_INDEX]
                    for arch, out in zip(architectures, outputs, strict=True)
                ]
            )

    def _forward(
        self, arch: str, inputs: torch.Tensor, activations: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """One network's logits; with ``activations``, its Grad-CAM layer's activations are kept there."""
        model = self.networks[arch]
        if activations is None:
            return model(inputs)
        with capture_layer(model, arch, activations):
            return model(inputs)

    def _executor(self) -> ThreadPoolExecutor:
        # A pool made before a fork has no threads in the child: make a new one there.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(len(self.groups), thread_name_prefix="deepcovid-stream")
            self._pool_pid = os.getpid()
        return self._pool

    def score(self, batch: torch.Tensor, *, keep_activations: bool = False) -> ScoreBatch:
        """Probabilities, per-network decisions and the ensemble decision for one uint8 batch;
        ``keep_activations``: with what ``deepcovid.explain.explain_scored`` makes maps from (never for
        int8 networks: their maps come from ``explainer``)."""
        activations: dict[str, torch.Tensor] | None = {} if keep_activations and not self.int8 else None
        scored = combine(
            self.probabilities(batch, activations), self.thresholds, self.policy, self.ensemble_threshold
        )
        scored.activations = activations or {}
        return scored
