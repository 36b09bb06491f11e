"""The artifact store: opaque stable keys, whole writes, never inside the archive, local and S3 (moto)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepcovid.artifacts import ArtifactError, LocalArtifacts, S3Artifacts, artifact_key, open_artifacts
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.explain import CropGeometry, Explanation
from deepcovid.heatmaps import decode, encode, heatmap_key
from deepcovid.settings import Settings

URI = "/archive/Doe^Jane/1953-02-01/chest.png"


def test_keys_are_opaque_stable_and_per_bundle() -> None:
    key = heatmap_key(URI, "bundle-a")
    assert key == heatmap_key(URI, "bundle-a")  # a redelivered chunk writes the same key
    assert key != heatmap_key(URI, "bundle-b") and key != heatmap_key(URI + "x", "bundle-a")
    assert not any(part in key for part in ("Doe", "Jane", "1953", "chest", "archive", "bundle"))
    assert key.startswith("heatmaps/") and key.endswith(".npz")
    assert artifact_key("heatmaps", URI, "bundle-a", ".npz") == key


def test_a_local_write_is_whole_and_a_rewrite_replaces_it(tmp_path: Path) -> None:
    store = LocalArtifacts(tmp_path / "artifacts")
    key = heatmap_key(URI, "b")
    store.put(key, b"first")
    store.put(key, b"second")
    files = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert [p.name for p in files] == [key.rsplit("/", 1)[1]]  # one file, no temporary left behind
    assert store.get(key) == b"second"


def test_a_broken_local_store_says_why_without_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store should be")
    with pytest.raises(ArtifactError) as caught:
        LocalArtifacts(blocker).put(heatmap_key(URI, "b"), b"x")
    assert str(tmp_path) not in str(caught.value) and "heatmaps/" not in str(caught.value)
    with pytest.raises(ArtifactError):
        LocalArtifacts(tmp_path).put("../escape", b"x")


def test_a_store_inside_the_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    inside = Settings(data_dir=tmp_path / "data", storage_roots=[archive], artifacts=str(archive / "maps"))
    with pytest.raises(UserError) as caught:
        open_artifacts(inside)
    assert caught.value.exit_code is ExitCode.BAD_SETTING and "DEEPCOVID_STORAGE_ROOTS" in str(caught.value)
    with pytest.raises(UserError):  # the source `screen` reads counts as a root too
        open_artifacts(Settings(data_dir=archive / "data"), extra_roots=[archive])
    default = open_artifacts(Settings(data_dir=tmp_path / "data", storage_roots=[archive]))
    assert isinstance(default, LocalArtifacts) and default.root == tmp_path / "data" / "artifacts"

    s3 = dict(s3_allow=["xrays/2024"], data_dir=tmp_path)
    for refused in ("s3://xrays/2024/maps", "s3://xrays", "s3://xrays/2024"):
        with pytest.raises(UserError):
            open_artifacts(Settings(artifacts=refused, **s3), client=object())  # type: ignore[arg-type]
    store = open_artifacts(Settings(artifacts="s3://xrays/2024-maps", **s3), client=object())  # type: ignore[arg-type]
    assert isinstance(store, S3Artifacts) and store.describe() == "s3://xrays/2024-maps"


def test_the_s3_store_writes_under_its_prefix_and_a_missing_bucket_is_a_reason(s3_server, s3_bucket) -> None:
    client, bucket = s3_bucket
    settings = Settings(artifacts=f"s3://{bucket}/deepcovid/maps", **_s3(s3_server))
    store = open_artifacts(settings)
    key = heatmap_key(URI, "b")
    store.put(key, b"map")
    store.put(key, b"map")  # idempotent: the same object
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]  # type: ignore[attr-defined]
    assert [o["Key"] for o in listed] == [f"deepcovid/maps/{key}"]
    assert store.get(key) == b"map"

    gone = open_artifacts(Settings(artifacts="s3://no-such-bucket-here/maps", **_s3(s3_server)))
    with pytest.raises(ArtifactError) as caught:
        gone.put(key, b"map")
    assert "NoSuchBucket" in str(caught.value) and "no-such-bucket-here" not in str(caught.value)


def _s3(server) -> dict[str, str]:
    """The server's DEEPCOVID_* variables as Settings fields."""
    env = server.env()
    return {k.removeprefix("DEEPCOVID_").lower(): v for k, v in env.items() if k.startswith("DEEPCOVID_")}


def test_a_stored_map_reads_back_with_its_geometry_and_probabilities() -> None:
    rng = np.random.default_rng(0)
    maps = {name: rng.random((224, 224), dtype=np.float32) for name in ("resnet18", "ensemble")}
    probabilities = {"resnet18": 0.731, "ensemble": 0.731}
    geometry = CropGeometry.for_size(600, 420)
    stored = decode(encode(Explanation(maps, probabilities), geometry, "b1", "mean"))
    assert stored.geometry == geometry and stored.probabilities == probabilities
    assert stored.bundle_id == "b1" and stored.policy == "mean"
    for name, heat in maps.items():
        np.testing.assert_allclose(stored.maps[name], heat, atol=0.5 / 255 + 1e-6)
    with pytest.raises(ArtifactError):
        decode(b"not an npz")
