"""Per-architecture training checkpoints: tensors in safetensors, everything else as JSON metadata.

One file per state (``last`` after every epoch, ``best`` when validation AUC improves), written
beside its final name and renamed, so a crash leaves the previous complete checkpoint. Nothing is
pickled: the optimizer's tensors go into the safetensors file and its plain values into the JSON.
``last`` also holds the ``FitState`` a resumed run continues from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

_STATE_KEY = "training_state"


def _plain(value: Any) -> Any:
    """Torch/numpy values to JSON values (optimizer param groups hold floats, bools, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    *,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    rng: bool = True,
) -> None:
    """Write model (and optimizer) tensors plus the JSON ``state`` atomically to ``path``."""
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
    }
    meta: dict[str, Any] = {"state": state}
    if optimizer is not None:
        opt = optimizer.state_dict()
        plain_state: dict[str, dict[str, Any]] = {}
        for index, entries in opt["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{name}"] = value.detach().to("cpu").contiguous().clone()
                else:
                    plain_state.setdefault(str(index), {})[name] = _plain(value)
        meta["optimizer"] = {"param_groups": _plain(opt["param_groups"]), "plain_state": plain_state}
    if rng:
        tensors["rng.torch"] = torch.get_rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={_STATE_KEY: json.dumps(meta)})
    os.replace(partial, path)


def read_state(path: Path) -> dict[str, Any]:
    """The JSON state stored with a checkpoint (no tensors read)."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {})[_STATE_KEY])["state"]


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``) and return its JSON state."""
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})[_STATE_KEY])
    tensors = load_file(str(path), device="cpu")
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None and "optimizer" in meta:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, entries in meta["optimizer"]["plain_state"].items():
            state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if restore_rng and "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return meta["state"]


class ResumeError(RuntimeError):
    """A checkpoint exists but was made with different settings or data than this run."""


@dataclass
class FitState:
    """How far one network's training has got: what ``last`` records so that a run can resume."""

    fingerprint: dict[str, Any]  # what must match for a checkpoint to be resumed
    epoch: int = 0  # the last completed epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_auc: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False


@dataclass(frozen=True)
class CheckpointFiles:
    """The two checkpoints of one network: ``last`` (every epoch) and ``best`` (best validation AUC)."""

    folder: Path

    @property
    def last(self) -> Path:
        return self.folder / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.folder / "best.safetensors"


def save_last(
    files: CheckpointFiles,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: FitState,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """The end of an epoch: model, optimizer, RNG, the fit state and the AMP scaler (if it runs)."""
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    save_checkpoint(files.last, model, optimizer=optimizer, state={**asdict(state), "scaler": scaler_state})


def save_best(files: CheckpointFiles, model: torch.nn.Module, state: FitState) -> None:
    save_checkpoint(files.best, model, state={"epoch": state.epoch, "val_auc": state.best_auc}, rng=False)


def resume(
    files: CheckpointFiles,
    fingerprint: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[FitState, dict[str, torch.Tensor]]:
    """Load ``last`` into the model, optimizer and scaler; returns its state and the best weights so far.

    Raises ResumeError when the checkpoint was made with other settings or data.
    """
    saved = read_state(files.last)
    if saved["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k])
        raise ResumeError(
            f"checkpoint {files.last} was made with different {', '.join(changed)}; "
            f"start without --resume or use another --checkpoint-dir"
        )
    load_checkpoint(files.best, model, restore_rng=False)
    best_weights = clone_weights(model)
    load_checkpoint(files.last, model, optimizer, restore_rng=False)
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    known = {k: v for k, v in saved.items() if k in FitState.__dataclass_fields__}
    return FitState(**known), best_weights


def clone_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's current weights that later training steps do not change."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
