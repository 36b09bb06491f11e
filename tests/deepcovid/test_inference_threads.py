"""CPU inference leaves a core to the decoders unless told otherwise."""

from __future__ import annotations

import os

import torch

from deepcovid.ensemble import cpu_inference_threads


def test_cpu_default_keeps_one_core_for_decoding() -> None:
    assert cpu_inference_threads(0, torch.device("cpu")) == max(1, (os.cpu_count() or 2) - 1)


def test_configured_count_wins_and_cuda_is_left_alone() -> None:
    assert cpu_inference_threads(3, torch.device("cpu")) == 3
    assert cpu_inference_threads(0, torch.device("cuda")) == 0
