"""`deepcovid inspect`: one line per file, a summary, exit codes 0/1/2, never patient data."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.fixtures.images import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_bytes,
    gif_bytes,
    jpeg_bytes,
    png_bytes,
    shared_data_dir,
)

runner = CliRunner()


def inspect(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["inspect", *args])
    return result.exit_code, result.output


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    (root / "b" / "nested").mkdir(parents=True)
    (root / "a.png").write_bytes(png_bytes(bits=16))
    (root / "b" / "photo.JPG").write_bytes(jpeg_bytes(exif_orientation=6))
    (root / "b" / "nested" / "IM0001").write_bytes(dicom_bytes(photometric="MONOCHROME1"))
    (root / "notes.txt").write_text("not an image, skipped in directory walks")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root


def test_all_ok_exits_0_with_one_line_per_file(good_folder: Path) -> None:
    code, out = inspect(str(good_folder))
    assert code == 0, out
    lines = out.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("ok") and "a.png" in lines[0] and "PNG 48x32 16-bit I;16" in lines[0]
    assert "IM0001" in lines[1] and "DICOM 48x32 12-bit MONOCHROME1 DX PA" in lines[1]
    assert "photo.JPG" in lines[2] and "JPEG 32x48 8-bit RGB" in lines[2]
    assert lines[3] == "ok 3, failed 0, skipped 1 non-image file"


def test_failures_exit_1_with_reason_and_summary(good_folder: Path, tmp_path: Path) -> None:
    (good_folder / "empty.png").write_bytes(b"")
    (good_folder / "anim.gif").write_bytes(gif_bytes(frames=2))
    (good_folder / "ct.dcm").write_bytes(dicom_bytes(modality="CT"))
    (good_folder / "cut.png").write_bytes(png_bytes(size=300)[:2000])
    code, out = inspect(str(good_folder))
    assert code == 1, out
    assert "FAILED  " + str(good_folder / "empty.png") + "  empty_file:" in out
    assert "anim.gif  unsupported_image: GIF with 2 frames" in out
    assert "ct.dcm  unsupported_dicom: modality CT" in out
    assert "cut.png  truncated:" in out
    assert out.strip().splitlines()[-1] == (
        "ok 3, failed 4 (empty_file 1, truncated 1, unsupported_dicom 1, unsupported_image 1), "
        "skipped 1 non-image file"
    )


def test_quiet_prints_only_failures(good_folder: Path) -> None:
    (good_folder / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 10)
    code, out = inspect("--quiet", str(good_folder))
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("FAILED") and "bad.jpg" in lines[0]
    assert lines[1].startswith("ok 3, failed 1")


def test_explicit_files_are_always_tried(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes())
    code, out = inspect(str(image), str(text))
    assert code == 1
    assert "notes.txt  not_an_image" in out
    assert "ok 1, failed 1 (not_an_image 1)" in out


def test_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    code, out = inspect(str(tmp_path / "nope"))
    assert code == 2
    assert "no such file or directory" in out
    code, _ = inspect()
    assert code == 2


def test_empty_folder_says_so(tmp_path: Path) -> None:
    code, out = inspect(str(tmp_path))
    assert code == 0
    assert "no image files found" in out


def test_patient_data_is_never_printed(tmp_path: Path) -> None:
    (tmp_path / "ok.dcm").write_bytes(dicom_bytes())
    (tmp_path / "ct.dcm").write_bytes(dicom_bytes(modality="CT"))
    (tmp_path / "cut.dcm").write_bytes(dicom_bytes(size=(64, 64))[:-100])
    code, out = inspect(str(tmp_path))
    assert code == 1
    for secret in (PATIENT_NAME, "Doe", "John", PATIENT_ID, "19700101"):
        assert secret not in out


@pytest.mark.shared_data
def test_shared_dicom_folder() -> None:
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data not present")
    code, out = inspect(str(root / "dicom"))
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0].startswith("FAILED") and "966.dcm  corrupt:" in lines[0]
    assert sum(line.startswith("ok ") for line in lines[:-1]) == 3
    assert "CompressedSamples" not in out  # the RG1 patient-name placeholder
    assert lines[-1] == "ok 3, failed 1 (corrupt 1), skipped 1 non-image file"
