"""Storage: local reads confined to the storage roots, OS errors mapped to reasons, S3 through moto.

Every local case runs twice: through openat2 and through the component-by-component walk that replaces it
on kernels without openat2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepcovid import beneath
from deepcovid.errors import StorageError, TransientError
from deepcovid.settings import Settings
from deepcovid.storage import open_storage, parse_s3_uri, s3_allowed


def make_settings(roots: list[Path], **kw: object) -> Settings:
    return Settings(storage_roots=roots, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["openat2", "walk"], autouse=True)
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way local paths are opened beneath their root."""
    if request.param == "openat2" and not beneath.openat2_available():
        pytest.skip("this kernel has no openat2")
    monkeypatch.setattr(beneath, "OPENAT2", request.param == "openat2")
    return str(request.param)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"hello")
    (tmp_path / "secret.txt").write_bytes(b"do not read")
    return root


def reason_of(storage: object, uri: str) -> str:
    with pytest.raises(StorageError) as info:
        storage.read(uri)  # type: ignore[attr-defined]
    return info.value.reason


def test_reads_a_file_under_a_root(archive: Path) -> None:
    storage = open_storage(make_settings([archive]))
    assert storage.read(str(archive / "sub" / "a.png")) == b"hello"
    assert storage.stat(str(archive / "sub" / "a.png")) == 5


def test_no_roots_refuses_everything_and_says_how_to_fix(archive: Path) -> None:
    storage = open_storage(make_settings([]))
    with pytest.raises(StorageError) as info:
        storage.read(str(archive / "sub" / "a.png"))
    assert info.value.reason == "outside_storage_root"
    assert "DEEPCOVID_STORAGE_ROOTS" in info.value.detail


def test_extra_roots_widen_the_configured_ones(archive: Path, tmp_path: Path) -> None:
    storage = open_storage(make_settings([]), extra_roots=[archive])
    assert storage.read(str(archive / "sub" / "a.png")) == b"hello"


def test_dot_dot_escape_is_refused(archive: Path) -> None:
    storage = open_storage(make_settings([archive]))
    assert reason_of(storage, str(archive / "sub" / ".." / ".." / "secret.txt")) == "outside_storage_root"


def test_sibling_directory_with_a_common_prefix_is_outside(archive: Path, tmp_path: Path) -> None:
    sibling = tmp_path / "archive-other"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(b"x")
    storage = open_storage(make_settings([archive]))
    assert reason_of(storage, str(sibling / "x.png")) == "outside_storage_root"


def test_symlink_escaping_the_root_is_refused(archive: Path, tmp_path: Path) -> None:
    (archive / "link.png").symlink_to(tmp_path / "secret.txt")
    (archive / "dirlink").symlink_to(tmp_path)
    storage = open_storage(make_settings([archive]))
    assert reason_of(storage, str(archive / "link.png")) == "outside_storage_root"
    assert reason_of(storage, str(archive / "dirlink" / "secret.txt")) == "outside_storage_root"


def test_symlink_inside_the_root_is_refused(archive: Path) -> None:
    # No symlink is followed beneath a root, even one pointing inside it: the check and the open are one.
    (archive / "alias.png").symlink_to(archive / "sub" / "a.png")
    storage = open_storage(make_settings([archive]))
    assert reason_of(storage, str(archive / "alias.png")) == "outside_storage_root"


def test_relative_paths_are_refused(archive: Path) -> None:
    storage = open_storage(make_settings([archive]))
    assert reason_of(storage, "sub/a.png") == "outside_storage_root"


def test_os_errors_map_to_reasons(archive: Path) -> None:
    storage = open_storage(make_settings([archive]))
    assert reason_of(storage, str(archive / "missing.png")) == "not_found"
    assert reason_of(storage, str(archive / "sub" / "a.png" / "below")) == "not_found"
    assert reason_of(storage, str(archive / "sub")) == "is_a_directory"
    os.mkfifo(archive / "pipe")
    assert reason_of(storage, str(archive / "pipe")) == "unreadable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(archive: Path) -> None:
    path = archive / "locked.png"
    path.write_bytes(b"x")
    path.chmod(0)
    try:
        assert reason_of(open_storage(make_settings([archive])), str(path)) == "permission_denied"
    finally:
        path.chmod(0o644)


def test_too_large_is_refused_before_reading(archive: Path) -> None:
    (archive / "big.png").write_bytes(b"x" * 101)
    storage = open_storage(make_settings([archive], max_file_bytes=100))
    with pytest.raises(StorageError) as info:
        storage.read(str(archive / "big.png"))
    assert info.value.reason == "too_large"
    assert "DEEPCOVID_MAX_FILE_BYTES" in info.value.detail


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b.dcm") == ("bucket", "a/b.dcm")
    for bad in ("s3://bucket", "s3:///key", "/local", "s3://bucket/"):
        with pytest.raises(ValueError):
            parse_s3_uri(bad)


def s3_settings(server: object, **kw: object) -> Settings:
    kw.setdefault("s3_allow", [])
    return Settings(
        s3_endpoint_url=server.endpoint_url,  # type: ignore[attr-defined]
        s3_access_key_id=server.access_key,  # type: ignore[attr-defined]
        s3_secret_access_key=server.secret_key,  # type: ignore[attr-defined]
        s3_max_attempts=2,
        **kw,  # type: ignore[arg-type]
    )


def test_s3_read_and_errors(s3_server: object, s3_bucket: tuple[object, str]) -> None:
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="dir/a.png", Body=b"png bytes")  # type: ignore[attr-defined]
    client.put_object(Bucket=bucket, Key="big.png", Body=b"x" * 50)  # type: ignore[attr-defined]
    allow = [bucket, f"no-such-bucket-{bucket}"]
    storage = open_storage(s3_settings(s3_server, max_file_bytes=20, s3_allow=allow))
    assert storage.read(f"s3://{bucket}/dir/a.png") == b"png bytes"
    assert storage.stat(f"s3://{bucket}/dir/a.png") == 9
    assert reason_of(storage, f"s3://{bucket}/dir/missing.png") == "not_found"
    assert reason_of(storage, f"s3://no-such-bucket-{bucket}/a.png") == "not_found"
    assert reason_of(storage, f"s3://{bucket}/big.png") == "too_large"
    assert reason_of(storage, "s3://only-a-bucket") == "not_found"


def _unreachable_s3(allow: list[str]) -> Settings:
    """Settings whose S3 endpoint is a free port nothing listens on: any request would fail."""
    from tests.fixtures.services import free_port

    return Settings(
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        s3_access_key_id="x",  # type: ignore[arg-type]
        s3_secret_access_key="y",  # type: ignore[arg-type]
        s3_max_attempts=1,
        s3_allow=allow,
    )


def test_s3_unreachable_is_transient() -> None:
    with pytest.raises(TransientError):
        open_storage(_unreachable_s3(["bucket"])).read("s3://bucket/key.png")


def test_s3_client_is_recreated_after_fork(s3_server: object) -> None:
    storage = open_storage(s3_settings(s3_server))
    first = storage.client
    assert storage.client is first
    storage._client_pid = -1  # as if this object had been inherited through fork()
    assert storage.client is not first


# --------------------------------------------------------------------------------------------------
# Confinement: no symlink at any component, no hard link unless allowed, S3 only where allowed


def test_dot_dot_that_stays_beneath_the_root_is_read(archive: Path) -> None:
    storage = open_storage(make_settings([archive]))
    assert storage.read(f"{archive}/sub/../sub/./a.png") == b"hello"
    assert reason_of(storage, f"{archive}/sub/..") == "is_a_directory"
    assert reason_of(storage, f"{archive}/..") == "outside_storage_root"


def test_symlinked_parent_directory_inside_the_root_is_refused(archive: Path) -> None:
    (archive / "alias").symlink_to(archive / "sub")
    storage = open_storage(make_settings([archive]))
    assert reason_of(storage, str(archive / "alias" / "a.png")) == "outside_storage_root"


def test_the_root_itself_may_be_a_symlink(archive: Path, tmp_path: Path) -> None:
    (tmp_path / "mounted").symlink_to(archive)
    storage = open_storage(make_settings([tmp_path / "mounted"]))
    assert storage.read(str(tmp_path / "mounted" / "sub" / "a.png")) == b"hello"
    assert storage.read(str(archive / "sub" / "a.png")) == b"hello"  # the root's real path names it too


def test_hard_link_is_refused_unless_allowed(archive: Path, tmp_path: Path) -> None:
    """A hard link to a file outside the root has the same path shape as any file inside it."""
    os.link(tmp_path / "secret.txt", archive / "linked.png")
    storage = open_storage(make_settings([archive]))
    with pytest.raises(StorageError) as info:
        storage.stat(str(archive / "linked.png"))
    assert info.value.reason == "outside_storage_root"
    assert "DEEPCOVID_ALLOW_HARD_LINKS" in info.value.detail
    assert reason_of(storage, str(archive / "linked.png")) == "outside_storage_root"
    allowing = open_storage(make_settings([archive], allow_hard_links=True))
    assert allowing.read(str(archive / "linked.png")) == b"do not read"


def test_socket_is_unreadable_not_an_internal_error(archive: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(archive / "sock.png"))
        assert reason_of(open_storage(make_settings([archive])), str(archive / "sock.png")) == "unreadable"


def test_s3_allow_list_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_S3_ALLOW", " xrays , s3://scans/2024/ ,")
    settings = Settings()
    assert settings.s3_allow == ["xrays", "s3://scans/2024/"]
    assert s3_allowed(settings, "xrays") and s3_allowed(settings, "xrays", "any/key.dcm")
    assert s3_allowed(settings, "scans", "2024") and s3_allowed(settings, "scans", "2024/")
    assert s3_allowed(settings, "scans", "2024/03/a.dcm")
    assert not s3_allowed(settings, "scans")  # the whole bucket: more than 2024/
    assert not s3_allowed(settings, "scans", "2024-old/a.dcm")
    assert not s3_allowed(settings, "scans", "2024/../2023/a.dcm")
    assert not s3_allowed(settings, "xrays", "../scans/2023/a.dcm")  # a normalising server: another bucket
    assert not s3_allowed(settings, "other", "a.dcm")
    assert not s3_allowed(Settings(s3_allow=[]), "xrays", "a.dcm")


def test_s3_reads_outside_the_allow_list_are_refused(
    s3_server: object, s3_bucket: tuple[object, str]
) -> None:
    client, bucket = s3_bucket
    for key in ("allowed/a.png", "private/b.png", "allowed-not/c.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"bytes")  # type: ignore[attr-defined]
    nothing = open_storage(s3_settings(s3_server))
    assert reason_of(nothing, f"s3://{bucket}/allowed/a.png") == "outside_storage_root"
    storage = open_storage(s3_settings(s3_server, s3_allow=[f"{bucket}/allowed"]))
    assert storage.read(f"s3://{bucket}/allowed/a.png") == b"bytes"
    assert storage.stat(f"s3://{bucket}/allowed/a.png") == 5
    for key in ("private/b.png", "allowed-not/c.png", "allowed/../private/b.png"):
        assert reason_of(storage, f"s3://{bucket}/{key}") == "outside_storage_root", key
    with pytest.raises(StorageError) as info:
        storage.stat(f"s3://{bucket}/private/b.png")
    assert info.value.reason == "outside_storage_root"
    assert "DEEPCOVID_S3_ALLOW" in info.value.detail


def test_s3_refusal_sends_no_request() -> None:
    """Nothing listens at the endpoint, so a request would be a TransientError: the refusal comes first."""
    storage = open_storage(_unreachable_s3(["other-bucket"]))
    assert reason_of(storage, "s3://bucket/key.png") == "outside_storage_root"
    with pytest.raises(StorageError):
        storage.stat("s3://bucket/key.png")
