"""The training cache: each image decoded once, keyed by content and preprocessing version, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcovid import defaults
from tests.fixtures.images import jpeg_bytes, png_bytes, write_labelled_folder
from training.cache import INDEX, PIXELS, TrainingCache
from training.data import cached_samples, decode_samples, load_labelled


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, (w, h) in enumerate([(300, 200), (200, 310), (512, 512)]):
        path = folder / f"patient-{i}.png"
        path.write_bytes(png_bytes(size=(w, h), seed=i))
        paths.append(path)
    (folder / "patient-3.jpg").write_bytes(jpeg_bytes(size=(640, 480), seed=3))
    return [*paths, folder / "patient-3.jpg"]


def test_each_image_is_decoded_once_and_found_again_by_content(tmp_path: Path, files: list[Path]) -> None:
    cache = TrainingCache(tmp_path / "cache", side=256)
    first = cache.load(files)
    assert first.hits == 0 and first.kept == [0, 1, 2, 3] and first.skipped == []
    assert first.images.shape == (4, 3, 256, 256) and first.images.dtype == torch.uint8
    assert first.images.is_contiguous(memory_format=torch.channels_last)

    moved = tmp_path / "elsewhere.png"
    files[1].rename(moved)  # a renamed file is the same image
    again = TrainingCache(tmp_path / "cache", side=256).load([moved, files[0]])
    assert again.hits == 2
    assert torch.equal(again.images[0], first.images[1]) and torch.equal(again.images[1], first.images[0])
    assert (cache.dir / PIXELS).stat().st_size == 4 * 256 * 256 * 3  # nothing appended

    # No path (patient data) is stored: the index maps content hashes to rows.
    index = (cache.dir / INDEX).read_text()
    assert "patient" not in index and "elsewhere" not in index


def test_at_224_the_cache_holds_exactly_the_inference_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_labelled_folder(data, 3, 3, size=300, seed=4)
    samples = load_labelled(data)
    cached = cached_samples(samples, side=224, root=tmp_path / "cache")
    assert torch.equal(cached.images, decode_samples(samples).images)
    assert torch.equal(cached.labels, torch.tensor([s.label for s in samples]))


def test_a_broken_file_is_skipped_with_its_reason_and_not_decoded_again(
    tmp_path: Path, files: list[Path]
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cache = TrainingCache(tmp_path / "cache", side=256)
    loaded = cache.load([files[0], broken, files[2]])
    assert loaded.kept == [0, 2] and loaded.skipped[0][0] == 1 and loaded.skipped[0][1]
    assert loaded.images.shape[0] == 2
    index = json.loads((cache.dir / INDEX).read_text())
    assert sorted(v for v in index.values() if isinstance(v, str)) == [loaded.skipped[0][1]]
    assert cache.load([broken]).hits == 1


def test_a_new_preprocessing_version_rebuilds_the_cache(
    tmp_path: Path, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = TrainingCache(tmp_path / "cache", side=256)
    old.load(files[:2])
    monkeypatch.setattr(defaults, "PREPROCESS_VERSION", defaults.PREPROCESS_VERSION + 1)
    new = TrainingCache(tmp_path / "cache", side=256)
    assert not old.dir.exists() and new.dir != old.dir
    assert new.load(files[:2]).hits == 0


def test_a_torn_last_row_is_decoded_again(tmp_path: Path, files: list[Path]) -> None:
    cache = TrainingCache(tmp_path / "cache", side=256)
    whole = cache.load(files[:2]).images.clone()
    with (cache.dir / PIXELS).open("r+b") as handle:  # a run killed while writing its second row
        handle.truncate(256 * 256 * 3 + 1000)
    again = TrainingCache(tmp_path / "cache", side=256).load(files[:2])
    assert again.hits == 1
    assert np.array_equal(again.images.numpy(), whole.numpy())
