"""The workbench over HTTP (FastAPI's test client, the real app and database): sign-in, the worklist,
the viewer, verdicts, adjudication, audit, and the safety rules (CSRF, origin, headers, no paths)."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image

from db.models import AuditEntry, Review
from tests.fixtures.images import PATIENT_ID, PATIENT_NAME
from tests.review.conftest import PASSWORD, csrf_of, sign_in

FIRST_LINK = re.compile(r'<td><a href="(/jobs/\d+/images/(\d+)[^"]*)">')


def _viewer_url(html: str) -> str:
    return FIRST_LINK.search(html).group(1).replace("&amp;", "&")


def test_every_page_but_sign_in_needs_a_session(make_client: Any, seeded: Any) -> None:
    client = make_client()
    page = client.get(f"/jobs/{seeded.job_id}")
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    assert client.get(f"/media/{seeded.job_id}/{seeded.ids['a.png']}/image.png").status_code == 401
    login = client.get("/login")
    assert login.status_code == 200
    for label in ('<label for="username">Username</label>', '<label for="password">Password</label>',
                  '<button type="submit">Sign in</button>'):  # fmt: skip
        assert label in login.text


def test_sign_in_needs_the_csrf_token_and_is_rate_limited(make_client: Any) -> None:
    client = make_client()
    client.get("/login")
    refused = client.post("/login", data={"username": "rex", "password": PASSWORD})
    assert refused.status_code == 403
    token = csrf_of(client.get("/login").text)
    for _ in range(5):
        wrong = client.post("/login", data={"username": "rex", "password": "nope-nope", "csrf": token})
        assert wrong.status_code == 401
    blocked = client.post("/login", data={"username": "rex", "password": PASSWORD, "csrf": token})
    assert blocked.status_code == 429 and "Too many" in blocked.text
    sign_in(make_client(), "bea")  # from the same address: a team behind one proxy shares it


def test_cross_site_posts_are_refused(make_client: Any, seeded: Any) -> None:
    client = make_client("rex")
    token = csrf_of(client.get(f"/jobs/{seeded.job_id}").text)
    image = seeded.ids["a.png"]
    url = f"/jobs/{seeded.job_id}/images/{image}/review"
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        response = client.post(url, data={"verdict": "covid", "csrf": token}, headers=headers)
        assert response.status_code == 403
    assert client.post(url, data={"verdict": "covid"}).status_code == 403  # no token
    assert client.post(url, data={"verdict": "covid", "csrf": "forged"}).status_code == 403
    with seeded.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(Review.__table__)).scalar() == 0


def test_worklist_shows_flagged_first_with_progress_and_sorts(make_client: Any, seeded: Any) -> None:
    client = make_client("rex")
    page = client.get(f"/jobs/{seeded.job_id}")
    assert page.status_code == 200
    assert (
        "scored <b>7</b>" in page.text and "failed <b>1</b>" in page.text and "queued <b>0</b>" in page.text
    )
    order = [int(m.group(2)) for m in FIRST_LINK.finditer(page.text)]
    names = {v: k for k, v in seeded.ids.items()}
    assert [names[i] for i in order][:4] == ["a.png", "b.png", "chest.dcm", "c.png"]
    by_sort = {}
    for sort in ("score", "disagreement", "uncertain", "date"):
        html = client.get(f"/jobs/{seeded.job_id}?sort={sort}").text
        by_sort[sort] = [names[int(m.group(2))] for m in FIRST_LINK.finditer(html)]
    assert by_sort["disagreement"][0] == "b.png"
    assert by_sort["uncertain"][0] == "d.png"  # 0.49, closest to 0.5
    assert by_sort["date"][0] == "chest.dcm"  # the only one with a study date
    failed = client.get(f"/jobs/{seeded.job_id}?decision=failed&reason=corrupt").text
    assert [names[int(m.group(2))] for m in FIRST_LINK.finditer(failed)] == ["broken.png"]
    assert client.get(f"/jobs/{seeded.job_id}?sort=nonsense").status_code == 400
    everything = client.get("/worklist").text
    assert len(FIRST_LINK.findall(everything)) == 8
    for path in (str(seeded.archive), "a.png"):
        assert path not in page.text


def test_viewer_shows_the_scores_and_sends_safe_headers(make_client: Any, seeded: Any) -> None:
    client = make_client("rex")
    url = _viewer_url(client.get(f"/jobs/{seeded.job_id}").text)
    page = client.get(url)
    assert page.status_code == 200
    for text in (
        "0.950",
        "Threshold",
        "0.5",
        "resnet18",
        "densenet121",
        "Disagreement",
        seeded.bundle_id[:16],
    ):
        assert text in page.text
    for label in ("COVID-19", "Not COVID-19", "Indeterminate", "Not a chest X-ray"):
        assert f">{label}</button>" in page.text
    assert 'id="next"' in page.text and 'id="prev"' not in page.text
    headers = page.headers
    assert (
        "script-src 'self'" in headers["content-security-policy"]
        and "unsafe-inline" not in headers["content-security-policy"]
    )
    assert headers["x-frame-options"] == "DENY"
    assert "<script>" not in page.text and " on" + "click=" not in page.text and "style=" not in page.text
    assert "File:" not in page.text  # paths: admins only
    image = client.get(f"/media/{seeded.job_id}/{seeded.ids['a.png']}/image.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.headers["cache-control"] == "no-store"
    assert Image.open(io.BytesIO(image.content)).size == (320, 256)


def test_admins_see_paths_relative_to_the_storage_root(make_client: Any, seeded: Any) -> None:
    page = make_client("ada").get(f"/jobs/{seeded.job_id}/images/{seeded.ids['chest.dcm']}")
    assert "File: <code>chest.dcm</code>" in page.text
    assert str(seeded.archive) not in page.text
    assert "PA" in page.text and "20260315" in page.text  # view position, study date
    assert PATIENT_NAME not in page.text and PATIENT_ID not in page.text and "Doe" not in page.text


def test_dicom_window_level_renders_through_the_chosen_window(make_client: Any, seeded: Any) -> None:
    client = make_client("rex")
    base = f"/media/{seeded.job_id}/{seeded.ids['chest.dcm']}/image.png"
    own = client.get(base)
    assert own.status_code == 200 and own.headers["x-window"] == "2000 3000"
    narrow = client.get(base + "?wc=500&ww=200")
    assert narrow.headers["x-window"] == "500 200"
    assert own.content != narrow.content
    assert client.get(f"/media/{seeded.job_id}/{seeded.ids['broken.png']}/image.png").status_code == 422


def test_heatmap_layers_for_the_ensemble_and_each_network(make_client: Any, seeded: Any) -> None:
    client = make_client("rex")
    base = f"/media/{seeded.job_id}/{seeded.ids['a.png']}/heat/{seeded.bundle_id}"
    for layer in ("ensemble", "resnet18", "squeezenet1_1"):
        response = client.get(f"{base}/{layer}.png")
        assert response.status_code == 200, response.text
        heat = Image.open(io.BytesIO(response.content))
        assert heat.mode == "RGBA" and heat.size == (320, 256)
        assert response.headers["cache-control"] == "no-store"
    assert client.get(f"{base}/densenet121.png").status_code == 404  # not in this bundle
    missing = client.get(f"/media/{seeded.job_id}/{seeded.ids['a.png']}/heat/{'0' * 64}/ensemble.png")
    assert missing.status_code == 404 and str(seeded.archive) not in missing.text


def test_verdicts_disputes_adjudication_and_audit(make_client: Any, seeded: Any) -> None:
    rex, bea, ada = make_client("rex"), make_client("bea"), make_client("ada")
    image = seeded.ids["a.png"]
    url = f"/jobs/{seeded.job_id}/images/{image}"
    token = csrf_of(rex.get(url).text)
    saved = rex.post(url + "/review", data={"verdict": "covid", "note": "bilateral GGO", "csrf": token})
    assert saved.status_code == 303
    assert saved.headers["location"].startswith(f"/jobs/{seeded.job_id}/images/{seeded.ids['b.png']}?")
    page = rex.get(url).text
    assert "yours: COVID-19" in page and "bilateral GGO" in page
    bea.post(url + "/review", data={"verdict": "not_covid", "csrf": csrf_of(bea.get(url).text)})
    assert "disputed" in rex.get(f"/jobs/{seeded.job_id}?review=disputed").text
    refused = rex.post(url + "/review", data={"verdict": "covid", "adjudicate": "1", "csrf": token})
    assert refused.status_code == 403
    page = ada.get(url).text
    assert "Adjudicate" in page
    done = ada.post(url + "/review", data={"verdict": "covid", "adjudicate": "1", "csrf": csrf_of(page)})
    assert done.status_code == 303
    reviewed = ada.get(f"/jobs/{seeded.job_id}?review=reviewed").text
    assert f"/images/{image}?" in reviewed and "reviewed: COVID-19" in reviewed
    unreviewed = ada.get(f"/jobs/{seeded.job_id}?review=unreviewed").text
    assert f"/images/{image}?" not in unreviewed
    with seeded.engine.connect() as conn:
        entries = conn.execute(sa.select(AuditEntry.__table__)).all()
    actions = [e.action for e in entries]
    assert actions.count("review") == 2 and actions.count("adjudicate") == 1 and "view_image" in actions
    assert "sign_in" in actions
    for entry in entries:
        assert str(seeded.archive) not in (entry.detail or "") and ".png" not in (entry.detail or "")


def test_a_disabled_account_loses_its_session(make_client: Any, seeded: Any) -> None:
    from review.accounts import disable_user

    client = make_client("bea")
    assert client.get("/").status_code == 200
    disable_user(seeded.engine, "bea")
    assert client.get("/").status_code == 303
    token = csrf_of(client.get("/login").text)
    assert (
        client.post("/login", data={"username": "bea", "password": PASSWORD, "csrf": token}).status_code
        == 401
    )


def test_sign_out_ends_the_session(make_client: Any) -> None:
    client = make_client("rex")
    token = csrf_of(client.get("/").text)
    assert client.post("/logout", data={"csrf": token}).status_code == 303
    assert client.get("/").status_code == 303


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_admins_manage_users_and_reviewers_cannot(make_client: Any) -> None:
    rex, ada = make_client("rex"), make_client("ada")
    assert rex.get("/admin/users").status_code == 403
    page = ada.get("/admin/users")
    added = ada.post("/admin/users", data={"username": "cy", "password": PASSWORD, "role": "reviewer",
                                           "csrf": csrf_of(page.text)})  # fmt: skip
    assert added.status_code == 303
    sign_in(make_client(), "cy")
    assert rex.get("/labels.csv").status_code == 403


def test_the_viewer_overlays_the_map_the_worker_stored(
    make_client: Any, seeded: Any, review_settings: Any
) -> None:
    import numpy as np
    import sqlalchemy as sa

    from db.models import Heatmap
    from deepcovid.artifacts import open_artifacts
    from deepcovid.explain import CropGeometry, Explanation
    from deepcovid.heatmaps import encode, heatmap_key

    uri = str(seeded.archive / "a.png")
    cold = np.zeros(
        (224, 224), np.float32
    )  # a computed map is never all zero: this one must come from the store
    maps = {name: cold for name in ("ensemble", "resnet18", "squeezenet1_1")}
    key = heatmap_key(uri, seeded.bundle_id)
    geometry = CropGeometry.for_size(320, 256)
    open_artifacts(review_settings).put(
        key, encode(Explanation(maps, {}), geometry, seeded.bundle_id, "mean")
    )
    with seeded.engine.begin() as conn:
        conn.execute(
            sa.insert(Heatmap.__table__).values(
                image_id=seeded.ids["a.png"], bundle_id=seeded.bundle_id, key=key, geometry=geometry.as_dict()
            )
        )
    client = make_client("rex")
    response = client.get(
        f"/media/{seeded.job_id}/{seeded.ids['a.png']}/heat/{seeded.bundle_id}/ensemble.png"
    )
    assert response.status_code == 200
    assert np.asarray(Image.open(io.BytesIO(response.content)))[..., 3].max() == 0
