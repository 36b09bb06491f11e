"""The artifact store: files the screener makes about images (Grad-CAM maps), shared by every worker.

A directory (``<data_dir>/artifacts`` by default) or an S3 bucket/prefix (``DEEPCOVID_ARTIFACTS=
s3://bucket/prefix``). Keys are opaque: a hash of what an artifact is about, so no name carries a path or
patient data, and the same (image, bundle) always gets the same key: a redelivered chunk overwrites its
own artifact instead of adding one. A write is whole or absent (a temporary file renamed into place; one
PUT on S3). The store is never beneath a storage root or an allowed S3 prefix: the archive is read-only.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.settings import Settings
from deepcovid.storage import S3_SCHEME, parse_s3_allow, s3_client

KEY_SCHEME = "deepcovid-artifact-v1"
"""Hashed into every key, so a future layout gets new keys rather than reading old files wrongly."""


class ArtifactError(Exception):
    """An artifact could not be written or read; the message names no key, path or URI."""


def artifact_key(kind: str, subject: str, bundle_id: str, suffix: str) -> str:
    """The opaque key of ``kind`` (e.g. ``heatmaps``) for ``subject`` (an image URI) under a bundle.

    Two hex characters fan the keys out over 256 directories.
    """
    digest = hashlib.sha256("\0".join((KEY_SCHEME, kind, bundle_id, subject)).encode()).hexdigest()
    return f"{kind}/{digest[:2]}/{digest}{suffix}"


class ArtifactStore(Protocol):
    """Where artifacts are written and read by key."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def describe(self) -> str: ...


class LocalArtifacts:
    """Artifacts as files beneath ``root``, written to a temporary file and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts):
            raise ArtifactError("not an artifact key")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise ArtifactError(
                f"the artifact store refused the write: {os.strerror(exc.errno or 0)}"
            ) from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise ArtifactError(f"the artifact cannot be read: {os.strerror(exc.errno or 0)}") from None

    def describe(self) -> str:
        return str(self.root)


class S3Artifacts:
    """Artifacts as objects under ``s3://bucket/prefix``, each written with one PUT."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            raise ArtifactError(f"the artifact store refused the write: {_s3_code(exc)}") from None

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            raise ArtifactError(f"the artifact cannot be read: {_s3_code(exc)}") from None

    def describe(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")


def _s3_code(exc: Exception) -> str:
    """The S3 error code (NoSuchBucket, AccessDenied) or the exception type: never the message, which
    quotes the bucket and key."""
    response = getattr(exc, "response", None)
    code = (response or {}).get("Error", {}).get("Code") if isinstance(response, dict) else None
    return str(code) if code else type(exc).__name__


def open_artifacts(
    settings: Settings, extra_roots: Iterable[Path | str] = (), client: Any = None
) -> ArtifactStore:
    """The configured store; raises UserError when it lies beneath a storage root (``extra_roots``
    too: the source ``screen`` reads) or an allowed S3 prefix.

    Nothing is written or checked for reachability here: a store that fails later fails only the maps.
    """
    location = settings.effective_artifacts
    if location.startswith(S3_SCHEME):
        bucket, _, prefix = location[len(S3_SCHEME) :].partition("/")
        if not bucket:
            raise UserError(ExitCode.BAD_SETTING, "DEEPCOVID_ARTIFACTS=s3://... needs a bucket")
        for allowed_bucket, allowed_prefix in parse_s3_allow(settings.s3_allow):
            if bucket == allowed_bucket and _overlaps(prefix.strip("/"), allowed_prefix):
                raise UserError(
                    ExitCode.BAD_SETTING,
                    f"DEEPCOVID_ARTIFACTS={location} overlaps DEEPCOVID_S3_ALLOW entry "
                    f"{allowed_bucket}/{allowed_prefix}: the archive is never written to; "
                    "use another bucket or prefix",
                )
        return S3Artifacts(client or s3_client(settings), bucket, prefix)
    root = Path(location).expanduser().absolute()
    for storage_root in (*settings.storage_roots, *extra_roots):
        if _beneath(root, Path(storage_root).expanduser().absolute()):
            raise UserError(
                ExitCode.BAD_SETTING,
                f"the artifact store {root} overlaps storage root {storage_root}: the archive is never "
                "written to; set DEEPCOVID_ARTIFACTS to a directory outside DEEPCOVID_STORAGE_ROOTS",
            )
    return LocalArtifacts(root)


class RefusedArtifacts:
    """Stands in for a store ``open_artifacts`` refused, in a process that cannot stop (a worker started
    without ``deepcovid worker``'s check): every map fails with ``reason``, every score stands."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def put(self, key: str, data: bytes) -> None:
        raise ArtifactError(self.reason)

    def get(self, key: str) -> bytes:
        raise ArtifactError(self.reason)

    def describe(self) -> str:
        return "(refused)"


def _overlaps(prefix: str, other: str) -> bool:
    """Whether two S3 prefixes (folders; empty is the whole bucket) share any key."""
    a, b = prefix.rstrip("/"), other.rstrip("/")
    return not a or not b or a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _beneath(path: Path, root: Path) -> bool:
    """Whether the store would sit at or beneath the root (symlinks resolved where they exist)."""
    return path.resolve().is_relative_to(root.resolve())
