"""List a PACS's instances by QIDO-RS (studies, then series, then instances) as ``ImageRef``s.

A source is a service root with its filters in the query string, so a job's source names its crawl:
``dicomweb://pacs:8042/dicom-web?modality=CR,DX&since=20240101&until=20241231&StudyDescription=CHEST*``
(``modality``, ``since`` and ``until`` are ours; every other key is passed to the study search as is).
Every result set is paged with limit/offset; instances are de-duplicated by SOPInstanceUID. A crawl keeps
a checkpoint (the studies it finished) in the data directory, keyed by its source, so an interrupted
enqueue run again continues where it stopped; a finished crawl removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from db.rows import ImageRef
from deepcovid import defaults
from deepcovid.dicomweb import DicomWebReader, Location, instance_uri, parse_dicomweb
from deepcovid.settings import Settings

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, MODALITIES_IN_STUDY = "00080060", "00080061"
_QIDO_JSON = {"Accept": "application/dicom+json"}


@dataclass(frozen=True)
class CrawlQuery:
    """A ``dicomweb://`` source: its service root and its filters."""

    location: Location
    modalities: tuple[str, ...] = defaults.QIDO_MODALITIES
    since: str = ""  # YYYYMMDD
    until: str = ""
    extra: tuple[tuple[str, str], ...] = ()  # other QIDO keys, passed through to the study search

    @property
    def source(self) -> str:
        """The canonical source: the root and its filters in a fixed order."""
        params: list[tuple[str, str]] = [("modality", ",".join(self.modalities))]
        params += [(k, v) for k, v in (("since", self.since), ("until", self.until)) if v]
        params += sorted(self.extra)
        return f"{self.location.root}?{urlencode(params, safe=',*')}"

    def study_params(self) -> dict[str, str]:
        """The study search. Modality is not a search key: some PACSs (Orthanc 1.10 among them) apply it
        after limit/offset, so pages come back short; each study's ModalitiesInStudy is checked here."""
        params = dict(self.extra)
        params["includefield"] = MODALITIES_IN_STUDY
        if self.since or self.until:
            params["StudyDate"] = f"{self.since}-{self.until}"
        return params


def parse_source(source: str, *, since: str = "", until: str = "", modalities: str = "") -> CrawlQuery:
    """A ``dicomweb://`` source with its query string (options given here override the query's)."""
    root, _, query = source.partition("?")
    location = parse_dicomweb(root)
    if location.study:
        raise ValueError("a dicomweb:// source is a service root (e.g. dicomweb://pacs:8042/dicom-web)")
    params = dict(parse_qsl(query, keep_blank_values=False))
    wanted = modalities or params.pop("modality", "") or ",".join(defaults.QIDO_MODALITIES)
    params.pop("modality", None)
    params.pop("includefield", None)
    since = _date(since or params.pop("since", ""), "since")
    until = _date(until or params.pop("until", ""), "until")
    params.pop("since", None)
    params.pop("until", None)
    for key in ("limit", "offset", "StudyDate", "ModalitiesInStudy"):
        if key in params:
            raise ValueError(f"the crawl sets {key} itself (use modality=, since= and until=)")
    words = tuple(dict.fromkeys(m.strip().upper() for m in wanted.split(",") if m.strip()))
    return CrawlQuery(location, words, since, until, tuple(sorted(params.items())))


def _date(value: str, name: str) -> str:
    digits = value.replace("-", "")
    if digits and (len(digits) != 8 or not digits.isdigit()):
        raise ValueError(f"{name} is a date: YYYY-MM-DD or YYYYMMDD")
    return digits


def _values(item: dict[str, Any], tag: str) -> list[str]:
    return [str(v) for v in (item.get(tag) or {}).get("Value") or []]


def _first(item: dict[str, Any], tag: str) -> str:
    values = _values(item, tag)
    return values[0] if values else ""


@dataclass
class Checkpoint:
    """The studies a crawl finished and whose instances are all registered, in the data directory: a
    re-run of the same source skips them. A study counts only once the producer has registered its last
    instance (``registered``): listing runs ahead of registration."""

    path: Path
    done: set[str] = field(default_factory=set)
    pending: list[tuple[str, int]] = field(default_factory=list)  # (study, instances listed up to its end)
    exhausted: bool = False

    @classmethod
    def for_source(cls, settings: Settings, source: str) -> Checkpoint:
        key = hashlib.sha256(source.encode()).hexdigest()[:32]  # the source may name a PACS: not in the name
        path = settings.data_dir / "crawls" / f"{key}.json"
        done: set[str] = set()
        if path.exists():
            done = set(json.loads(path.read_text(encoding="utf-8")).get("done_studies", []))
        return cls(path, done)

    def registered(self, count: int) -> None:
        """The producer registered the first ``count`` listed instances of this run."""
        finished = [study for study, end in self.pending if end <= count]
        if not finished and not self.exhausted:
            return
        self.pending = [(study, end) for study, end in self.pending if end > count]
        self.done.update(finished)
        if self.exhausted and not self.pending:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"done_studies": sorted(self.done)}), encoding="utf-8")
        os.replace(temporary, self.path)


class Crawler:
    """QIDO-RS paging over one PACS through the workers' reader (same bounds, retries and credentials)."""

    def __init__(self, settings: Settings, query: CrawlQuery, *, page_size: int = defaults.QIDO_PAGE_SIZE):
        self.settings = settings
        self.query = query
        self.page_size = page_size
        self.reader = DicomWebReader(settings)

    def pages(self, path: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Every result of one QIDO search, a page at a time."""
        offset = 0
        while True:
            page_params = {**params, "limit": str(self.page_size), "offset": str(offset)}
            response = self.reader.request(
                self.query.location, "GET", path, params=page_params, headers=_QIDO_JSON
            )
            items = response.json() if response.status_code != 204 and response.content else []
            yield from items
            if len(items) < self.page_size:
                return
            offset += len(items)

    def studies(self) -> Iterator[str]:
        """The UIDs of the studies with an instance in a wanted modality (all, if the PACS does not say)."""
        wanted = set(self.query.modalities)
        for item in self.pages("/studies", self.query.study_params()):
            study = _first(item, STUDY_UID)
            modalities = {m.upper() for m in _values(item, MODALITIES_IN_STUDY)}
            if study and (not modalities or modalities & wanted):
                yield study

    def instances(self, study: str) -> Iterator[tuple[str, str]]:
        """``(series, instance)`` UIDs of the study's series in the wanted modalities."""
        wanted = set(self.query.modalities)
        for series_item in self.pages(f"/studies/{study}/series", {}):
            series = _first(series_item, SERIES_UID)
            if not series or _first(series_item, MODALITY).upper() not in wanted:
                continue
            for item in self.pages(f"/studies/{study}/series/{series}/instances", {}):
                sop = _first(item, SOP_UID)
                if sop:
                    yield series, sop

    def crawl(self, checkpoint: Checkpoint | None = None) -> Iterator[ImageRef]:
        root = self.query.location.root
        seen: set[str] = set()
        listed = 0
        for study in self.studies():
            if checkpoint is not None and study in checkpoint.done:
                continue
            for series, sop in self.instances(study):
                if sop in seen:
                    continue
                seen.add(sop)
                listed += 1
                yield ImageRef(instance_uri(root, study, series, sop), "dicomweb")
            if checkpoint is not None:
                checkpoint.pending.append((study, listed))
        if checkpoint is not None:
            checkpoint.exhausted = True


class Crawl:
    """The instances of a ``dicomweb://`` source, iterated once; ``registered`` moves its checkpoint."""

    def __init__(self, source: str, settings: Settings, *, resumable: bool = True) -> None:
        query = parse_source(source)
        self.checkpoint = Checkpoint.for_source(settings, query.source) if resumable else None
        self._refs = Crawler(settings, query).crawl(self.checkpoint)

    def __iter__(self) -> Iterator[ImageRef]:
        return self._refs

    def __next__(self) -> ImageRef:
        return next(self._refs)

    def registered(self, count: int) -> None:
        """The producer has registered the first ``count`` instances listed by this run."""
        if self.checkpoint is not None:
            self.checkpoint.registered(count)
