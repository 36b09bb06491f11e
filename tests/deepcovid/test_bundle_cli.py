"""`deepcovid bundle init` and `deepcovid bundle show`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.main import bundle_app
from deepcovid.settings import get_settings

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    """The `bundle` group of the real CLI, so tests invoke `init ...` and `show ...`."""
    return bundle_app


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DEEPCOVID_IMAGENET_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("DEEPCOVID_BUNDLES_DIR", str(tmp_path / "installed"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _init(app: typer.Typer, out: Path, *args: str):
    return runner.invoke(app, ["init", str(out), *args])


def test_init_then_show(app: typer.Typer, clean_env: Path) -> None:
    out = clean_env / "bundle"
    result = _init(app, out, "--pretrained", "none", "--arch", "squeezenet1_1", "--arch", "resnet18")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bundle_id"] in result.output
    assert manifest["architectures"] == ["squeezenet1_1", "resnet18"]
    assert manifest["provenance"]["kind"] == "untrained"

    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    for text in (manifest["bundle_id"], "verified", "squeezenet1_1", "resnet18", "mean", "untrained"):
        assert text in shown.output

    as_json = runner.invoke(app, ["show", str(out), "--json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == manifest


def test_show_finds_an_installed_bundle_by_id(app: typer.Typer, clean_env: Path) -> None:
    from deepcovid.bundle import install_bundle, load_bundle

    out = clean_env / "b"
    assert _init(app, out, "--pretrained", "none", "--arch", "squeezenet1_1").exit_code == 0
    bundle = load_bundle(out)
    install_bundle(bundle, clean_env / "installed")
    shown = runner.invoke(app, ["show", bundle.bundle_id[:8], "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["bundle_id"] == bundle.bundle_id
    missing = runner.invoke(app, ["show", "deadbeefdeadbeef"])
    assert missing.exit_code == 1 and "not installed" in missing.output


def test_show_refuses_a_tampered_bundle(app: typer.Typer, clean_env: Path) -> None:
    out = clean_env / "bundle"
    assert _init(app, out, "--pretrained", "none", "--arch", "squeezenet1_1").exit_code == 0
    weights = out / "squeezenet1_1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    result = runner.invoke(app, ["show", str(out)])
    assert result.exit_code == 1
    assert "has been modified" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught error


def test_init_without_imagenet_weights_explains_what_to_do(app: typer.Typer, clean_env: Path) -> None:
    result = _init(app, clean_env / "x", "--pretrained", "imagenet", "--arch", "resnet18")
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "resnet18-f37072fd.pth" in text
    assert "DEEPCOVID_IMAGENET_WEIGHTS_DIR" in text and "--pretrained none" in text
    assert "Traceback" not in result.output
    assert not (clean_env / "x").exists()


def test_init_from_a_directory_of_checkpoints(app: typer.Typer, clean_env: Path) -> None:
    import torch
    from torchvision import models

    from deepcovid.networks import imagenet_weights_filename

    weights = clean_env / "imagenet"
    weights.mkdir()
    state = models.squeezenet1_1(weights=None).state_dict()
    torch.save(state, weights / imagenet_weights_filename("squeezenet1_1"))
    out = clean_env / "b"
    result = _init(app, out, "--pretrained", str(weights), "--arch", "squeezenet1_1")
    assert result.exit_code == 0, result.output
    from deepcovid.bundle import load_networks

    loaded = load_networks(out)["squeezenet1_1"].state_dict()
    assert torch.equal(loaded["features.0.weight"], state["features.0.weight"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pretrained", "none", "--arch", "vgg16"], "unknown architecture"),
        (["--pretrained", "/no/such/file"], "no such file"),
        (["--pretrained", "none", "--arch", "squeezenet1_1", "--policy", "vote"], "unknown ensemble policy"),
    ],
)
def test_init_errors_are_one_clear_line(
    app: typer.Typer, clean_env: Path, args: list[str], message: str
) -> None:
    result = _init(app, clean_env / "x", *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_init_refuses_a_non_empty_directory(app: typer.Typer, clean_env: Path) -> None:
    out = clean_env / "x"
    out.mkdir()
    (out / "keep").write_text("mine")
    result = _init(app, out, "--pretrained", "none", "--arch", "squeezenet1_1")
    assert result.exit_code == 1 and "not an empty directory" in result.output
    assert (out / "keep").read_text() == "mine"


@pytest.mark.slow
def test_the_installed_command_writes_all_four_networks(clean_env: Path) -> None:
    """The real entry point, as a user runs it: `deepcovid bundle init OUT --pretrained none`."""
    out = clean_env / "full"
    run = [sys.executable, "-m", "cli.main", "bundle"]
    init = subprocess.run([*run, "init", str(out), "--pretrained", "none"], capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    show = subprocess.run([*run, "show", str(out), "--json"], capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    manifest = json.loads(show.stdout)
    assert manifest["architectures"] == ["resnet18", "resnet50", "squeezenet1_1", "densenet121"]
    assert manifest["thresholds"] == dict.fromkeys(manifest["architectures"], 0.5)
