"""Reading image bytes from local files (only beneath configured roots), S3 or a DICOMweb PACS (only
where allowed).

Workers are handed URIs by whoever can reach the broker, so a URI must not be a way to read arbitrary
files on a worker: a local path is opened beneath its root by the kernel, following no symlink
(``deepcovid.beneath``), and an S3 URI is refused before any request unless DEEPCOVID_S3_ALLOW covers it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepcovid.beneath import open_beneath
from deepcovid.dicomweb import DicomWebReader, is_dicomweb
from deepcovid.errors import StorageError, TransientError

if TYPE_CHECKING:
    from deepcovid.settings import Settings

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | _O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _O_CLOEXEC

# S3 error codes that mean "this object", "no access" or "try again later".
_S3_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_S3_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_S3_TRANSIENT = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; raises ValueError for anything else."""
    if not uri.startswith(S3_SCHEME):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket or not key:
        raise ValueError("an S3 URI needs both a bucket and a key: s3://bucket/key")
    return bucket, key


def parse_s3_allow(entries: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``DEEPCOVID_S3_ALLOW`` entries (``bucket`` or ``bucket/prefix``, ``s3://`` optional) as pairs."""
    pairs = []
    for entry in entries:
        bucket, _, prefix = entry.strip().removeprefix(S3_SCHEME).partition("/")
        if bucket:
            pairs.append((bucket, prefix.strip("/")))
    return tuple(pairs)


def s3_allowed(settings: Settings, bucket: str, prefix: str = "") -> bool:
    """Whether DEEPCOVID_S3_ALLOW lets every key under ``s3://bucket/prefix`` be read (a key is a prefix).

    An allowed prefix names a folder: ``xrays/2024`` allows ``2024/...``, never ``2024-old/...``.
    """
    return _allowed(parse_s3_allow(settings.s3_allow), bucket, prefix)


def _allowed(allow: tuple[tuple[str, str], ...], bucket: str, key: str) -> bool:
    # HTTP clients and some S3-compatible servers normalise dot segments, which would climb out of the
    # prefix or even the bucket.
    if {".", ".."} & set(key.split("/")):
        return False
    for allowed_bucket, allowed_prefix in allow:
        if bucket == allowed_bucket and (
            not allowed_prefix or key.rstrip("/") == allowed_prefix or key.startswith(allowed_prefix + "/")
        ):
            return True
    return False


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client configured from settings (endpoint for MinIO/moto, retries, timeouts).

    Credentials come from settings when given, otherwise from boto3's usual chain
    (environment, shared config, instance role).
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": settings.s3_max_attempts, "mode": "adaptive"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(10, settings.decode_threads * 2),
    )
    kwargs: dict[str, Any] = {"region_name": settings.s3_region, "config": config}
    if settings.s3_endpoint_url:
        kwargs["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None:
        kwargs["aws_access_key_id"] = settings.s3_access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
    # A fresh session: the default session is not safe to share across threads.
    return boto3.session.Session().client("s3", **kwargs)


def _os_error(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return StorageError("not_found", "no such file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorageError("permission_denied", "the file system refused access")
    if exc.errno == errno.EISDIR:
        return StorageError("is_a_directory")
    if exc.errno == errno.ELOOP:
        return StorageError("outside_storage_root", "a symbolic link in the path: symlinks are not followed")
    if exc.errno == errno.EXDEV:
        return StorageError("outside_storage_root", "the path leads above its storage root")
    if exc.errno == errno.ENXIO:
        return StorageError("unreadable", "not a regular file")
    return StorageError("unreadable", f"{type(exc).__name__}: {os.strerror(exc.errno or 0)}")


def _components(path: str) -> tuple[str, ...]:
    """The names in an absolute path; ``..`` is kept for the kernel to refuse if it climbs above a root."""
    return tuple(part for part in path.split("/") if part not in ("", "."))


class Storage:
    """Reads bytes for a URI: an absolute local path under a storage root, ``s3://bucket/key``, or a
    ``dicomweb://`` instance of a PACS DEEPCOVID_DICOMWEB_ALLOW lists."""

    def __init__(self, settings: Settings, extra_roots: Iterable[Path | str] = ()) -> None:
        self.settings = settings
        configured = [os.fspath(r) for r in (*settings.storage_roots, *extra_roots)]
        # Each root is resolved once, here: the root itself may be a symlink, nothing beneath it may.
        self.roots: tuple[str, ...] = tuple(dict.fromkeys(os.path.realpath(r) for r in configured))
        spellings = {}
        for root in configured:
            real = os.path.realpath(root)
            spellings[_components(os.path.abspath(root))] = real
            spellings[_components(real)] = real
        # Longest first, so a URI is opened from the most specific root that names it.
        self._spellings = sorted(spellings.items(), key=lambda item: -len(item[0]))
        self.max_file_bytes = settings.max_file_bytes
        self.allow_hard_links = settings.allow_hard_links
        self.s3_allow = parse_s3_allow(settings.s3_allow)
        self._client: Any = None
        self._client_pid: int | None = None
        self._client_lock = threading.Lock()
        self.dicomweb = DicomWebReader(settings)

    # -- public -----------------------------------------------------------------------------

    def read(self, uri: str) -> bytes:
        """The object's bytes; raises StorageError (the image's fault) or TransientError (retry)."""
        if uri.startswith(S3_SCHEME):
            return self._read_s3(uri)
        if is_dicomweb(uri):
            return self.dicomweb.read(uri, self.max_file_bytes)
        return self._read_local(uri)

    def stat(self, uri: str) -> int:
        """The object's size in bytes, with the same checks and errors as ``read``."""
        if uri.startswith(S3_SCHEME):
            bucket, key = self._s3_location(uri)
            try:
                head = self.client.head_object(Bucket=bucket, Key=key)
            except Exception as exc:
                raise _s3_error(exc) from exc
            return int(head["ContentLength"])
        if is_dicomweb(uri):  # WADO-RS has no HEAD for an instance's size
            return len(self.dicomweb.read(uri, self.max_file_bytes))
        fd, st = self._open_local(uri)
        os.close(fd)
        return st.st_size

    @property
    def client(self) -> Any:
        """The S3 client for this process, created on first use (after any fork)."""
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:
            with self._client_lock:
                if self._client is None or self._client_pid != pid:
                    self._client = s3_client(self.settings)
                    self._client_pid = pid
        return self._client

    # -- local ------------------------------------------------------------------------------

    def _locate(self, uri: str) -> tuple[str, str]:
        """``(real root, path relative to it)`` for a local URI; refused unless it names a storage root."""
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        if not self.roots:
            raise StorageError(
                "outside_storage_root",
                "no storage roots are configured: set DEEPCOVID_STORAGE_ROOTS to the archive directories",
            )
        if not os.path.isabs(path):
            raise StorageError("outside_storage_root", "local URIs must be absolute paths")
        parts = _components(path)
        for prefix, real in self._spellings:
            if parts[: len(prefix)] == prefix:
                return real, "/".join(parts[len(prefix) :]) or "."
        raise StorageError(
            "outside_storage_root", "the path lies outside the storage roots (DEEPCOVID_STORAGE_ROOTS)"
        )

    def _open_local(self, uri: str) -> tuple[int, os.stat_result]:
        """The file's fd, opened beneath its root with no symlink followed, and its checked fstat."""
        root, relative = self._locate(uri)
        try:
            root_fd = os.open(root, _DIRECTORY_FLAGS)
        except OSError as exc:
            raise _os_error(exc) from exc
        try:
            # O_NONBLOCK: opening a FIFO must not hang the worker (no effect on regular files).
            fd = open_beneath(root_fd, relative, _FILE_FLAGS)
        except OSError as exc:
            raise _os_error(exc) from exc
        finally:
            os.close(root_fd)
        try:
            return fd, self._checked_fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def _checked_fstat(self, fd: int) -> os.stat_result:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise _os_error(exc) from exc
        _check_regular(st, self.max_file_bytes)
        if st.st_nlink > 1 and not self.allow_hard_links:
            raise StorageError(
                "outside_storage_root",
                f"the file has {st.st_nlink} hard links, and a link to a file outside the storage roots "
                "looks the same (DEEPCOVID_ALLOW_HARD_LINKS=true reads them)",
            )
        return st

    def _read_local(self, uri: str) -> bytes:
        fd, _ = self._open_local(uri)
        try:
            return read_open_file(fd, self.max_file_bytes)
        finally:
            os.close(fd)

    # -- S3 ---------------------------------------------------------------------------------

    def _s3_location(self, uri: str) -> tuple[str, str]:
        """``(bucket, key)``, refused before any request unless DEEPCOVID_S3_ALLOW covers it."""
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as exc:
            raise StorageError("not_found", str(exc)) from exc
        if not _allowed(self.s3_allow, bucket, key):
            raise StorageError(
                "outside_storage_root", f"DEEPCOVID_S3_ALLOW does not cover this key of bucket {bucket!r}"
            )
        return bucket, key

    def _read_s3(self, uri: str) -> bytes:
        bucket, key = self._s3_location(uri)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _s3_error(exc) from exc
        body = response["Body"]
        try:
            length = int(response.get("ContentLength") or 0)
            if length > self.max_file_bytes:
                raise StorageError("too_large", _too_large_detail(length, self.max_file_bytes))
            data = body.read(self.max_file_bytes + 1)
        except StorageError:
            raise
        except Exception as exc:
            raise _s3_error(exc) from exc
        finally:
            body.close()
        if len(data) > self.max_file_bytes:
            raise StorageError("too_large", _too_large_detail(len(data), self.max_file_bytes))
        return data


def read_local_file(path: str | Path, max_bytes: int) -> bytes:
    """A whole regular file at ``path``, for callers with no storage roots (``inspect``, training data):
    opened as workers open theirs, so a FIFO or a device is refused at once and the read is bounded."""
    try:
        fd = os.open(path, _FILE_FLAGS)
    except OSError as exc:
        raise _os_error(exc) from exc
    try:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise _os_error(exc) from exc
        _check_regular(st, max_bytes)
        return read_open_file(fd, max_bytes)
    finally:
        os.close(fd)


def read_open_file(fd: int, max_bytes: int) -> bytes:
    """The rest of an open file, refused if it holds more than ``max_bytes`` (it may grow after fstat)."""
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise _os_error(exc) from exc
    if len(data) > max_bytes:
        raise StorageError("too_large", _too_large_detail(len(data), max_bytes))
    return data


def _check_regular(st: os.stat_result, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise StorageError("is_a_directory")
    if not stat.S_ISREG(st.st_mode):
        raise StorageError("unreadable", "not a regular file")
    if st.st_size > max_bytes:
        raise StorageError("too_large", _too_large_detail(st.st_size, max_bytes))


def _too_large_detail(size: int, limit: int) -> str:
    return f"{size} bytes exceeds DEEPCOVID_MAX_FILE_BYTES={limit}"


def _s3_error(exc: Exception) -> Exception:
    """Map a boto3/botocore failure to the image's fault (StorageError) or a retry (TransientError)."""
    from botocore import exceptions as bce

    if isinstance(exc, (StorageError, TransientError)):
        return exc
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _S3_NOT_FOUND or status == 404:
            return StorageError("not_found", f"S3 {code or 'NotFound'}")
        if code in _S3_DENIED or status == 403:
            return StorageError("permission_denied", f"S3 {code or 'AccessDenied'}")
        if code in _S3_TRANSIENT or (isinstance(status, int) and status >= 500):
            return TransientError(f"S3 {code or status} after retries")
        return StorageError("unreadable", f"S3 {code or status}")
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return StorageError("permission_denied", "no S3 credentials: set AWS_* or DEEPCOVID_S3_* variables")
    if isinstance(
        exc,
        bce.ConnectionError
        | bce.HTTPClientError
        | bce.IncompleteReadError
        | bce.ResponseStreamingError
        | ConnectionError
        | TimeoutError,
    ):
        return TransientError(f"S3 unreachable: {type(exc).__name__}")
    return exc


def open_storage(settings: Settings, extra_roots: Iterable[Path | str] = ()) -> Storage:
    """The storage every role reads images through; ``extra_roots`` widen the configured roots."""
    return Storage(settings, extra_roots)
