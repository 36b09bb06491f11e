"""CPU inference: networks side by side in streams, each stream with its share of the cores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcovid.bundle import load_bundle
from deepcovid.cpu import CPU_COST_MS, cpu_inference_threads, cpu_streams, partition_networks
from deepcovid.ensemble import Ensemble
from deepcovid.networks import ARCHITECTURES
from deepcovid.settings import Settings
from tests.fixtures.images import synthetic_batch

CORES = os.cpu_count() or 1


def test_streams_default_to_one_per_core_at_most_one_per_network() -> None:
    cpu = torch.device("cpu")
    assert cpu_streams(0, 4, cpu) == min(CORES, 4)
    assert cpu_streams(0, 1, cpu) == 1
    assert cpu_streams(3, 4, cpu) == 3
    assert cpu_streams(8, 2, cpu) == 2
    assert cpu_streams(0, 4, torch.device("cuda")) == 1


def test_threads_share_the_cores_between_streams_unless_configured() -> None:
    cpu = torch.device("cpu")
    assert cpu_inference_threads(0, cpu, streams=1) == CORES
    assert cpu_inference_threads(0, cpu, streams=2) == max(1, CORES // 2)
    assert cpu_inference_threads(0, cpu, streams=CORES + 5) == 1
    assert cpu_inference_threads(3, cpu, streams=2) == 3
    assert cpu_inference_threads(0, torch.device("cuda")) == 0


def test_partition_balances_cost_and_keeps_every_network_once() -> None:
    two = partition_networks(ARCHITECTURES, 2)
    assert sorted(a for group in two for a in group) == sorted(ARCHITECTURES)
    loads = [sum(CPU_COST_MS[a] for a in group) for group in two]
    assert max(loads) <= 0.6 * sum(loads)  # the two heavy networks never share a stream
    assert {frozenset(g) for g in two} == {
        frozenset({"resnet50", "squeezenet1_1"}),
        frozenset({"densenet121", "resnet18"}),
    }
    assert partition_networks(ARCHITECTURES, 1) == [tuple(ARCHITECTURES)]
    assert len(partition_networks(ARCHITECTURES, 9)) == len(ARCHITECTURES)
    assert partition_networks(("unknown_net", "resnet18"), 2) == [("unknown_net",), ("resnet18",)]


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.from_numpy(synthetic_batch(3, seed=11))


def test_streams_score_exactly_like_one_network_at_a_time(
    full_bundle_path: Path, batch: torch.Tensor
) -> None:
    bundle = load_bundle(full_bundle_path)
    threads = torch.get_num_threads()
    try:
        one = Ensemble.from_bundle(bundle, "cpu", "fp32", settings=Settings(cpu_streams=1, torch_threads=1))
        two = Ensemble.from_bundle(bundle, "cpu", "fp32", settings=Settings(cpu_streams=2, torch_threads=1))
        assert one.streams == 1 and two.streams == 2
        sequential, side_by_side = one.score(batch), two.score(batch)
    finally:
        torch.set_num_threads(threads)
    assert list(side_by_side.probabilities) == list(ARCHITECTURES)
    for arch in ARCHITECTURES:
        np.testing.assert_array_equal(side_by_side.probabilities[arch], sequential.probabilities[arch])
        np.testing.assert_array_equal(side_by_side.decisions[arch], sequential.decisions[arch])
    np.testing.assert_array_equal(side_by_side.ensemble_score, sequential.ensemble_score)
    np.testing.assert_array_equal(side_by_side.ensemble_decision, sequential.ensemble_decision)


def test_an_error_in_one_stream_reaches_the_caller(tiny_bundle_path: Path, batch: torch.Tensor) -> None:
    ensemble = Ensemble.from_bundle(tiny_bundle_path, "cpu", settings=Settings(cpu_streams=2))
    assert ensemble.streams == 2

    def broken(inputs: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory in one network")

    ensemble.networks["squeezenet1_1"] = broken  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="out of memory in one network"):
        ensemble.score(batch)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_scores_with_its_own_stream_threads(
    tiny_bundle_path: Path, batch: torch.Tensor
) -> None:
    """A prefork pool process inherits an ensemble whose stream threads stayed in the parent."""
    ensemble = Ensemble.from_bundle(tiny_bundle_path, "cpu", settings=Settings(cpu_streams=2))
    expected = ensemble.probabilities(batch)  # the parent's stream threads exist now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            got = ensemble.probabilities(batch)
            same = all(np.array_equal(got[a], expected[a]) for a in expected)
            os.write(write, b"1" if same else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as fh:
            answer = fh.read()
    finally:
        os.waitpid(pid, 0)
    assert answer == b"1"
