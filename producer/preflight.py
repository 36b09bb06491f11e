"""Pre-flight checks: everything a scan needs is found before any job is created.

Each check returns what it verified or raises a UserError whose exit code names the problem, so
``enqueue`` and ``screen`` fail in seconds with one line instead of after creating a job.
"""

from __future__ import annotations

import os
import stat as stat_module
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from celery import Celery
from sqlalchemy.engine import Engine

from db.registry import UnknownBundle, active_bundle, get_bundle
from deepcovid.dicomweb import dicomweb_allowed, is_dicomweb
from deepcovid.errors import ImageError, TransientError, UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.settings import Settings, mask_url
from deepcovid.storage import s3_allowed, s3_client
from producer.listing import parse_s3_source

NO_BUNDLE_HELP = (
    "no active bundle is registered. Register and promote one with "
    "`deepcovid bundle register BUNDLE_DIR --promote` (or `deepcovid bundle promote ID`); "
    "make one with `deepcovid train` or `deepcovid bundle init`."
)


def check_local_source(source: str, settings: Settings, extra_roots: Iterable[Path] = ()) -> Path:
    """The absolute, resolved directory (or single file) to list, or a UserError saying why it cannot be
    used. A single file is taken whatever its name, as ``inspect`` takes it."""
    path = Path(source).expanduser()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(ExitCode.MISSING_PATH, f"{source}: no such file or directory") from None
    except (PermissionError, NotADirectoryError) as exc:
        raise UserError(ExitCode.UNREADABLE_PATH, f"{source}: cannot be read ({exc.strerror})") from None
    if stat_module.S_ISDIR(st.st_mode):
        try:
            with os.scandir(path) as it:
                next(it, None)
        except OSError as exc:
            raise UserError(ExitCode.UNREADABLE_PATH, f"{source}: cannot be read ({exc.strerror})") from None
    elif not stat_module.S_ISREG(st.st_mode):
        raise UserError(ExitCode.UNREADABLE_PATH, f"{source}: is neither a directory nor a regular file")
    resolved = path.resolve()
    roots = [Path(r).expanduser().resolve() for r in [*settings.storage_roots, *extra_roots]]
    if not roots:
        raise UserError(
            ExitCode.OUTSIDE_STORAGE_ROOTS,
            "no storage roots are configured, so workers would refuse every file. "
            f"Set DEEPCOVID_STORAGE_ROOTS to a comma-separated list of directories including {resolved}.",
        )
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        listed = ", ".join(str(r) for r in roots)
        raise UserError(
            ExitCode.OUTSIDE_STORAGE_ROOTS,
            f"{resolved} is not under the storage roots ({listed}); workers would refuse its files. "
            "Add it to DEEPCOVID_STORAGE_ROOTS (on the workers too).",
        )
    return resolved


def check_s3_source(source: str, settings: Settings, client: Any = None) -> tuple[str, str]:
    """(bucket, prefix) once the bucket is known to exist and to let these credentials in."""
    try:
        bucket, prefix = parse_s3_source(source)
    except ValueError as exc:
        raise UserError(ExitCode.MISSING_PATH, str(exc)) from None
    if client is None:
        client = s3_client(settings)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket", "NotFound") or status == 404:
            raise UserError(ExitCode.NO_SUCH_BUCKET, f"S3 bucket {bucket!r} does not exist") from None
        if code in ("403", "AccessDenied", "Forbidden") or status == 403:
            raise UserError(
                ExitCode.BUCKET_ACCESS_DENIED,
                f"S3 bucket {bucket!r} denies access with these credentials "
                "(check DEEPCOVID_S3_ACCESS_KEY_ID / DEEPCOVID_S3_SECRET_ACCESS_KEY and the bucket policy)",
            ) from None
        raise UserError(ExitCode.S3_UNREACHABLE, f"S3 bucket {bucket!r}: {code or exc}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise UserError(
            ExitCode.BUCKET_ACCESS_DENIED,
            "no S3 credentials: set DEEPCOVID_S3_ACCESS_KEY_ID / DEEPCOVID_S3_SECRET_ACCESS_KEY or AWS_*",
        ) from None
    except EndpointConnectionError as exc:
        raise UserError(
            ExitCode.S3_UNREACHABLE, f"cannot reach S3 at {exc.kwargs.get('endpoint_url')}"
        ) from None
    except BotoCoreError as exc:
        raise UserError(ExitCode.S3_UNREACHABLE, f"cannot reach S3: {exc}") from None
    if not s3_allowed(settings, bucket, prefix):
        # The prefix is left out of the message: archives are laid out by patient.
        raise UserError(
            ExitCode.OUTSIDE_STORAGE_ROOTS,
            f"this source in S3 bucket {bucket!r} is not covered by DEEPCOVID_S3_ALLOW, so workers would "
            f"refuse every object. Add {bucket!r} (or {bucket!r} with the prefix) to DEEPCOVID_S3_ALLOW, "
            "on the workers too.",
        )
    return bucket, prefix


def check_dicomweb_source(source: str, settings: Settings) -> str:
    """The canonical ``dicomweb://`` source (its filters in a fixed order), once its PACS answers a search
    and DEEPCOVID_DICOMWEB_ALLOW lets workers read from it."""
    from pacs.crawl import Crawler, parse_source

    try:
        query = parse_source(source)
    except ValueError as exc:
        raise UserError(ExitCode.USAGE, f"bad dicomweb:// source: {exc}") from None
    if not dicomweb_allowed(settings, query.location):
        raise UserError(
            ExitCode.OUTSIDE_STORAGE_ROOTS,
            f"DEEPCOVID_DICOMWEB_ALLOW does not list {query.location.root}, so workers would refuse every "
            "instance. Add it (on the workers too).",
        )
    try:
        next(Crawler(settings, query, page_size=1).pages("/studies", {}), None)
    except (ImageError, TransientError) as exc:
        raise UserError(ExitCode.PACS_UNREACHABLE, f"the PACS at {query.location.root}: {exc}") from None
    return query.source


def check_source(source: str, settings: Settings, extra_roots: Iterable[Path] = ()) -> str:
    """The canonical form of ``source`` (an S3 URI as given, a local directory resolved), once usable."""
    if is_dicomweb(source):
        return check_dicomweb_source(source, settings)
    if source.startswith("s3://"):
        check_s3_source(source, settings)
        return source
    return str(check_local_source(source, settings, extra_roots=extra_roots))


def resolve_bundle_id(engine: Engine, bundle_id: str | None) -> str:
    """The given registered bundle id, or the active one."""
    if bundle_id:
        try:
            get_bundle(engine, bundle_id)
        except UnknownBundle:
            raise UserError(
                ExitCode.NO_BUNDLE,
                f"bundle {bundle_id!r} is not registered; "
                "register it with `deepcovid bundle register BUNDLE_DIR`",
            ) from None
        return bundle_id
    record = active_bundle(engine)
    if record is None:
        raise UserError(ExitCode.NO_BUNDLE, NO_BUNDLE_HELP)
    return record.bundle_id


def check_broker(app: Celery, timeout: float = 5.0) -> None:
    """Fail fast (seconds, not Celery's minutes of retries) when the broker is down."""
    url = mask_url(app.conf.broker_url or "")
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5, timeout=timeout)
    except Exception as exc:  # kombu raises library-specific OperationalError subclasses
        raise UserError(ExitCode.BROKER_UNREACHABLE, f"cannot reach the broker {url}: {exc}") from None
