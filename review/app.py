"""The workbench's FastAPI application: sessions and security headers around every response, sign-in, and
the pages (``review.pages``) and images (``review.media``) behind it.

``create_app`` takes the settings and an opened database, so tests and ``deepcovid serve`` build the same
app; uvicorn serves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine

from deepcovid.settings import Settings
from deepcovid.storage import open_storage
from review import accounts, audit, media, pages
from review.heatmaps import HeatmapSource
from review.security import HEADERS, LoginLimiter, Sessions, new_session
from review.web import NeedsSignIn, Refused, Workbench, checked_form, render, session_of, workbench
from review.worklist import BadQuery

HERE = Path(__file__).parent


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    storage = open_storage(settings)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["urlencode"] = urlencode
    app = FastAPI(title="Deep-COVID review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workbench = Workbench(
        settings=settings,
        engine=engine,
        sessions=Sessions(settings),
        limiter=LoginLimiter(),
        storage=storage,
        heatmaps=HeatmapSource(engine, settings, storage.read),
        templates=templates,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def session_and_headers(request: Request, call_next: Any) -> Response:
        bench: Workbench = request.app.state.workbench
        request.state.session = bench.sessions.load(request)
        response = await call_next(request)
        session = request.state.session
        if session.fresh:
            bench.sessions.save(request, response, session)
        response.headers.update(HEADERS)
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(NeedsSignIn)
    async def _sign_in(request: Request, _exc: NeedsSignIn) -> Response:
        if request.method == "GET" and not request.url.path.startswith("/media/"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
        return PlainTextResponse("sign in first", status_code=401)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> Response:
        return PlainTextResponse(str(exc), status_code=403)

    @app.exception_handler(BadQuery)
    async def _bad_query(request: Request, exc: BadQuery) -> Response:
        return PlainTextResponse(str(exc), status_code=400)

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return render(request, "login.html", next=_local(next), message=None)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await checked_form(request)
        bench = workbench(request)
        name, password, target = form.get("username", ""), form.get("password", ""), _local(form.get("next"))
        client = request.client.host if request.client else "?"
        if bench.limiter.blocked(name, client):
            audit.record_now(bench.engine, None, "sign_in_refused", "user", None, "rate limited")
            return render(request, "login.html", 429, next=target,
                          message="Too many failed sign-ins: wait a few minutes and try again.")  # fmt: skip
        account = accounts.authenticate(bench.engine, name, password)
        if account is None:
            bench.limiter.failed(name, client)
            audit.record_now(bench.engine, None, "sign_in_refused", "user", None, "wrong name or password")
            return render(request, "login.html", 401, next=target, message="Wrong user name or password.")
        bench.limiter.succeeded(name)
        audit.record_now(bench.engine, account.id, "sign_in", "user", account.id)
        request.state.session = new_session(account.id)
        return RedirectResponse(target, status_code=303)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        await checked_form(request)
        user_id = session_of(request).user_id
        if user_id:
            audit.record_now(workbench(request).engine, user_id, "sign_out", "user", user_id)
        request.state.session = new_session(None)
        return RedirectResponse("/login", status_code=303)

    app.include_router(pages.router)
    app.include_router(media.router)
    return app


def _local(target: str | None) -> str:
    """A redirect target on this site only (never ``//elsewhere`` or ``https://...``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
