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
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from deepcovid.bundle import POLICIES, Bundle, BundleError, load_bundle, load_networks
from deepcovid.networks import COVID_INDEX

if TYPE_CHECKING:
    import torch
    from torch import nn

    from deepcovid.results import ImageResult
    from deepcovid.settings import Settings

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


# One image through each network on one CPU core, in ms (AMD EPYC, AVX-512, fp32, batch 16, BatchNorm
# folded). Only the ratios matter: they balance the networks across CPU streams.
CPU_COST_MS = {"resnet18": 18.0, "resnet50": 51.0, "squeezenet1_1": 5.0, "densenet121": 45.0}


def cpu_streams(configured: int, networks: int, device: torch.device) -> int:
    """How many networks run at the same time on CPU: the configured count, else one per core (at most
    one per network). Always 1 on CUDA, where kernels are queued asynchronously anyway.

    Whole networks side by side, each on its own core, beat one network at a time over all cores:
    OpenMP's per-layer barriers wait for whichever core the decode threads preempted (docs/performance.md).
    """
    if device.type != "cpu" or networks < 2:
        return 1
    wanted = configured if configured > 0 else (os.cpu_count() or 1)
    return max(1, min(wanted, networks))


def cpu_inference_threads(configured: int, device: torch.device, streams: int = 1) -> int:
    """Torch threads per CPU stream: the configured count, else the cores shared out between streams."""
    if configured > 0:
        return configured
    if device.type != "cpu":
        return 0
    return max(1, (os.cpu_count() or 1) // max(1, streams))


def partition_networks(architectures: Sequence[str], streams: int) -> list[tuple[str, ...]]:
    """Split the networks into ``streams`` groups of about equal CPU cost (longest first, to the
    cheapest group), each group keeping the ensemble's order."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(streams, len(architectures))))]
    loads = [0.0] * len(groups)
    default = max(CPU_COST_MS.values())
    for arch in sorted(architectures, key=lambda a: -CPU_COST_MS.get(a, default)):
        k = loads.index(min(loads))
        groups[k].append(arch)
        loads[k] += CPU_COST_MS.get(arch, default)
    order = {arch: i for i, arch in enumerate(architectures)}
    return [tuple(sorted(group, key=order.__getitem__)) for group in groups]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda``/``cuda:N`` must exist; raises ValueError otherwise."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"invalid device {name!r}: {exc}") from exc
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")


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
        from deepcovid.results import ImageResult

        return ImageResult(uri=uri, status="scored", **self.result_fields(index), **extra)


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
        thresholds={**per_model, "ensemble": float(ensemble_threshold)},
        policy=policy,
        architectures=architectures,
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); elsewhere oneDNN emulates bf16,
    which is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def synthetic_batch(count: int = 8, seed: int = 0) -> np.ndarray:
    """A fixed uint8 ``[count,3,224,224]`` batch of smooth X-ray-like shapes with noise, for tests and
    benchmarks that need realistic-looking input without patient images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 223.0
    out = np.empty((count, 3, 224, 224), dtype=np.uint8)
    for i in range(count):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = 0.5 + 0.3 * np.sin(6 * a * xx + 3 * b * yy) * np.cos(4 * c * yy)
        img += rng.normal(0, 0.05, img.shape)
        out[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


BF16_CHECK_KEY = "bf16_max_abs_diff"  # in a bundle's validation metrics: per network, measured by `train`


def validated_bf16_drift(bundle: Bundle) -> float | None:
    """The largest bf16-vs-fp32 change of a COVID probability that training measured on this bundle's
    validation images (any network), or None when the bundle carries no such check."""
    recorded = bundle.metrics.get("validation", {}).get(BF16_CHECK_KEY)
    if not isinstance(recorded, dict) or any(arch not in recorded for arch in bundle.architectures):
        return None
    return max(float(recorded[arch]) for arch in bundle.architectures)


def _autocast_dtype(
    device: torch.device, precision: str, settings: Settings, bundle: Bundle | None = None
) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. On CPU ``auto`` follows ``settings.cpu_bf16``: in its
    ``auto`` mode bf16 needs bf16 instructions and a bundle validated in bf16 within the tolerance."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise ValueError("fp16 is only supported on CUDA; use fp32 or bf16 on CPU")
    if precision == "bf16" or settings.cpu_bf16 == "on":
        return torch.bfloat16
    if settings.cpu_bf16 == "off" or not cpu_has_native_bf16():
        return None
    drift = validated_bf16_drift(bundle) if bundle is not None else None
    if drift is None:
        log.info("scoring in fp32: the bundle records no bf16 check on validation images")
        return None
    if drift > settings.bf16_tolerance:
        log.info(
            "scoring in fp32: bf16 moved validation probabilities by up to %.4f (tolerance %.4f)",
            drift,
            settings.bf16_tolerance,
        )
        return None
    log.info("scoring in bf16: validated within %.4f of fp32 on the bundle's validation images", drift)
    return torch.bfloat16


def precision_drift(
    networks: Mapping[str, nn.Module],
    images: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int = 32,
) -> dict[str, float]:
    """Per network, the largest |autocast(dtype) - fp32| COVID probability over uint8 ``images``
    (``networks`` as ``prepare_network`` makes them, to measure what workers will run)."""
    import torch

    from deepcovid.preprocess import normalize

    worst = dict.fromkeys(networks, 0.0)
    with torch.inference_mode():
        for start in range(0, int(images.shape[0]), batch_size):
            inputs = normalize(images[start : start + batch_size].to(device))  # as Ensemble._prepare does
            for arch, model in networks.items():
                exact = torch.softmax(model(inputs).float(), dim=1)[:, COVID_INDEX]
                with torch.autocast(device_type=device.type, dtype=dtype):
                    fast = torch.softmax(model(inputs).float(), dim=1)[:, COVID_INDEX]
                worst[arch] = max(worst[arch], float((fast - exact).abs().max()))
    return worst


class Ensemble:
    """A bundle's networks loaded once onto one device, ready to score uint8 batches."""

    def __init__(
        self,
        bundle: Bundle,
        networks: Mapping[str, nn.Module],
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        streams: int = 1,
    ) -> None:
        self.bundle = bundle
        self.networks = dict(networks)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.architectures = tuple(self.networks)
        self.groups = partition_networks(self.architectures, streams)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self.thresholds = {arch: bundle.thresholds[arch] for arch in self.architectures}
        self.policy = bundle.ensemble_policy
        self.ensemble_threshold = bundle.ensemble_threshold

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    @property
    def precision(self) -> str:
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
        import torch

        from deepcovid.preprocess import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE

        if settings is None:
            from deepcovid.settings import get_settings

            settings = get_settings()
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        _check_preprocessing(bundle, INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
        target = resolve_device(device)
        streams = cpu_streams(settings.cpu_streams, len(bundle.architectures), target)
        threads = cpu_inference_threads(settings.torch_threads, target, streams)
        if threads:
            torch.set_num_threads(threads)
        dtype = _autocast_dtype(target, precision, settings, bundle)
        networks: dict[str, nn.Module] = {}
        for arch, model in load_networks(bundle).items():
            model = prepare_network(model, target)
            if settings.compile and target.type == "cuda":
                model = torch.compile(model)
            networks[arch] = model
        return cls(bundle, networks, target, dtype, streams)

    @property
    def bf16_drift(self) -> float | None:
        """What training measured of bf16 on this bundle, when this ensemble scores in bf16 on CPU."""
        import torch

        if self.device.type != "cpu" or self.autocast_dtype != torch.bfloat16:
            return None
        return validated_bf16_drift(self.bundle)

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        from deepcovid.preprocess import normalize

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

    def probabilities(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """Each network's COVID probability for every image of a uint8 ``[B,3,224,224]`` batch."""
        import torch

        if batch.shape[0] == 0:
            return {arch: np.zeros(0, dtype=np.float64) for arch in self.architectures}
        inputs = self._prepare(batch)
        if len(self.groups) == 1:
            covid = self._run_group(self.architectures, inputs)
        else:
            pool = self._executor()
            futures = [pool.submit(self._run_group, group, inputs) for group in self.groups]
            by_arch: dict[str, torch.Tensor] = {}
            for group, future in zip(self.groups, futures, strict=True):
                by_arch.update(zip(group, future.result(), strict=True))
            covid = torch.stack([by_arch[arch] for arch in self.architectures])
        covid = covid.to("cpu", dtype=torch.float64).numpy()  # one device sync for all networks
        return {arch: covid[i] for i, arch in enumerate(self.architectures)}

    def _run_group(self, architectures: Sequence[str], inputs: torch.Tensor) -> torch.Tensor:
        """COVID probabilities ``[networks, B]`` of some networks; inference mode and autocast are per
        thread, so each stream enters them itself."""
        import torch

        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode():
            with autocast:
                outputs = [self.networks[arch](inputs) for arch in architectures]
            return torch.stack([torch.softmax(out.float(), dim=1)[:, COVID_INDEX] for out in outputs])

    def _executor(self) -> ThreadPoolExecutor:
        # A pool made before a fork has no threads in the child: make a new one there.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(len(self.groups), thread_name_prefix="deepcovid-stream")
            self._pool_pid = os.getpid()
        return self._pool

    def score(self, batch: torch.Tensor) -> ScoreBatch:
        """Probabilities, per-network decisions and the ensemble decision for one uint8 batch."""
        return combine(self.probabilities(batch), self.thresholds, self.policy, self.ensemble_threshold)


def prepare_network(model: nn.Module, device: torch.device) -> nn.Module:
    """A network as workers run it: eval mode, BatchNorm folded, channels_last on ``device``, no grads."""
    import torch

    model = fold_batchnorm(model.eval())
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model.requires_grad_(False)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution.

    One operation instead of two per layer at inference (all of a ResNet's BatchNorms; DenseNet's
    stem only, its other norms precede their convolutions). A model in training mode, without
    BatchNorm, or that torch.fx cannot trace is returned as it is.
    """
    from torch import nn

    if model.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model, inplace=False).eval()
    except Exception as exc:  # tracing is best effort: the unfolded model scores the same, only slower
        log.warning("BatchNorm not folded for %s (%s): scoring unfolded", type(model).__name__, exc)
        return model


def _check_preprocessing(bundle: Bundle, input_size: int, mean: Any, std: Any) -> None:
    """Refuse a bundle trained with inputs this build's preprocessing does not produce."""
    manifest = bundle.manifest
    norm = manifest.get("normalization", {})

    def same(recorded: Any, used: Any) -> bool:
        recorded, used = np.asarray(recorded, dtype=float), np.asarray(used, dtype=float)
        return recorded.shape == used.shape and bool(np.allclose(recorded, used, atol=1e-6))

    if (
        int(manifest.get("input_size", -1)) != int(input_size)
        or not same(norm.get("mean", []), mean)
        or not same(norm.get("std", []), std)
    ):
        raise BundleError(
            f"bundle {bundle.bundle_id} expects input size {manifest.get('input_size')} and normalisation "
            f"{norm}; this build preprocesses to {input_size} with mean {list(mean)} and std {list(std)}"
        )
