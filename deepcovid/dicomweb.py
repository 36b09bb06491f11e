"""Reading DICOM instances from a PACS by WADO-RS: the ``dicomweb://`` storage backend workers use.

An instance URI carries the PACS's service root and the three UIDs, nothing else
(``dicomweb://host:port/dicom-web/studies/<uid>/series/<uid>/instances/<uid>``; ``dicomwebs://`` is
HTTPS), so it names an image without naming its patient. A clinical PACS serves radiologists first: each
worker process keeps one connection pool per PACS, with at most DEEPCOVID_DICOMWEB_MAX_CONNECTIONS
requests in flight to it; 429 (honouring Retry-After), 5xx and timeouts are retried with backoff, then
left to the chunk's own retry as a ``TransientError``.
"""

from __future__ import annotations

import email.utils
import json
import os
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import urllib3

from deepcovid import defaults
from deepcovid.errors import StorageError, TransientError

if TYPE_CHECKING:
    from deepcovid.settings import Settings

SCHEMES = {"dicomweb://": "http://", "dicomwebs://": "https://"}
# What WADO-RS is asked for: the instance as stored, whatever its transfer syntax (pydicom decodes them).
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_dicomweb(uri: str) -> bool:
    return uri.startswith(tuple(SCHEMES))


@dataclass(frozen=True)
class Location:
    """A ``dicomweb://`` URI taken apart: the service root and, for an instance, its UIDs."""

    scheme: str  # dicomweb:// or dicomwebs://
    host: str  # host:port
    path: str  # the service root's path, no trailing slash ("/dicom-web")
    study: str = ""
    series: str = ""
    instance: str = ""

    @property
    def root(self) -> str:
        """The service root as a ``dicomweb://`` URI (what DEEPCOVID_DICOMWEB_ALLOW lists)."""
        return f"{self.scheme}{self.host}{self.path}"

    @property
    def http_root(self) -> str:
        """The service root as an http(s) URL."""
        return f"{SCHEMES[self.scheme]}{self.host}{self.path}"

    @property
    def instance_path(self) -> str:
        return f"/studies/{self.study}/series/{self.series}/instances/{self.instance}"


def instance_uri(root: str, study: str, series: str, instance: str) -> str:
    """The URI of one instance under a ``dicomweb://`` service root."""
    return f"{root.rstrip('/')}/studies/{study}/series/{series}/instances/{instance}"


def parse_dicomweb(uri: str) -> Location:
    """Split ``dicomweb[s]://host:port/path[/studies/S/series/S/instances/I]``; ValueError otherwise."""
    scheme = next((s for s in SCHEMES if uri.startswith(s)), None)
    if scheme is None:
        raise ValueError("not a dicomweb:// URI")
    host, slash, path = uri[len(scheme) :].partition("/")
    if not host or any(c in host for c in "@?#"):
        raise ValueError("a dicomweb:// URI needs a host (host:port), without credentials")
    path = "/" + path if slash else ""
    if any(c in path for c in "?#") or {".", ".."} & set(path.split("/")):
        raise ValueError("a dicomweb:// URI has a plain path: no query, fragment or dot segments")
    head, sep, uids = path.partition("/studies/")
    if not sep:
        return Location(scheme, host, path.rstrip("/"))
    parts = uids.split("/")
    if len(parts) != 5 or parts[1] != "series" or parts[3] != "instances" or not all(parts[::2]):
        raise ValueError("a dicomweb:// instance URI ends in /studies/<uid>/series/<uid>/instances/<uid>")
    return Location(scheme, host, head.rstrip("/"), parts[0], parts[2], parts[4])


def dicomweb_allowed(settings: Settings, location: Location) -> bool:
    """Whether DEEPCOVID_DICOMWEB_ALLOW lists the service root ``location`` lies under."""
    for entry in settings.dicomweb_allow:
        try:
            allowed = parse_dicomweb(entry.strip())
        except ValueError:
            continue
        if (allowed.scheme, allowed.host) == (location.scheme, location.host) and (
            location.path == allowed.path or location.path.startswith(allowed.path + "/")
        ):
            return True
    return False


@dataclass(frozen=True)
class Response:
    """What a PACS answered: status, headers (case-insensitive) and the whole body."""

    status_code: int
    headers: Any
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content) if self.content else None


def http_pool(settings: Settings, location: Location) -> urllib3.HTTPConnectionPool:
    """A connection pool to one PACS with the credentials and TLS material from settings; it holds at
    most DEEPCOVID_DICOMWEB_MAX_CONNECTIONS connections and makes a further request wait for one.

    urllib3 rather than httpx or requests: a third of their CPU per WADO-RS instance (1.7 against 5-6 ms
    for 2 MB on loopback), CPU the decode threads need."""
    headers: dict[str, str] = {}
    if settings.dicomweb_token is not None and settings.dicomweb_token.get_secret_value():
        headers["Authorization"] = f"Bearer {settings.dicomweb_token.get_secret_value()}"
    elif settings.dicomweb_username:
        password = settings.dicomweb_password.get_secret_value() if settings.dicomweb_password else ""
        headers.update(urllib3.make_headers(basic_auth=f"{settings.dicomweb_username}:{password}"))
    host, _, port = location.host.rpartition(":") if ":" in location.host else (location.host, "", "")
    https = location.scheme == "dicomwebs://"
    kwargs: dict[str, Any] = {
        "host": host.strip("[]"),
        "port": int(port) if port else (443 if https else 80),
        "maxsize": settings.dicomweb_max_connections,
        "block": True,
        "headers": headers,
        "timeout": urllib3.Timeout(connect=settings.dicomweb_timeout, read=settings.dicomweb_timeout),
        "retries": False,
    }
    if not https:
        return urllib3.HTTPConnectionPool(**kwargs)
    context = ssl.create_default_context(
        cafile=str(settings.dicomweb_ca_bundle) if settings.dicomweb_ca_bundle else None
    )
    if settings.dicomweb_client_cert:
        key = settings.dicomweb_client_key
        context.load_cert_chain(str(settings.dicomweb_client_cert), str(key) if key else None)
    return urllib3.HTTPSConnectionPool(**kwargs, ssl_context=context)


def retry_after(response: Response, default: float) -> float:
    """Seconds a 429/503 asks to wait (Retry-After: seconds or an HTTP date), else ``default``."""
    value = (response.headers.get("Retry-After") or "").strip()
    if not value:
        return default
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class DicomWebReader:
    """WADO-RS instance reads for one worker process: a client and a connection bound per PACS."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._pools: dict[str, urllib3.HTTPConnectionPool] = {}

    def _pool(self, location: Location) -> urllib3.HTTPConnectionPool:
        """This process's connection pool to the PACS (created after any fork)."""
        key = location.scheme + location.host
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._pools = os.getpid(), {}
            if key not in self._pools:
                self._pools[key] = http_pool(self.settings, location)
            return self._pools[key]

    def locate(self, uri: str) -> Location:
        """The instance's location, refused before any request unless DEEPCOVID_DICOMWEB_ALLOW covers it."""
        try:
            location = parse_dicomweb(uri)
        except ValueError as exc:
            raise StorageError("not_found", str(exc)) from exc
        if not location.instance:
            raise StorageError("not_found", "a dicomweb:// URI must name an instance to be read")
        if not dicomweb_allowed(self.settings, location):
            raise StorageError(
                "outside_storage_root", "DEEPCOVID_DICOMWEB_ALLOW does not list this PACS service root"
            )
        return location

    def read(self, uri: str, max_bytes: int) -> bytes:
        """The instance's DICOM Part 10 bytes; StorageError for this image, TransientError to retry."""
        location = self.locate(uri)
        response = self.request(location, "GET", location.instance_path, headers={"Accept": WADO_ACCEPT})
        length = int(response.headers.get("Content-Length") or 0)
        if length > max_bytes + 64 * 1024:
            raise StorageError("too_large", f"{length} bytes exceeds DEEPCOVID_MAX_FILE_BYTES={max_bytes}")
        data = first_part(response.headers.get("Content-Type", ""), response.content)
        if len(data) > max_bytes:
            raise StorageError("too_large", f"{len(data)} bytes exceeds DEEPCOVID_MAX_FILE_BYTES={max_bytes}")
        return data

    def request(
        self,
        location: Location,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> Response:
        """One request to the PACS, retried on 429/5xx/timeouts; messages never quote the URL."""
        pool = self._pool(location)
        url = location.path + path + (f"?{urlencode(params)}" if params else "")
        delay = defaults.DICOMWEB_BACKOFF_S
        attempts = self.settings.dicomweb_max_attempts
        why = ""
        for attempt in range(attempts):
            wait = delay
            try:
                # The pool blocks while all its connections are busy: the bound on requests in flight.
                raw = pool.urlopen(method, url, body=content, headers={**pool.headers, **(headers or {})})
            except urllib3.exceptions.NewConnectionError:
                why = "unreachable (connection refused)"
            except urllib3.exceptions.TimeoutError:
                why = "timed out"
            except urllib3.exceptions.HTTPError as exc:
                why = f"unreachable ({type(exc).__name__})"
            else:
                response = Response(raw.status, raw.headers, raw.data)
                if response.status_code < 300:
                    return response
                if response.status_code not in _TRANSIENT_STATUS:
                    raise status_error(response.status_code)
                why = f"answered {response.status_code}"
                wait = retry_after(response, delay)
            if attempt + 1 < attempts:
                time.sleep(min(wait, defaults.DICOMWEB_BACKOFF_MAX_S))
                delay *= 2
        raise TransientError(f"PACS {why} after {attempts} attempts")


def status_error(status: int) -> StorageError:
    """The image's own failure for a final HTTP status from the PACS."""
    if status == 404 or status == 410:
        return StorageError("not_found", f"the PACS answered {status}")
    if status in (401, 403):
        return StorageError(
            "permission_denied",
            f"the PACS answered {status}: check DEEPCOVID_DICOMWEB_USERNAME/PASSWORD/TOKEN",
        )
    return StorageError("unreadable", f"the PACS answered {status}")


def first_part(content_type: str, body: bytes) -> bytes:
    """The body of a multipart/related answer's first part (WADO-RS), or ``body`` if not multipart."""
    if not content_type.lower().startswith("multipart/"):
        return body
    boundary = ""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise StorageError("unreadable", "the PACS sent a multipart answer without a boundary")
    delimiter = b"--" + boundary.encode()
    start = body.find(delimiter)
    if start < 0:
        raise StorageError("unreadable", "the PACS sent an empty multipart answer")
    headers_end = body.find(b"\r\n\r\n", start)
    if headers_end < 0:
        raise StorageError("truncated", "the PACS answer ends inside a part's headers")
    content = headers_end + 4
    end = body.find(b"\r\n" + delimiter, content)
    if end < 0:
        raise StorageError("truncated", "the PACS answer ends inside the instance")
    return body[content:end]
