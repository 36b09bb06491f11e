"""Images for the viewer, rendered on the server from their source through the storage layer (its roots
and allowlists apply), and the heatmap layers laid over them. Never cached by the browser."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, Response

from db.tables import images, job_images
from deepcovid.errors import ImageError
from deepcovid.overlay import display_size
from review import rendering
from review.accounts import Account
from review.heatmaps import HeatmapUnavailable, heat_png
from review.web import signed_in, workbench

router = APIRouter()
PNG = "image/png"


def _uri(request: Request, job_id: int, image_id: int) -> str | None:
    """The URI of an image of this job: looked up here, never taken from the request."""
    with workbench(request).engine.connect() as conn:
        return conn.execute(
            sa.select(images.c.uri)
            .select_from(images.join(job_images, job_images.c.image_id == images.c.id))
            .where(job_images.c.job_id == job_id, images.c.id == image_id)
        ).scalar()


def _window(wc: float | None, ww: float | None) -> rendering.Window | None:
    return rendering.Window(wc, ww) if wc is not None and ww is not None and ww > 0 else None


def _render(request: Request, uri: str, window: rendering.Window | None) -> rendering.Rendered:
    bench = workbench(request)
    return rendering.render(bench.storage.read(uri), window=window)


@router.get("/media/{job_id}/{image_id}/image.png")
async def image(
    request: Request,
    job_id: int,
    image_id: int,
    wc: float | None = None,
    ww: float | None = None,
    account: Account = Depends(signed_in),
) -> Response:
    uri = _uri(request, job_id, image_id)
    if uri is None:
        return PlainTextResponse("no such image", status_code=404)
    try:
        drawn = await run_in_threadpool(_render, request, uri, _window(wc, ww))
    except ImageError as exc:  # the reason only: a detail could quote the path
        return PlainTextResponse(f"cannot show this image: {exc.reason}", status_code=422)
    headers = {}
    if drawn.window is not None:
        headers["X-Window"] = f"{drawn.window.center:g} {drawn.window.width:g}"
    return Response(drawn.png, media_type=PNG, headers=headers)


@router.get("/media/{job_id}/{image_id}/heat/{bundle_id}/{layer}.png")
async def heat(request: Request, job_id: int, image_id: int, bundle_id: str, layer: str,
               account: Account = Depends(signed_in)) -> Response:  # fmt: skip
    uri = _uri(request, job_id, image_id)
    if uri is None:
        return PlainTextResponse("no such image", status_code=404)
    bench = workbench(request)

    def draw() -> bytes:
        maps = bench.heatmaps.maps(image_id, bundle_id, uri)
        # The size image.png draws the same image at.
        return heat_png(maps, layer, display_size(maps.geometry.width, maps.geometry.height))

    try:
        png = await run_in_threadpool(draw)
    except HeatmapUnavailable as exc:
        return PlainTextResponse(f"no heatmap: {exc}", status_code=404)
    except ImageError as exc:
        return PlainTextResponse(f"no heatmap: {exc.reason}", status_code=422)
    except KeyError:
        return PlainTextResponse("no such layer", status_code=404)
    return Response(png, media_type=PNG)
