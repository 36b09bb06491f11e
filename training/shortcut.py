"""Shortcut probe: how well a labels column (the data's source, say) can be read off the networks' features.

If a logistic regression on a network's penultimate features tells the sources apart among images of
the same class, those features encode the source, and part of any score on data whose classes come
from different sources is the source rather than the disease. Compared with how well the same features
predict the label, a reader sees how much room there is for that shortcut.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from deepcovid.batches import normalize
from deepcovid.networks import HEAD_MODULE

FOLDS = 5


@torch.inference_mode()
def penultimate_features(
    model: nn.Module, arch: str, images: torch.Tensor, batch_size: int = 32
) -> np.ndarray:
    """[N, D] inputs of the network's head (spatially averaged where still a feature map)."""
    captured: list[torch.Tensor] = []
    head = getattr(model, HEAD_MODULE[arch])
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].float()))
    device = next(model.parameters()).device
    try:
        for start in range(0, int(images.shape[0]), batch_size):
            model(normalize(images[start : start + batch_size].to(device)))
    finally:
        hook.remove()
    features = [f.mean(dim=(2, 3)) if f.ndim == 4 else f.flatten(1) for f in captured]
    return torch.cat(features).cpu().numpy()


def cv_auc(features: np.ndarray, target: Sequence[str], seed: int = 0) -> float | None:
    """Cross-validated ROC AUC (one-vs-rest macro for more than two values) of a standardised logistic
    regression predicting ``target``; values with fewer than ``FOLDS`` images are left out. None when
    fewer than two values remain."""
    target = np.asarray(target)
    counts = Counter(target.tolist())
    keep = np.array([counts[t] >= FOLDS for t in target])
    values = sorted({t for t in target[keep].tolist()})
    if len(values) < 2:
        return None
    x, y = features[keep], target[keep]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, x, y, cv=folds, method="predict_proba")
    if len(values) == 2:
        return float(roc_auc_score(y == values[1], proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=values))


def source_probe(
    networks: Mapping[str, nn.Module],
    images: torch.Tensor,
    labels: np.ndarray,
    groups: Sequence[str],
    column: str,
) -> dict[str, Any]:
    """Per network: CV AUC of ``column`` from its features, over all images and within each class, next
    to the CV AUC of the label from the same features."""
    names = {0: "non_covid", 1: "covid"}
    groups = np.asarray(groups)
    result: dict[str, Any] = {"column": column, "folds": FOLDS, "networks": {}}
    for arch, model in networks.items():
        features = penultimate_features(model, arch, images)
        within = {
            names[c]: cv_auc(features[labels == c], groups[labels == c])
            for c in (0, 1)
            if np.any(labels == c)
        }
        result["networks"][arch] = {
            "label_auc": cv_auc(features, [names[int(c)] for c in labels]),
            "column_auc": cv_auc(features, groups),
            "column_auc_within_class": within,
        }
    return result
