"""The bundle registry: idempotent registration, evaluations, and exactly one active bundle."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.models import BundleRecord
from db.registry import (
    UnknownBundle,
    active_bundle,
    get_bundle,
    list_bundles,
    record_evaluation,
    register_bundle,
    set_active,
)

MANIFEST = {"architectures": ["resnet18", "densenet121"], "ensemble_policy": "mean"}


def test_register_is_idempotent(migrated_engine: Engine) -> None:
    first = register_bundle(migrated_engine, bundle_id="abc", manifest=MANIFEST, path="/bundles/abc")
    again = register_bundle(migrated_engine, bundle_id="abc", manifest=MANIFEST, path="/bundles/abc2")
    assert first.bundle_id == again.bundle_id == "abc"
    assert again.path == "/bundles/abc2" and again.manifest == MANIFEST
    assert again.registered_at == first.registered_at
    assert [b.bundle_id for b in list_bundles(migrated_engine)] == ["abc"]
    assert active_bundle(migrated_engine) is None


def test_record_evaluation(migrated_engine: Engine) -> None:
    register_bundle(migrated_engine, bundle_id="abc", manifest=MANIFEST, path="/b")
    record_evaluation(migrated_engine, "abc", {"sensitivity": 0.98, "specificity": 0.9})
    assert get_bundle(migrated_engine, "abc").metrics == {"sensitivity": 0.98, "specificity": 0.9}
    # Re-registering without metrics keeps them.
    register_bundle(migrated_engine, bundle_id="abc", manifest=MANIFEST, path="/b")
    assert get_bundle(migrated_engine, "abc").metrics["sensitivity"] == 0.98
    with pytest.raises(UnknownBundle):
        record_evaluation(migrated_engine, "nope", {})
    with pytest.raises(UnknownBundle):
        get_bundle(migrated_engine, "nope")


def test_exactly_one_active(migrated_engine: Engine) -> None:
    for bundle_id in ("a", "b", "c"):
        register_bundle(migrated_engine, bundle_id=bundle_id, manifest=MANIFEST, path=f"/{bundle_id}")
    set_active(migrated_engine, "a")
    assert active_bundle(migrated_engine).bundle_id == "a"
    set_active(migrated_engine, "b")
    set_active(migrated_engine, "b")
    assert active_bundle(migrated_engine).bundle_id == "b"
    assert [b.bundle_id for b in list_bundles(migrated_engine) if b.active] == ["b"]
    with pytest.raises(UnknownBundle):
        set_active(migrated_engine, "nope")
    assert active_bundle(migrated_engine).bundle_id == "b"


def test_database_refuses_two_active(migrated_engine: Engine) -> None:
    for bundle_id in ("a", "b"):
        register_bundle(migrated_engine, bundle_id=bundle_id, manifest=MANIFEST, path=f"/{bundle_id}")
    table = BundleRecord.__table__
    with pytest.raises(sa.exc.IntegrityError), migrated_engine.begin() as conn:
        conn.execute(sa.update(table).values(active=True))
    # Many inactive bundles are fine (the unique index covers active rows only).
    assert active_bundle(migrated_engine) is None
