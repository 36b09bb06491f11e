"""Reading labelled data and splitting it: patients never straddle train/validation/test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.images import shared_data_dir
from tests.training.conftest import write_patient_csv
from training.data import DataError, data_id, load_labelled, parse_label, split_samples


def _patients(samples) -> set[str]:
    return {s.patient_id for s in samples}


def test_folder_layout(tmp_path: Path) -> None:
    for name in ("covid/a.png", "covid/sub/b.png", "non_covid/c.png", "non_covid/.hidden", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    samples = load_labelled(tmp_path)
    assert sorted((s.name, s.label) for s in samples) == [
        ("covid/a.png", 1),
        ("covid/sub/b.png", 1),
        ("non_covid/c.png", 0),
    ]
    assert all(s.patient_id is None for s in samples)


def test_csv_paths_relative_to_csv(tmp_path: Path) -> None:
    csv_path = write_patient_csv(tmp_path / "set", patients=4, images_per_patient=2)
    samples = load_labelled(csv_path)
    assert len(samples) == 8
    assert samples[0].path == tmp_path / "set" / "covid" / "p000_0.png"
    assert samples[0].patient_id == "site:0" and samples[0].label == 1


def test_bad_inputs_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such"):
        load_labelled(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("path,label\na.png,maybe\n")
    with pytest.raises(DataError, match=r"x.csv:2: unknown label 'maybe'"):
        load_labelled(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("file_name,diagnosis\na.png,covid\n")
    with pytest.raises(DataError, match="needs columns"):
        load_labelled(tmp_path / "y.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="covid/ and non_covid/"):
        load_labelled(tmp_path / "empty")
    assert parse_label(" COVID ") == 1 and parse_label("non-covid") == 0


@pytest.mark.parametrize("seed", range(8))
def test_patient_split_never_leaks(tmp_path: Path, seed: int) -> None:
    samples = load_labelled(write_patient_csv(tmp_path, patients=40, images_per_patient=3))
    split = split_samples(samples, val_fraction=0.2, seed=seed)
    assert split.by_patient
    assert not _patients(split.train) & _patients(split.val)
    assert len(split.train) + len(split.val) == len(samples)
    assert 0.1 <= len(split.val) / len(samples) <= 0.3
    assert {s.label for s in split.val} == {0, 1}
    three = split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=seed)
    parts = [_patients(three.train), _patients(three.val), _patients(three.test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert sum(map(len, (three.train, three.val, three.test))) == len(samples)


def test_split_is_seeded(tmp_path: Path) -> None:
    samples = load_labelled(write_patient_csv(tmp_path, patients=30, images_per_patient=2))
    a = split_samples(samples, seed=3)
    b = split_samples(list(samples), seed=3)
    c = split_samples(samples, seed=4)
    assert [s.name for s in a.val] == [s.name for s in b.val]
    assert [s.name for s in a.val] != [s.name for s in c.val]


def test_split_by_image_without_patients(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text(
        "path,label\n" + "".join(f"i{i}.png,{'covid' if i % 2 else 'non_covid'}\n" for i in range(50))
    )
    split = split_samples(load_labelled(tmp_path / "l.csv"), val_fraction=0.2, seed=0)
    assert not split.by_patient
    assert len(split.val) == 10 and sum(s.label for s in split.val) == 5


def test_data_id_ignores_order_but_not_labels(tmp_path: Path) -> None:
    samples = load_labelled(write_patient_csv(tmp_path, patients=6, images_per_patient=2))
    assert data_id(samples) == data_id(list(reversed(samples)))
    from dataclasses import replace

    flipped = [replace(samples[0], label=1 - samples[0].label), *samples[1:]]
    assert data_id(flipped) != data_id(samples)


@pytest.mark.shared_data
def test_shared_labels_csv_splits_by_patient() -> None:
    root = shared_data_dir()
    if root is None or not (root / "cxr" / "labels.csv").is_file():
        pytest.skip("shared chest X-ray data not present")
    samples = load_labelled(root / "cxr" / "labels.csv")
    assert len(samples) == 755 and sum(s.label for s in samples) == 310
    assert all(s.path.is_file() for s in samples[:20])
    for seed in range(3):
        split = split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=seed)
        assert split.by_patient
        assert not _patients(split.train) & _patients(split.val)
        assert not (_patients(split.train) | _patients(split.val)) & _patients(split.test)
