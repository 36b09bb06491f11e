"""Sessions, CSRF, sign-in rate limiting and the response headers every workbench page carries.

A session is a signed cookie (HttpOnly, SameSite=Strict, Secure behind TLS) holding the account id and a
CSRF token; the account is read from the database on every request, so disabling it ends its sessions.
Every POST must carry the session's token (form field or header) and, when the browser says where it
comes from, come from this site.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from deepcovid import defaults
from deepcovid.private import make_private_file, writable_dir
from deepcovid.settings import Settings

COOKIE = "deepcovid_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
SECRET_FILE = "secret_key"

# No inline script or style at all: every script and style sheet is a file of this package.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it browsers send "Origin: null" with our own forms, which same_site refuses.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def secret_key(settings: Settings) -> str:
    """DEEPCOVID_SECRET_KEY, else the key kept in the data dir (made, 0600, on first use)."""
    if settings.secret_key is not None and settings.secret_key.get_secret_value():
        return settings.secret_key.get_secret_value()
    data_dir = Path(settings.data_dir).expanduser()
    writable_dir(data_dir, what="data dir", elsewhere="set DEEPCOVID_SECRET_KEY or DEEPCOVID_DATA_DIR")
    path = data_dir / SECRET_FILE
    make_private_file(path)
    key = path.read_text().strip()
    if not key:
        key = secrets.token_urlsafe(48)
        path.write_text(key + "\n")
    return key


@dataclass
class Session:
    user_id: int | None
    csrf: str
    fresh: bool = False  # not from a valid cookie: set one


class Sessions:
    """Reads and writes the signed session cookie."""

    def __init__(self, settings: Settings) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key(settings), salt="deepcovid-review-session")
        self.trust_forwarded_proto = settings.trust_forwarded_proto

    def load(self, request: Request) -> Session:
        raw = request.cookies.get(COOKIE)
        if raw:
            try:
                data = self._serializer.loads(raw, max_age=defaults.SESSION_MAX_AGE_S)
                return Session(data.get("u"), str(data["c"]))
            except (BadSignature, KeyError, TypeError, AttributeError):
                pass
        return Session(None, secrets.token_urlsafe(32), fresh=True)

    def save(self, request: Request, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self._serializer.dumps({"u": session.user_id, "c": session.csrf}),
            max_age=defaults.SESSION_MAX_AGE_S,
            httponly=True,
            samesite="strict",
            secure=self.is_tls(request),
            path="/",
        )

    def is_tls(self, request: Request) -> bool:
        if request.url.scheme == "https":
            return True
        forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        return self.trust_forwarded_proto and forwarded == "https"


def new_session(user_id: int | None) -> Session:
    """A fresh session (new CSRF token) on every sign-in and sign-out."""
    return Session(user_id, secrets.token_urlsafe(32), fresh=True)


def same_site(request: Request) -> bool:
    """False when the browser says the request comes from another site (Sec-Fetch-Site, Origin)."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc == host


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and not session.fresh and hmac.compare_digest(session.csrf, token or "")


class LoginLimiter:
    """Failed sign-ins per user name and per client address in a sliding window (this process's memory:
    one ``serve`` process is the deployment; each of several would count on its own)."""

    def __init__(
        self,
        attempts: int = defaults.LOGIN_ATTEMPTS,
        per_address: int = defaults.LOGIN_ATTEMPTS_PER_ADDRESS,
        window_s: float = defaults.LOGIN_WINDOW_S,
    ) -> None:
        self.limits = {"user": attempts, "addr": per_address}
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures[key]
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def blocked(self, name: str, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            keys = {"user": f"user:{name}", "addr": f"addr:{client}"}
            return any(len(self._recent(key, now)) >= self.limits[kind] for kind, key in keys.items())

    def failed(self, name: str, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (f"user:{name}", f"addr:{client}"):
                self._recent(key, now).append(now)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(f"user:{name}", None)
