"""The dicomweb:// storage backend against a real Orthanc: bytes, errors, auth, retries and bounds."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from deepcovid.dicomweb import instance_uri
from deepcovid.errors import StorageError, TransientError
from deepcovid.settings import Settings
from deepcovid.storage import Storage
from tests.fixtures.orthanc import OrthancServer
from tests.pacs.instances import Made, archive
from tests.pacs.proxy import pacs_front


def _uri(root: str, made: Made) -> str:
    return instance_uri(root, made.study, made.series, made.sop)


def _storage(tmp_path: Path, root: str, **overrides: object) -> Storage:
    return Storage(Settings(data_dir=tmp_path, dicomweb_allow=[root], **overrides))


@pytest.fixture
def stored(orthanc: OrthancServer) -> tuple[OrthancServer, list[Made]]:
    made = archive()[:2]
    for item in made:
        orthanc.upload(item.data)
    return orthanc, made


def test_wado_rs_returns_the_stored_instance(stored, tmp_path: Path) -> None:
    server, made = stored
    storage = _storage(tmp_path, server.dicomweb)
    for item in made:  # one uncompressed, one RLE: each comes back as stored
        assert storage.read(_uri(server.dicomweb, item)) == item.data


def test_an_unknown_instance_is_not_found_and_an_unlisted_pacs_is_refused(stored, tmp_path: Path) -> None:
    server, made = stored
    storage = _storage(tmp_path, server.dicomweb)
    missing = instance_uri(server.dicomweb, made[0].study, made[0].series, "1.2.3.4")
    with pytest.raises(StorageError) as caught:
        storage.read(missing)
    assert caught.value.reason == "not_found" and "1.2.3.4" not in str(caught.value)
    other = _storage(tmp_path, "dicomweb://127.0.0.1:1/dicom-web")
    with pytest.raises(StorageError) as refused:
        other.read(_uri(server.dicomweb, made[0]))
    assert refused.value.reason == "outside_storage_root"
    with pytest.raises(StorageError) as climbing:
        storage.read(_uri(server.dicomweb, made[0]).replace("/dicom-web/", "/dicom-web/../"))
    assert climbing.value.reason == "not_found"


def test_basic_authentication_from_settings(orthanc_with_auth: OrthancServer, tmp_path: Path) -> None:
    server = orthanc_with_auth
    item = archive()[0]
    server.upload(item.data)
    uri = _uri(server.dicomweb, item)
    with pytest.raises(StorageError) as denied:
        _storage(tmp_path, server.dicomweb).read(uri)
    assert denied.value.reason == "permission_denied"
    user, password = server.auth  # type: ignore[misc]
    storage = _storage(
        tmp_path, server.dicomweb, dicomweb_username=user, dicomweb_password=SecretStr(password)
    )
    assert storage.read(uri) == item.data


def test_a_stopped_pacs_is_transient(stored, tmp_path: Path) -> None:
    server, made = stored
    storage = _storage(tmp_path, server.dicomweb, dicomweb_max_attempts=2)
    server.stop()
    with pytest.raises(TransientError) as caught:
        storage.read(_uri(server.dicomweb, made[0]))
    assert "127.0.0.1" not in str(caught.value) and made[0].sop not in str(caught.value)


def test_429_is_retried_after_the_wait_the_pacs_asks_for(stored, tmp_path: Path) -> None:
    server, made = stored
    with pacs_front(server.base) as front:
        front.throttle, front.retry_after = 2, "1"
        storage = _storage(tmp_path, front.dicomweb, dicomweb_max_attempts=4)
        assert storage.read(_uri(front.dicomweb, made[0])) == made[0].data
        statuses = [status for _, status in front.seen]
        assert statuses == [429, 429, 200]
        gaps = [b - a for (a, _), (b, _) in zip(front.seen, front.seen[1:], strict=False)]
        assert min(gaps) >= 0.95  # Retry-After: 1 honoured, not the 0.5 s default backoff

        front.throttle = 10
        with pytest.raises(TransientError, match="429"):
            _storage(tmp_path, front.dicomweb, dicomweb_max_attempts=2).read(_uri(front.dicomweb, made[0]))


def test_requests_in_flight_to_one_pacs_are_bounded(stored, tmp_path: Path) -> None:
    server, made = stored
    with pacs_front(server.base) as front:
        front.hold_s = 0.2
        storage = _storage(tmp_path, front.dicomweb, dicomweb_max_connections=2)
        uris = [_uri(front.dicomweb, made[i % 2]) for i in range(12)]
        errors: list[BaseException] = []

        def read(uri: str) -> None:
            try:
                storage.read(uri)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(uri,)) for uri in uris]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert front.peak == 2
