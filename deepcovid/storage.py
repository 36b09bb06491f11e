"""Reading image bytes from the local file system (only under configured roots) or from S3.

Workers are handed URIs by whoever can reach the broker, so every local path is resolved and
checked against the storage roots before it is opened: a URI must not be a way to read
arbitrary files on a worker.
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

from deepcovid.errors import StorageError, TransientError

if TYPE_CHECKING:
    from deepcovid.settings import Settings

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
_READ_BLOCK = 1024 * 1024

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
        return StorageError("unreadable", "too many levels of symbolic links")
    return StorageError("unreadable", f"{type(exc).__name__}: {os.strerror(exc.errno or 0)}")


class Storage:
    """Reads bytes for a URI: an absolute local path under a storage root, or ``s3://bucket/key``."""

    def __init__(self, settings: Settings, extra_roots: Iterable[Path | str] = ()) -> None:
        self.settings = settings
        roots = [*settings.storage_roots, *extra_roots]
        self.roots: tuple[str, ...] = tuple(dict.fromkeys(os.path.realpath(os.fspath(r)) for r in roots))
        self.max_file_bytes = settings.max_file_bytes
        self._client: Any = None
        self._client_pid: int | None = None
        self._client_lock = threading.Lock()

    # -- public -----------------------------------------------------------------------------

    def read(self, uri: str) -> bytes:
        """The object's bytes; raises StorageError (the image's fault) or TransientError (retry)."""
        if uri.startswith(S3_SCHEME):
            return self._read_s3(uri)
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
        path = self.resolve(uri)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _os_error(exc) from exc
        _check_regular(st, self.max_file_bytes)
        return st.st_size

    def resolve(self, uri: str) -> str:
        """The real path of a local URI, refused unless it lies under a storage root."""
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        if not self.roots:
            raise StorageError(
                "outside_storage_root",
                "no storage roots are configured: set DEEPCOVID_STORAGE_ROOTS to the archive directories",
            )
        if not os.path.isabs(path):
            raise StorageError("outside_storage_root", "local URIs must be absolute paths")
        real = os.path.realpath(path)
        for root in self.roots:
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return real
        raise StorageError(
            "outside_storage_root",
            "the path resolves outside the configured storage roots (DEEPCOVID_STORAGE_ROOTS)",
        )

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

    def _read_local(self, uri: str) -> bytes:
        path = self.resolve(uri)
        try:
            _check_regular(os.stat(path), self.max_file_bytes)
        except OSError as exc:
            raise _os_error(exc) from exc
        # O_NONBLOCK: a FIFO swapped in after the check must not hang the worker (no effect on files).
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                # The resolved path became a symlink after the check: refuse rather than follow.
                raise StorageError("outside_storage_root", "the path changed into a symbolic link") from exc
            raise _os_error(exc) from exc
        try:
            _check_regular(os.fstat(fd), self.max_file_bytes)
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(self.max_file_bytes + 1)
        except OSError as exc:
            raise _os_error(exc) from exc
        finally:
            os.close(fd)
        if len(data) > self.max_file_bytes:  # grew while we read it
            raise StorageError("too_large", _too_large_detail(len(data), self.max_file_bytes))
        return data

    # -- S3 ---------------------------------------------------------------------------------

    def _s3_location(self, uri: str) -> tuple[str, str]:
        try:
            return parse_s3_uri(uri)
        except ValueError as exc:
            raise StorageError("not_found", str(exc)) from exc

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
