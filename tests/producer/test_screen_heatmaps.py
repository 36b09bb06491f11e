"""``screen`` makes Grad-CAM maps right after scoring (DEEPCOVID_HEATMAPS), stores them as artifacts, links
them from the results; a broken artifact store fails only the maps."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from deepcovid.settings import Settings
from tests.fixtures.images import jpeg_bytes, xray_png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heatmap-archive")
    for i in range(6):
        (root / f"img{i}.png").write_bytes(xray_png_bytes(96, opacity=bool(i % 2), seed=i))
    (root / "portrait.jpg").write_bytes(jpeg_bytes(size=(80, 120), seed=9))
    (root / "broken.png").write_bytes(xray_png_bytes(64)[:60])
    return root


@pytest.fixture(scope="module")
def half_flagging_bundle(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 + squeezenet1_1 with the ensemble threshold at the archive's median score: about half of
    the images are flagged."""
    import torch

    from deepcovid.batches import collate
    from deepcovid.bundle import save_bundle
    from deepcovid.ensemble import Ensemble
    from deepcovid.networks import build_network
    from deepcovid.preprocess import load_image

    torch.manual_seed(3)
    networks = {arch: build_network(arch, pretrained="none") for arch in ("resnet18", "squeezenet1_1")}
    probe = save_bundle(tmp_path_factory.mktemp("probe") / "b", networks).path
    ensemble = Ensemble.from_bundle(probe, device="cpu", precision="fp32")
    inputs = [load_image(p.read_bytes())[0] for p in sorted(archive.iterdir()) if p.name != "broken.png"]
    threshold = float(np.median(ensemble.score(collate(inputs)).ensemble_score))
    out = tmp_path_factory.mktemp("bundles-src") / "half"
    return save_bundle(out, networks, ensemble_threshold=threshold).path


def _settings(tmp_path: Path, mode: str, **kw: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", device="cpu", decode_threads=2, batch_size=3, heatmaps=mode, **kw
    )  # type: ignore[arg-type]


def _rows(settings: Settings) -> dict[str, tuple[str | None, str | None, bool, float]]:
    """uri -> (heatmap key, heatmap error, ensemble decision, ensemble score) of every heatmap row."""
    from db.engine import make_engine

    with make_engine(settings.effective_database_url).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT i.uri, h.key, h.error, p.ensemble_decision, p.ensemble_score FROM heatmaps h "
                "JOIN images i ON i.id = h.image_id "
                "JOIN predictions p ON p.image_id = h.image_id AND p.bundle_id = h.bundle_id"
            )
        ).all()
    return {uri: (key, error, bool(decision), score) for uri, key, error, decision, score in rows}


def _predictions(settings: Settings) -> dict[str, tuple[bool, dict[str, float]]]:
    from db.engine import make_engine

    with make_engine(settings.effective_database_url).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT i.uri, p.ensemble_decision, p.ensemble_score, p.resnet18_probability, "
                "p.squeezenet1_1_probability FROM predictions p JOIN images i ON i.id = p.image_id"
            )
        ).all()
    return {uri: (bool(d), {"ensemble": e, "resnet18": r, "squeezenet1_1": s}) for uri, d, e, r, s in rows}


def test_all_links_one_map_to_every_scored_image_explaining_its_stored_score(
    archive: Path, half_flagging_bundle: Path, tmp_path: Path
) -> None:
    from db.engine import make_engine
    from db.queries import export_results
    from deepcovid.artifacts import open_artifacts
    from deepcovid.decode import decode
    from deepcovid.heatmaps import load_heatmap, overlay_from_store
    from producer.screen import screen

    settings = _settings(tmp_path, "all")
    summary = screen(str(archive), settings=settings, bundle=str(half_flagging_bundle))
    assert summary.scored == 7 and sum(summary.failed.values()) == 1 and summary.heatmaps == 7
    rows = _rows(settings)
    predictions = _predictions(settings)
    assert set(rows) == set(predictions) and len(rows) == 7
    store = open_artifacts(settings)
    for uri, (key, error, _decision, _score) in rows.items():
        assert key is not None and error is None
        stored = load_heatmap(store, key)
        # The map explains exactly the probabilities stored for the image: the same forward pass.
        assert stored.probabilities == predictions[uri][1]
        assert set(stored.maps) == {"resnet18", "squeezenet1_1", "ensemble"}
        for name, heat in stored.maps.items():
            assert heat.shape == (224, 224) and 0 < heat.max() <= 1.0 and heat.std() > 1e-3
            assert name == "ensemble" or heat.max() == 1.0  # each network's map is scaled to its peak
        shown = decode(Path(uri).read_bytes()).pixels
        assert (stored.geometry.width, stored.geometry.height) == (shown.shape[1], shown.shape[0])
        png = overlay_from_store(store, key, shown)
        assert png.startswith(b"\x89PNG")
    artifact_files = [p for p in (tmp_path / "data" / "artifacts").rglob("*") if p.is_file()]
    assert len(artifact_files) == 7
    assert not any(
        part in str(p.relative_to(tmp_path)) for p in artifact_files for part in ("img", "portrait")
    )

    out = io.StringIO()
    export_results(make_engine(settings.effective_database_url), summary.job_id, out)
    exported = {row["uri"]: row for row in csv.DictReader(io.StringIO(out.getvalue()))}
    for uri, row in exported.items():
        assert row["heatmap"] == (rows[uri][0] if uri in rows else "")


def test_flagged_maps_only_the_flagged_and_none_maps_nothing(
    archive: Path, half_flagging_bundle: Path, tmp_path: Path
) -> None:
    from producer.screen import screen

    flagged = _settings(tmp_path / "flagged", "flagged")
    screen(str(archive), settings=flagged, bundle=str(half_flagging_bundle))
    decisions = {uri: decision for uri, (decision, _) in _predictions(flagged).items()}
    assert 0 < sum(decisions.values()) < len(decisions)  # the bundle flags some, not all
    assert set(_rows(flagged)) == {uri for uri, decision in decisions.items() if decision}

    none = _settings(tmp_path / "none", "none")
    screen(str(archive), settings=none, bundle=str(half_flagging_bundle))
    assert _predictions(none) and not _rows(none)
    assert not (tmp_path / "none" / "data" / "artifacts").exists()


def test_a_broken_store_leaves_every_image_scored_and_says_why(
    archive: Path, half_flagging_bundle: Path, tmp_path: Path
) -> None:
    from producer.screen import screen

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the artifact store should be")
    settings = _settings(tmp_path, "all", artifacts=str(blocker / "maps"))
    summary = screen(str(archive), settings=settings, bundle=str(half_flagging_bundle))
    assert summary.scored == 7 and summary.heatmaps == 0
    assert list(summary.heatmap_errors.values()) == [7]
    rows = _rows(settings)
    assert len(rows) == 7
    for key, error, _decision, _score in rows.values():
        assert key is None and error is not None and "refused the write" in error
        assert str(tmp_path) not in error


def test_an_s3_store_gets_the_maps_and_a_missing_bucket_fails_only_them(
    archive: Path, half_flagging_bundle: Path, tmp_path: Path, s3_server, s3_bucket
) -> None:
    from producer.screen import screen

    client, bucket = s3_bucket
    s3 = {k.removeprefix("DEEPCOVID_").lower(): v for k, v in s3_server.env().items() if "DEEPCOVID_" in k}
    settings = _settings(tmp_path / "ok", "all", artifacts=f"s3://{bucket}/maps", **s3)
    screen(str(archive), settings=settings, bundle=str(half_flagging_bundle))
    keys = {f"maps/{key}" for key, *_ in _rows(settings).values()}
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}  # type: ignore[attr-defined]
    assert len(keys) == 7 and listed == keys

    missing = _settings(tmp_path / "missing", "all", artifacts="s3://no-such-bucket/maps", **s3)
    summary = screen(str(archive), settings=missing, bundle=str(half_flagging_bundle))
    assert summary.scored == 7
    errors = {error for _key, error, *_ in _rows(missing).values()}
    assert errors == {"the artifact store refused the write: NoSuchBucket"}


def test_the_screen_summary_counts_maps_and_says_why_some_were_not_stored(
    run_cli, producer_env, archive: Path, half_flagging_bundle: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the artifact store should be")
    producer_env(HEATMAPS="all", ARTIFACTS=str(blocker / "maps"))
    result = run_cli("screen", archive, "--bundle", half_flagging_bundle, "--allow-failures")
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "heatmaps stored 0" in out and "Heatmaps not stored (the scores stand)" in out
    assert "the artifact store refused the write: Not a directory" in out
    assert "scored now 7" in out
