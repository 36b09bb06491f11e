"""The workbench's pages: jobs, the worklist, the viewer and its verdicts, bundles' reviewed metrics,
accounts (admins), and the labels download (admins: it holds paths)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlencode

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.background import BackgroundTask
from starlette.responses import FileResponse

from db.queries import UnknownJob, list_jobs
from db.tables import images
from deepcovid.errors import REASONS, UserError
from deepcovid.networks import ARCHITECTURES
from deepcovid.results import ENSEMBLE_KEY
from deepcovid.status import ReviewState, Role, Verdict
from review import accounts, audit, outcomes, verdicts, worklist
from review.accounts import Account
from review.progress import job_header
from review.web import Refused, admin, checked_form, render, signed_in, workbench
from review.worklist import DECISIONS, SORTS, Worklist

router = APIRouter()
VERDICT_KEYS = {verdict: str(i) for i, verdict in enumerate(Verdict, start=1)}


def _not_found(request: Request, what: str) -> HTMLResponse:
    return render(request, "message.html", 404, title="Not found", message=f"No such {what}.")


@router.get("/", response_class=HTMLResponse)
def home(request: Request, account: Account = Depends(signed_in)) -> Response:
    bench = workbench(request)
    return render(request, "jobs.html", jobs=list_jobs(bench.engine, 100))


def _worklist_page(request: Request, job_id: int | None) -> Response:
    bench = workbench(request)
    params = dict(request.query_params)
    wl = Worklist.from_params(job_id, params)
    progress = None
    if job_id is not None:
        try:
            progress = job_header(bench.engine, job_id)
        except UnknownJob:
            return _not_found(request, "job")
    found = worklist.page(bench.engine, wl, after=params.get("after"), before=params.get("before"))
    audit.record_now(bench.engine, request.state.account.id, "view_worklist", "job", job_id)
    return render(
        request,
        "worklist.html",
        wl=wl,
        page=found,
        progress=progress,
        sorts={name: label for name, (label, _) in SORTS.items()},
        decisions=list(DECISIONS),
        review_states=list(ReviewState),
        reasons=sorted(REASONS),
        base=f"/jobs/{job_id}" if job_id is not None else "/worklist",
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_worklist(request: Request, job_id: int, account: Account = Depends(signed_in)) -> Response:
    return _worklist_page(request, job_id)


@router.get("/worklist", response_class=HTMLResponse)
def all_worklist(request: Request, account: Account = Depends(signed_in)) -> Response:
    return _worklist_page(request, None)


def _scope(request: Request, job_id: int) -> Worklist:
    params = dict(request.query_params)
    return Worklist.from_params(None if params.get("all") else job_id, params)


@router.get("/jobs/{job_id}/images/{image_id}", response_class=HTMLResponse)
def viewer(request: Request, job_id: int, image_id: int, account: Account = Depends(signed_in)) -> Response:
    bench = workbench(request)
    wl = _scope(request, job_id)
    row = worklist.find(bench.engine, wl, job_id, image_id)
    if row is None:
        return _not_found(request, "image in this job")
    audit.record_now(bench.engine, account.id, "view_image", "image", image_id)
    previous, following = (worklist.neighbour(bench.engine, wl, row, step) for step in (-1, 1))
    reviews = verdicts.reviews_of(bench.engine, image_id)
    mine = next((r for r in reviews if r.reviewer == account.name and not r.adjudication), None)
    layers = [ENSEMBLE_KEY, *(a for a in ARCHITECTURES if row.probabilities.get(a) is not None)]
    location = _location(request, image_id) if account.is_admin else None
    return render(
        request,
        "viewer.html",
        wl=wl,
        row=row,
        previous=previous,
        following=following,
        reviews=reviews,
        mine=mine,
        layers=layers,
        verdict_keys=VERDICT_KEYS,
        location=location,
        query=wl.params(),
    )


def _location(request: Request, image_id: int) -> str:
    """Where the image lies, relative to its storage root (admins only; never the absolute path)."""
    bench = workbench(request)
    with bench.engine.connect() as conn:
        uri = conn.execute(sa.select(images.c.uri).where(images.c.id == image_id)).scalar_one()
    if uri.startswith("s3://"):
        return uri.removeprefix("s3://").split("/", 1)[-1]
    path = os.path.abspath(uri.removeprefix("file://"))
    for root in bench.settings.storage_roots:
        root_path = os.path.abspath(os.fspath(root))
        if path.startswith(root_path.rstrip("/") + "/"):
            return os.path.relpath(path, root_path)
    return "(outside the storage roots)"


@router.post("/jobs/{job_id}/images/{image_id}/review")
async def review(request: Request, job_id: int, image_id: int, account: Account = Depends(signed_in)
                 ) -> Response:  # fmt: skip
    form = await checked_form(request)
    bench = workbench(request)
    wl = _scope(request, job_id)
    row = worklist.find(bench.engine, wl, job_id, image_id)
    if row is None or row.bundle_id is None:
        return _not_found(request, "scored image in this job")
    try:
        verdict = Verdict(form.get("verdict", ""))
    except ValueError:
        raise Refused("unknown verdict") from None
    adjudicate = form.get("adjudicate") == "1"
    try:
        verdicts.record_verdict(bench.engine, account, image_id, row.bundle_id, verdict, form.get("note"),
                                adjudicate=adjudicate)  # fmt: skip
    except verdicts.NotAllowed as exc:
        raise Refused(str(exc)) from None
    following = None if adjudicate else worklist.neighbour(bench.engine, wl, row, 1)
    target = following or row
    query = urlencode({**wl.params(), "saved": str(image_id)})
    return RedirectResponse(f"/jobs/{target.job_id}/images/{target.image_id}?{query}", status_code=303)


@router.get("/bundles", response_class=HTMLResponse)
def bundles(request: Request, account: Account = Depends(signed_in)) -> Response:
    return render(request, "bundles.html", metrics=outcomes.reviewed_metrics(workbench(request).engine))


@router.get("/labels.csv")
def labels(request: Request, job: int | None = None, account: Account = Depends(admin)) -> Response:
    bench = workbench(request)
    folder = Path(tempfile.mkdtemp(prefix="deepcovid-labels-"))
    out = folder / "labels.csv"
    outcomes.export_labels(bench.engine, out, job_id=job)

    def cleanup() -> None:
        out.unlink(missing_ok=True)
        folder.rmdir()

    name = f"labels-job{job}.csv" if job is not None else "labels.csv"
    return FileResponse(out, media_type="text/csv", filename=name, background=BackgroundTask(cleanup))


@router.get("/admin/users", response_class=HTMLResponse)
def users_page(request: Request, account: Account = Depends(admin)) -> Response:
    return render(request, "users.html", users=accounts.list_users(workbench(request).engine),
                  roles=list(Role), message=None)  # fmt: skip


@router.post("/admin/users")
async def add_user(request: Request, account: Account = Depends(admin)) -> Response:
    form = await checked_form(request)
    bench = workbench(request)
    message = None
    try:
        role = Role(form.get("role", "reviewer"))
        accounts.add_user(bench.engine, form.get("username", ""), form.get("password", ""), role)
    except (UserError, ValueError) as exc:
        message = getattr(exc, "message", str(exc))
    if message:
        return render(request, "users.html", 400, users=accounts.list_users(bench.engine), roles=list(Role),
                      message=message)  # fmt: skip
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/admin/users/{name}/disable")
async def disable_user(request: Request, name: str, account: Account = Depends(admin)) -> Response:
    await checked_form(request)
    try:
        accounts.disable_user(workbench(request).engine, name)
    except UserError:
        return _not_found(request, "user")
    return RedirectResponse("/admin/users", status_code=303)
