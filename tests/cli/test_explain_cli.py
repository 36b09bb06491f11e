"""``deepcovid explain``: overlays with opaque names, an index, one line per bad file, no database."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from deepcovid.bundle import install_bundle, load_bundle
from deepcovid.settings import get_settings
from tests.fixtures.images import dicom_bytes, jpeg_bytes

runner = CliRunner()
PATIENT = "DOE_JANE_1970"


@pytest.fixture(autouse=True)
def _fresh_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEEPCOVID_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")  # never needed
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explain") / "bundle"
    args = [
        "bundle",
        "init",
        str(out),
        "--pretrained",
        "none",
        "--arch",
        "resnet18",
        "--arch",
        "squeezenet1_1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / PATIENT
    folder.mkdir()
    portrait = folder / f"{PATIENT}_chest.jpg"
    portrait.write_bytes(jpeg_bytes(size=(300, 460), exif_orientation=6))
    dicom = folder / f"{PATIENT}.dcm"
    dicom.write_bytes(dicom_bytes(photometric="MONOCHROME1", size=(320, 256)))
    return [portrait, dicom]


def _index(out: Path) -> list[dict[str, str]]:
    with open(out / "index.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_two_images_get_overlays_with_opaque_names_and_an_index(
    bundle_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "overlays"
    args = ["explain", *map(str, images), "--bundle", str(bundle_dir), "--arch", "all", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(
        f"{n:04d}-{m}.png" for n in (1, 2) for m in ("resnet18", "squeezenet1_1", "ensemble")
    )
    assert not any(PATIENT in name for name in written)
    rows = _index(out)
    assert {(row["overlay"], row["image"]) for row in rows if row["map"] == "ensemble"} == {
        ("0001-ensemble.png", str(images[0])),
        ("0002-ensemble.png", str(images[1])),
    }
    assert all(0.0 <= float(row["probability"]) <= 1.0 and not row["failure"] for row in rows)
    assert "0001-ensemble.png" in result.stdout
    with Image.open(out / "0001-ensemble.png") as overlay:  # EXIF-rotated: drawn landscape
        assert overlay.format == "PNG" and overlay.width == 460


def test_a_file_that_fails_is_one_line_and_the_rest_are_explained(
    bundle_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    broken = images[0].parent / "broken.png"
    broken.write_bytes(b"this is not an image")
    out = tmp_path / "overlays"
    args = ["explain", str(broken), str(images[1]), "--bundle", str(bundle_dir), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "not_an_image" in failed[0] and "Traceback" not in result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["0002-ensemble.png"]
    assert [row["failure"] for row in _index(out)] == ["not_an_image", ""]


def test_an_installed_bundle_id_needs_no_database(
    bundle_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    bundle = load_bundle(bundle_dir)
    install_bundle(bundle, get_settings().effective_bundles_dir)
    out = tmp_path / "overlays"
    args = ["explain", str(images[1]), "--bundle", bundle.bundle_id, "--arch", "resnet18", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.glob("*.png")] == ["0001-resnet18.png"]


def test_an_unknown_network_is_a_usage_error(bundle_dir: Path, images: list[Path], tmp_path: Path) -> None:
    args = [
        "explain",
        str(images[0]),
        "--bundle",
        str(bundle_dir),
        "--arch",
        "vgg16",
        "--out",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "--arch vgg16" in result.stderr and "Traceback" not in result.output


def test_an_out_folder_that_cannot_be_made_is_one_line(
    bundle_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["explain", str(images[0]), "--bundle", str(bundle_dir), "--out", str(blocker / "overlays")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot write there" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_without_a_bundle_on_a_fresh_data_dir_it_asks_for_one(
    images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPCOVID_DATABASE_URL")  # the data dir's SQLite file, never created
    get_settings.cache_clear()
    result = runner.invoke(app, ["explain", str(images[0]), "--out", str(tmp_path / "o")])
    assert result.exit_code == 16, result.output
    assert "no --bundle and no active bundle" in result.stderr and "Traceback" not in result.output
