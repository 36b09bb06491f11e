"""Checkpoints: --resume continues from the last completed epoch and replays a straight run exactly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.images import write_labelled_folder
from training.args import TrainArgs
from training.checkpoint import ResumeError, read_state
from training.train import main

pytestmark = pytest.mark.slow
ARCH = "squeezenet1_1"


def _args(data: Path, out: Path, epochs: int, ckpt: Path, **kw) -> TrainArgs:
    defaults = dict(
        archs=(ARCH,),
        pretrained="none",
        finetune="all",
        batch_size=4,
        lr=1e-4,
        device="cpu",
        progress=False,
        # A schedule that does not depend on the epoch count: a 1-epoch run then replays a 2-epoch one.
        schedule="constant",
        warmup_epochs=0,
        cache_dir=out.parent / "cache",
    )
    return TrainArgs(data=data, out=out, epochs=epochs, checkpoint_dir=ckpt, **{**defaults, **kw})


def _weights(bundle) -> dict[str, torch.Tensor]:
    return load_file(str(bundle.weights_path(ARCH)))


def test_resume_continues_and_matches_straight_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    write_labelled_folder(data, 5, 5, size=48, seed=3)
    ckpt = tmp_path / "ckpt"

    first = main(_args(data, tmp_path / "b1", 1, ckpt))
    state = read_state(ckpt / ARCH / "last.safetensors")
    assert state["epoch"] == 1 and len(state["history"]) == 1

    with caplog.at_level(logging.INFO, logger="training.train"):
        resumed = main(_args(data, tmp_path / "b2", 2, ckpt, resume=True))
    assert "resuming after epoch 1" in caplog.text
    assert "epoch 1/2" not in caplog.text and "epoch 2/2" in caplog.text
    state = read_state(ckpt / ARCH / "last.safetensors")
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert resumed.provenance["epochs_run"] == {ARCH: 2}
    assert first.bundle_id != resumed.bundle_id

    straight = main(_args(data, tmp_path / "b3", 2, tmp_path / "ckpt-straight"))
    straight_state = read_state(tmp_path / "ckpt-straight" / ARCH / "last.safetensors")
    for a, b in zip(state["history"], straight_state["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    resumed_w, straight_w = _weights(resumed), _weights(straight)
    assert resumed_w.keys() == straight_w.keys()
    for key in resumed_w:
        torch.testing.assert_close(resumed_w[key], straight_w[key], rtol=1e-5, atol=1e-6)

    # Same checkpoint, different settings: refuse rather than silently mix runs.
    with pytest.raises(ResumeError, match="lr"):
        main(_args(data, tmp_path / "b4", 3, ckpt, resume=True, lr=1e-3))


def test_three_way_patient_split_writes_test_report(tmp_path: Path) -> None:
    """--test-fraction holds out whole patients, and the bundle is evaluated on them at the end."""
    import csv

    data = tmp_path / "data"
    written = write_labelled_folder(data, 10, 10, size=48, seed=5)
    with (data / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label", "patient_id"])
        for label, paths in written.items():
            for i, path in enumerate(paths):
                writer.writerow([path.relative_to(data).as_posix(), label, f"{label}-{i // 2}"])

    args = _args(
        data / "labels.csv", tmp_path / "bundle", 1, tmp_path / "ckpt", val_fraction=0.25, test_fraction=0.25
    )
    bundle = main(args)
    provenance = bundle.provenance
    assert provenance["patient_split"] is True
    assert sum(provenance["counts"]["test"].values()) >= 4
    assert sum(provenance["patients"].values()) == 10
    report = tmp_path / "bundle.report"
    assert (report / "report.md").is_file() and (report / "metrics.json").is_file()
    test_csv = (report / "test_set.csv").read_text().splitlines()
    assert test_csv[0] == "path,label" and len(test_csv) - 1 == sum(provenance["counts"]["test"].values())
