"""QIDO-RS crawl of a real Orthanc: filters, paging, de-duplication and the resumable checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepcovid.settings import Settings
from pacs.crawl import Crawl, Crawler, parse_source
from tests.fixtures.orthanc import OrthancServer
from tests.pacs.instances import Made, archive


@pytest.fixture
def pacs(orthanc: OrthancServer) -> tuple[OrthancServer, list[Made]]:
    made = archive()
    for item in made:
        orthanc.upload(item.data)
    return orthanc, made


def _settings(tmp_path: Path, server: OrthancServer) -> Settings:
    return Settings(data_dir=tmp_path / "data", dicomweb_allow=[server.dicomweb])


def _projections(made: list[Made]) -> set[str]:
    return {m.sop for m in made if m.modality in ("CR", "DX")}


def test_the_crawl_lists_cr_and_dx_instances_by_uid_only(pacs, tmp_path: Path) -> None:
    server, made = pacs
    refs = list(Crawl(server.dicomweb, _settings(tmp_path, server)))
    assert {ref.uri.rsplit("/", 1)[-1] for ref in refs} == _projections(made)
    assert all(ref.storage == "dicomweb" for ref in refs)
    one = next(m for m in made if m.sop == refs[0].uri.rsplit("/", 1)[-1])
    assert refs[0].uri == (f"{server.dicomweb}/studies/{one.study}/series/{one.series}/instances/{one.sop}")
    assert not any("Doe" in ref.uri or "PID" in ref.uri for ref in refs)


def test_a_date_window_and_passed_through_keys_filter_studies(pacs, tmp_path: Path) -> None:
    server, made = pacs
    settings = _settings(tmp_path, server)
    window = list(Crawl(f"{server.dicomweb}?since=2024-01-01&until=20241231", settings))
    in_2024 = {m.sop for m in made if m.modality in ("CR", "DX") and m.study != made[-1].study}
    assert {r.uri.rsplit("/", 1)[-1] for r in window} == in_2024
    only_cr = list(Crawl(f"{server.dicomweb}?modality=CR", settings))
    assert {r.uri.rsplit("/", 1)[-1] for r in only_cr} == {m.sop for m in made if m.modality == "CR"}
    accession = list(Crawl(f"{server.dicomweb}?AccessionNumber=ACC20250601", settings))
    assert {r.uri.rsplit("/", 1)[-1] for r in accession} == {made[-1].sop}


def test_small_pages_list_everything_once(pacs, tmp_path: Path) -> None:
    server, made = pacs
    crawler = Crawler(_settings(tmp_path, server), parse_source(server.dicomweb), page_size=1)
    refs = list(crawler.crawl())
    uids = [r.uri.rsplit("/", 1)[-1] for r in refs]
    assert sorted(uids) == sorted(_projections(made))


def test_an_interrupted_crawl_continues_where_it_stopped(pacs, tmp_path: Path) -> None:
    server, made = pacs
    settings = _settings(tmp_path, server)
    first = Crawl(server.dicomweb, settings)
    listed = []
    for ref in first:
        listed.append(ref)
        # The first study's instances all came and were registered: the next ref is another study's.
        if len({r.uri.split("/studies/")[1].split("/")[0] for r in listed}) == 2:
            break
    first.registered(len(listed) - 1)
    done_study = listed[0].uri.split("/studies/")[1].split("/")[0]
    assert first.checkpoint is not None and first.checkpoint.done == {done_study}

    second = Crawl(server.dicomweb, settings)
    again = list(second)
    second.registered(len(again))
    again_uids = {r.uri.rsplit("/", 1)[-1] for r in again}
    skipped = {m.sop for m in made if m.study == done_study}
    assert again_uids == _projections(made) - skipped
    # Finished: the checkpoint is gone, so the next crawl lists everything afresh.
    assert not list((tmp_path / "data" / "crawls").glob("*.json"))
    assert {r.uri.rsplit("/", 1)[-1] for r in Crawl(server.dicomweb, settings)} == _projections(made)


def test_sources_are_canonical_and_refuse_what_the_crawl_sets() -> None:
    query = parse_source("dicomweb://pacs:8042/dicom-web/?until=2024-12-31&modality=dx,cr&since=20240101")
    assert query.source == "dicomweb://pacs:8042/dicom-web?modality=DX,CR&since=20240101&until=20241231"
    with pytest.raises(ValueError, match="offset"):
        parse_source("dicomweb://pacs:8042/dicom-web?offset=10")
    with pytest.raises(ValueError, match="date"):
        parse_source("dicomweb://pacs:8042/dicom-web?since=yesterday")
