"""Bundle register / promote: registering never activates; the gate refuses a less sensitive bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.metrics import summarize


def _bundle(tmp_path: Path, name: str):
    from deepcovid.bundle import save_bundle
    from deepcovid.networks import build_network

    return save_bundle(
        tmp_path / name, {"squeezenet1_1": build_network("squeezenet1_1", "none")}, provenance={"name": name}
    )


def _metrics(bundle_id: str, eval_data_id: str, covid_caught: int) -> dict[str, Any]:
    """evaluate-shaped metrics whose ensemble catches ``covid_caught`` of 100 COVID images at 0.5."""
    labels = [1] * 100 + [0] * 100
    scores = [0.9] * covid_caught + [0.1] * (100 - covid_caught) + [0.2] * 100
    summary = summarize(labels, scores, 0.5, n_resamples=100)
    op = summary["operating_point"]
    return {
        "bundle_id": bundle_id,
        "eval_data_id": eval_data_id,
        "data_source": f"/data/{eval_data_id}",
        "n_scored": 200,
        "counts": {"covid": 100, "non_covid": 100},
        "operating": {
            "scorer": "ensemble",
            "threshold": 0.5,
            "sensitivity": op["sensitivity"]["value"],
            "specificity": op["specificity"]["value"],
            "auc": summary["roc_auc"]["auc"],
        },
        "models": {"squeezenet1_1": summary},
        "ensemble": summary,
    }


def test_register_and_promotion_gate(
    tmp_path: Path, training_cli, cli_runner, configured_database, isolated_settings
) -> None:
    from db.registry import active_bundle, get_bundle
    from deepcovid.settings import get_settings
    from training.registry import record_evaluation_for

    engine, settings = configured_database, get_settings()
    a, b, c = (_bundle(tmp_path, n) for n in "abc")

    def cli(*args: str):
        return cli_runner.invoke(training_cli, list(args))

    def active() -> str | None:
        record = active_bundle(engine)
        return record.bundle_id if record else None

    result = cli("bundle", "register", str(a.path))
    assert result.exit_code == 0, result.output
    assert (isolated_settings / a.bundle_id / "manifest.json").is_file()
    assert get_bundle(engine, a.bundle_id).path == str(isolated_settings / a.bundle_id)
    assert active() is None  # registering, even the first bundle, never activates

    assert cli("bundle", "promote", a.bundle_id).exit_code == 0
    assert active() == a.bundle_id

    assert cli("bundle", "register", str(b.path)).exit_code == 0
    result = cli("bundle", "promote", b.bundle_id)
    assert result.exit_code == 1 and "no recorded evaluation" in result.output
    assert active() == a.bundle_id

    record_evaluation_for(engine, a, _metrics(a.bundle_id, "set-x", 98), settings=settings)
    record_evaluation_for(engine, b, _metrics(b.bundle_id, "set-y", 100), settings=settings)
    result = cli("bundle", "promote", b.bundle_id)
    assert result.exit_code == 1 and "deepcovid evaluate" in result.output and "/data/set-x" in result.output

    record_evaluation_for(engine, b, _metrics(b.bundle_id, "set-x", 95), settings=settings)
    assert set(get_bundle(engine, b.bundle_id).metrics["evaluations"]) == {"set-x", "set-y"}
    result = cli("bundle", "promote", b.bundle_id)
    assert result.exit_code == 1 and "less sensitive" in result.output and "0.9500" in result.output
    assert active() == a.bundle_id

    result = cli("bundle", "promote", b.bundle_id, "--force")
    assert result.exit_code == 0 and "forced" in result.output
    assert active() == b.bundle_id

    # c: registered and promoted in one go; as sensitive as b on the same data, so the gate lets it through.
    record_evaluation_for(engine, c, _metrics(c.bundle_id, "set-x", 95), settings=settings)
    result = cli("bundle", "register", str(c.path), "--promote")
    assert result.exit_code == 0, result.output
    assert active() == c.bundle_id

    result = cli("bundle", "promote", "0123456789abcdef")
    assert result.exit_code == 1 and "not registered" in result.output


def test_register_refuses_tampered_bundle_and_missing_schema(
    tmp_path: Path, training_cli, cli_runner, isolated_settings, monkeypatch
) -> None:
    from deepcovid.settings import get_settings

    a = _bundle(tmp_path, "a")
    monkeypatch.setenv("DEEPCOVID_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    get_settings.cache_clear()
    result = cli_runner.invoke(training_cli, ["bundle", "register", str(a.path)])
    assert result.exit_code == 1 and "deepcovid db upgrade" in result.output

    with (a.path / "squeezenet1_1.safetensors").open("r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x00")
    result = cli_runner.invoke(training_cli, ["bundle", "register", str(a.path)])
    assert result.exit_code == 1 and "modified" in result.output
