"""What every workbench request handler shares: the app's parts, the signed-in account, checked forms and
rendered templates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine

from deepcovid.settings import Settings
from deepcovid.status import VERDICT_LABELS
from deepcovid.storage import Storage
from review import accounts
from review.accounts import Account
from review.heatmaps import HeatmapSource
from review.security import CSRF_FIELD, CSRF_HEADER, LoginLimiter, Session, Sessions, csrf_ok, same_site


class NeedsSignIn(Exception):
    """No valid session, or its account is disabled."""


class Refused(Exception):
    """A request this account or this origin may not make (403)."""


@dataclass
class Workbench:
    """What every request handler needs, built once per app."""

    settings: Settings
    engine: Engine
    sessions: Sessions
    limiter: LoginLimiter
    storage: Storage
    heatmaps: HeatmapSource
    templates: Jinja2Templates


def workbench(request: Request) -> Workbench:
    return request.app.state.workbench


def session_of(request: Request) -> Session:
    return request.state.session


def signed_in(request: Request) -> Account:
    """The request's account; raises NeedsSignIn (a page redirects to /login, an image gets 401)."""
    session = session_of(request)
    account = accounts.get_account(workbench(request).engine, session.user_id) if session.user_id else None
    if account is None or account.disabled:
        raise NeedsSignIn()
    request.state.account = account
    return account


def admin(request: Request) -> Account:
    account = signed_in(request)
    if not account.is_admin:
        raise Refused("admins only")
    return account


async def checked_form(request: Request) -> dict[str, str]:
    """The POST's form, once it came from this site with the session's CSRF token; else Refused."""
    if not same_site(request):
        raise Refused("cross-site request refused")
    form = await request.form()
    token = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not csrf_ok(session_of(request), token if isinstance(token, str) else None):
        raise Refused("missing or wrong CSRF token: reload the page and try again")
    return {k: v for k, v in form.items() if isinstance(v, str)}


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    bench = workbench(request)
    context.update(
        account=getattr(request.state, "account", None),
        csrf=session_of(request).csrf,
        verdict_labels=VERDICT_LABELS,
    )
    return bench.templates.TemplateResponse(request, template, context, status_code=status_code)
