"""Per-architecture training checkpoints: tensors in safetensors, everything else as JSON metadata.

One file per state (``last`` after every epoch, ``best`` when validation AUC improves), written
beside its final name and renamed, so a crash leaves the previous complete checkpoint. Nothing is
pickled: the optimizer's tensors go into the safetensors file and its plain values into the JSON.
"""

from __future__ import annotations

import json
import os
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
