"""The chunk pipeline with a real (random-weight) ensemble: bad images fail alone, order is kept."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from deepcovid.errors import TransientError
from deepcovid.pipeline import score_chunk
from deepcovid.settings import Settings
from deepcovid.storage import Storage, open_storage
from tests.fixtures.images import dicom_bytes, jpeg_bytes, png_bytes, xray_png_bytes


@pytest.fixture(scope="module")
def ensemble(tiny_bundle_path: Path) -> Any:
    from deepcovid.ensemble import Ensemble

    return Ensemble.from_bundle(tiny_bundle_path, device="cpu", settings=Settings(device="cpu"))


def settings_for(root: Path, **kw: Any) -> Settings:
    values: dict[str, Any] = {"storage_roots": [root], "device": "cpu", "batch_size": 3, "decode_threads": 2}
    values.update(kw)
    return Settings(**values)


@pytest.fixture
def mixed_chunk(tmp_path: Path) -> tuple[Path, list[str], dict[str, str | None]]:
    """A chunk mixing good images with every kind of bad one; returns (root, uris, expected reason)."""
    root = tmp_path / "archive"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(xray_png_bytes(64))
    files: dict[str, bytes | None] = {
        "Doe_John_1.png": xray_png_bytes(96, seed=1),
        "empty.png": b"",
        "b.jpg": jpeg_bytes(size=(300, 260)),
        "corrupt.png": xray_png_bytes(96, seed=2)[:60],
        "notes.txt": b"this is not an image\n" * 10,
        "c.png": png_bytes(mode="RGB", size=(50, 40)),
        "d.dcm": dicom_bytes(),
        "e.png": xray_png_bytes(64, seed=3),
    }
    expected: dict[str, str | None] = {}
    uris: list[str] = []
    for name, data in files.items():
        (root / name).write_bytes(data or b"")
        uris.append(str(root / name))
    expected = {
        "Doe_John_1.png": None,
        "empty.png": "empty_file",
        "b.jpg": None,
        "corrupt.png": "truncated",
        "notes.txt": "not_an_image",
        "c.png": None,
        "d.dcm": None,
        "e.png": None,
    }
    (root / "a_directory").mkdir()
    extra = {
        str(root / "missing.png"): "not_found",
        str(root / ".." / "outside.png"): "outside_storage_root",
        str(root / "a_directory"): "is_a_directory",
    }
    uris.insert(3, str(root / "missing.png"))
    uris.insert(6, str(root / ".." / "outside.png"))
    uris.append(str(root / "a_directory"))
    reasons = {str(root / k): v for k, v in expected.items()} | extra
    return root, uris, reasons


def test_mixed_chunk_scores_the_good_and_fails_the_bad(
    ensemble: Any, mixed_chunk: tuple[Path, list[str], dict[str, str | None]]
) -> None:
    root, uris, reasons = mixed_chunk
    progress: list[int] = []
    results = score_chunk(
        uris, storage=open_storage(settings_for(root)), ensemble=ensemble, settings=settings_for(root),
        on_batch=progress.append,
    )  # fmt: skip
    assert [r.uri for r in results] == uris
    assert sum(progress) == len(uris)
    for result in results:
        want = reasons[result.uri]
        if want is None:
            assert result.status == "scored", (result.uri, result.reason, result.detail)
            assert set(result.probabilities) == {"resnet18", "squeezenet1_1"}
            assert all(0.0 <= p <= 1.0 for p in result.probabilities.values())
            assert set(result.decisions) == {"resnet18", "squeezenet1_1"}
            assert 0.0 <= (result.ensemble_score or 0) <= 1.0
            assert isinstance(result.ensemble_decision, bool)
            assert set(result.thresholds) >= {"resnet18", "squeezenet1_1", "ensemble"}
            assert result.info["width"] > 0 and result.size and result.size > 0
        else:
            assert result.status == "failed"
            assert result.reason == want, (result.uri, result.reason, result.detail)
            assert result.detail
    dicom = next(r for r in results if r.uri.endswith("d.dcm"))
    assert "PatientName" not in str(dicom.info) and "Doe" not in str(dicom.info)


def test_scores_do_not_depend_on_batching(ensemble: Any, tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(xray_png_bytes(80, seed=i))
    uris = [str(tmp_path / f"{i}.png") for i in range(4)]
    by_batch = {}
    for batch_size in (1, 3):
        settings = settings_for(tmp_path, batch_size=batch_size, decode_threads=3)
        results = score_chunk(uris, storage=open_storage(settings), ensemble=ensemble, settings=settings)
        by_batch[batch_size] = [r.ensemble_score for r in results]
    assert by_batch[1] == pytest.approx(by_batch[3], abs=1e-5)
    assert len(set(round(s, 6) for s in by_batch[1])) > 1  # different images, different scores


class FlakyStorage(Storage):
    """Real storage, except chosen URIs raise a given exception."""

    def __init__(self, settings: Settings, failures: dict[str, BaseException]) -> None:
        super().__init__(settings)
        self.failures = failures

    def read(self, uri: str) -> bytes:
        if uri in self.failures:
            raise self.failures[uri]
        return super().read(uri)


def test_unexpected_error_fails_only_that_image(ensemble: Any, tmp_path: Path) -> None:
    uris = []
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(xray_png_bytes(64, seed=i))
        uris.append(str(tmp_path / f"{i}.png"))
    settings = settings_for(tmp_path)
    storage = FlakyStorage(settings, {uris[1]: RuntimeError("boom")})
    results = score_chunk(uris, storage=storage, ensemble=ensemble, settings=settings)
    assert [r.status for r in results] == ["scored", "failed", "scored"]
    assert (results[1].reason, results[1].detail) == ("internal_error", "RuntimeError")


def test_transient_error_ends_the_chunk(ensemble: Any, tmp_path: Path) -> None:
    uris = []
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(xray_png_bytes(64, seed=i))
        uris.append(str(tmp_path / f"{i}.png"))
    settings = settings_for(tmp_path)
    storage = FlakyStorage(settings, {uris[2]: TransientError("S3 throttled")})
    with pytest.raises(TransientError):
        score_chunk(uris, storage=storage, ensemble=ensemble, settings=settings)


class BatchFailingEnsemble:
    """Wraps the real ensemble; fails any batch containing a marked image (e.g. an OOM for one input)."""

    def __init__(self, inner: Any, poison_width: int | None) -> None:
        self.inner = inner
        self.device = inner.device
        self.calls: list[int] = []
        self.poison_width = poison_width

    def score(self, batch: Any) -> Any:
        self.calls.append(int(batch.shape[0]))
        # The poisoned image is the only pure-white one.
        if self.poison_width is not None and bool((batch.flatten(1).float().mean(1) > 254).any()):
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner.score(batch)


def test_a_failing_batch_is_retried_image_by_image(ensemble: Any, tmp_path: Path) -> None:
    import numpy as np

    uris = []
    for i in range(4):
        pixels = np.full((40, 40), 255, np.uint8) if i == 1 else None
        data = png_bytes(pixels=pixels, size=(40, 40)) if pixels is not None else xray_png_bytes(64, seed=i)
        (tmp_path / f"{i}.png").write_bytes(data)
        uris.append(str(tmp_path / f"{i}.png"))
    settings = settings_for(tmp_path, batch_size=4)
    wrapper = BatchFailingEnsemble(ensemble, poison_width=40)
    results = score_chunk(uris, storage=open_storage(settings), ensemble=wrapper, settings=settings)
    assert [r.status for r in results] == ["scored", "failed", "scored", "scored"]
    assert results[1].reason == "internal_error" and results[1].info["width"] == 40
    assert wrapper.calls == [4, 1, 1, 1, 1]


def test_info_logs_hold_counts_not_uris(
    ensemble: Any,
    mixed_chunk: tuple[Path, list[str], dict[str, str | None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, uris, _ = mixed_chunk
    settings = settings_for(root)
    with caplog.at_level(logging.INFO, logger="deepcovid"):
        score_chunk(uris, storage=open_storage(settings), ensemble=ensemble, settings=settings)
    info = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "chunk of 11: 5 scored, 6 failed" in info
    assert "Doe_John" not in info and str(root) not in info


def test_empty_chunk(ensemble: Any, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert score_chunk([], storage=open_storage(settings), ensemble=ensemble, settings=settings) == []


def test_batch_size_defaults_per_device() -> None:
    import torch

    from deepcovid.devices import batch_size_for

    assert batch_size_for(Settings(batch_size=0), torch.device("cpu")) == 16
    assert batch_size_for(Settings(batch_size=0), torch.device("cuda")) == 64
    assert batch_size_for(Settings(batch_size=5), torch.device("cuda")) == 5
