"""``screen``'s closing summary counts flagged images as ``jobs`` and ``status`` do, also on a re-run that
reuses earlier results, and lists its top flagged as ``results --flagged`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.images import xray_png_bytes

pytestmark = pytest.mark.slow


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def flag_all_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small network and an ensemble threshold of 0: every scored image is flagged."""
    import torch

    from deepcovid.bundle import save_bundle
    from deepcovid.networks import build_network

    torch.manual_seed(0)
    networks = {"squeezenet1_1": build_network("squeezenet1_1", pretrained="none")}
    out = tmp_path_factory.mktemp("bundles-src") / "flag-all"
    return save_bundle(out, networks, ensemble_threshold=0.0, provenance={"note": "flags everything"}).path


def test_summary_flagged_agrees_with_jobs_and_status_on_a_rerun(
    run_cli, producer_env, flag_all_bundle: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(4):
        (archive / f"img{i}.png").write_bytes(xray_png_bytes(64, opacity=bool(i % 2), seed=i))

    first = run_cli("screen", archive, "--bundle", flag_all_bundle, "--limit", "2")
    assert first.exit_code == 0, first.output
    assert "flagged COVID-positive 2" in flat(first.stdout)
    assert json.loads(run_cli("jobs", "--format", "json").stdout)[0]["flagged"] == 2

    again = run_cli("screen", archive)  # reuses the two scored above, scores the other two
    assert again.exit_code == 0, again.output
    summary = flat(again.stdout)
    assert "already scored 2; scored now 2" in summary
    assert "flagged COVID-positive 4 (2 of them scored now)" in summary

    # The images now belong to job 2, which counts the reused results as its own, as the summary did.
    assert json.loads(run_cli("jobs", "--format", "json", "--limit", "1").stdout)[0]["flagged"] == 4
    assert json.loads(run_cli("status", "2", "--format", "json").stdout)["flagged"] == 4
    assert "flagged │ 4" in flat(run_cli("status", "2").stdout)

    # The summary's top flagged are the first rows of `results --flagged`, in the same order.
    exported = run_cli("results", "2", "--flagged", "--format", "jsonl").stdout.splitlines()
    by_score = [json.loads(line)["uri"] for line in exported if line.strip()]
    shown = [line.split()[-1] for line in again.stdout.splitlines() if str(archive) in line]
    assert shown[: len(by_score)] == by_score
