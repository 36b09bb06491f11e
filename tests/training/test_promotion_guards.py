"""Promotion guards (issue 18): an untrained bundle warns when promoted; a refusal for want of an
evaluation names the exact commands to run; register works on a fresh data dir with no `db upgrade`."""

from __future__ import annotations

from pathlib import Path

import pytest

WARNING = "is UNTRAINED (made by `deepcovid bundle init`): its scores are meaningless"


def _bundle(tmp_path: Path, name: str, kind: str = "trained"):
    from deepcovid.bundle import save_bundle
    from deepcovid.networks import build_network

    return save_bundle(
        tmp_path / name,
        {"squeezenet1_1": build_network("squeezenet1_1", "none")},
        provenance={"name": name, "kind": kind},
    )


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def cli(training_cli, cli_runner):
    def run(*args: str):
        return cli_runner.invoke(training_cli, [str(a) for a in args])

    return run


def test_promoting_an_untrained_bundle_warns_unless_allowed(
    tmp_path: Path, cli, configured_database, isolated_settings
) -> None:
    untrained = _bundle(tmp_path, "u", kind="untrained")
    result = cli("bundle", "register", untrained.path, "--promote")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if WARNING in line]
    assert len(warned) == 1 and "--allow-untrained" in warned[0], result.output

    result = cli("bundle", "promote", untrained.bundle_id)  # already active: promoted again, warned again
    assert result.exit_code == 0 and WARNING in _flat(result.output), result.output
    result = cli("bundle", "promote", untrained.bundle_id, "--allow-untrained")
    assert result.exit_code == 0 and "UNTRAINED" not in result.output, result.output

    trained = _bundle(tmp_path, "t")
    result = cli("bundle", "register", trained.path, "--promote", "--force")
    assert result.exit_code == 0 and "UNTRAINED" not in result.output, result.output


def test_refusal_over_an_untrained_active_bundle_says_to_force(
    tmp_path: Path, cli, configured_database, isolated_settings
) -> None:
    untrained, trained = _bundle(tmp_path, "u", kind="untrained"), _bundle(tmp_path, "t")
    assert cli("bundle", "register", untrained.path, "--promote", "--allow-untrained").exit_code == 0
    assert cli("bundle", "register", trained.path).exit_code == 0
    result = cli("bundle", "promote", trained.bundle_id)
    assert result.exit_code == 1
    text = _flat(result.output)
    assert f"the active bundle {untrained.bundle_id} is untrained" in text
    assert f"`deepcovid bundle promote {trained.bundle_id} --force`" in text
    assert "deepcovid evaluate" not in text  # evaluating an untrained bundle would tell nothing


def test_refusal_for_an_unevaluated_active_bundle_names_the_commands(
    tmp_path: Path, cli, configured_database, isolated_settings
) -> None:
    from db.registry import get_bundle
    from deepcovid.settings import get_settings
    from tests.training.test_training_promotion import _metrics
    from training.registry import record_evaluation_for

    engine = configured_database
    active, candidate = _bundle(tmp_path, "a"), _bundle(tmp_path, "b")
    assert cli("bundle", "register", active.path, "--promote").exit_code == 0
    assert cli("bundle", "register", candidate.path).exit_code == 0
    active_path = get_bundle(engine, active.bundle_id).path
    candidate_path = get_bundle(engine, candidate.bundle_id).path

    # Neither is evaluated: evaluate both on the same data, or force.
    text = _flat(cli("bundle", "promote", candidate.bundle_id).output)
    assert f"`deepcovid evaluate {active_path} TEST_DATA --out REPORT_DIR`" in text
    assert f"`deepcovid evaluate {candidate_path} TEST_DATA --out REPORT_DIR`" in text
    assert f"`deepcovid bundle promote {candidate.bundle_id} --force`" in text

    # The candidate was evaluated: evaluate the active bundle on that very data.
    metrics = _metrics(candidate.bundle_id, "set-x", 98)
    record_evaluation_for(engine, candidate, metrics, settings=get_settings())
    result = cli("bundle", "promote", candidate.bundle_id)
    assert result.exit_code == 1
    text = _flat(result.output)
    assert f"`deepcovid evaluate {active_path} /data/set-x --out REPORT_DIR`, then promote again" in text
    assert f"`deepcovid bundle promote {candidate.bundle_id} --force`" in text


def test_register_creates_the_embedded_database_on_a_fresh_data_dir(
    tmp_path: Path, cli, isolated_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepcovid.settings import get_settings

    monkeypatch.delenv("DEEPCOVID_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    bundle = _bundle(tmp_path, "a")
    result = cli("bundle", "register", bundle.path, "--promote")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data-dir" / "deepcovid.db").is_file()
    assert "active" in cli("bundle", "list").output
