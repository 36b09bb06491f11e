"""DICOMweb against the file system: WADO-RS fetch + decode from a loopback Orthanc, and the QIDO crawl.

Generates synthetic 16-bit DX radiographs (as a PACS stores them) in a temporary folder, uploads them to a
private Orthanc (started on free ports, stopped afterwards), then in one run measures:

- fetch + decode (the workers' path: ``Storage.read`` then ``load_image``, on the pipeline's number of
  decode threads) from the files on disk and from Orthanc by WADO-RS, and their ratio;
- the QIDO-RS crawl (studies, series, instances; paged) in instances listed per second.

    .venv/bin/python benchmarks/dicomweb.py [--images 200] [--size 1024] [--studies 20] [--threads N]

Target: DICOMweb at least 70% of the file-system rate. Needs `orthanc` and `orthanc-dicomweb` (apt).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 0.70


def make_instances(count: int, size: int, studies: int) -> list[tuple[bytes, str, str, str]]:
    """``(bytes, study, series, sop)`` of ``count`` DX radiographs spread over ``studies`` studies."""
    import numpy as np
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from tests.fixtures.images import dicom_bytes

    rng = np.random.default_rng(0)
    study_uids = [generate_uid() for _ in range(studies)]
    series_uids = [generate_uid() for _ in range(studies)]
    out = []
    for i in range(count):
        pixels = rng.integers(0, 4096, size=(size, size), dtype=np.int64)
        ds = dcmread(io.BytesIO(dicom_bytes(size=(size, size), pixels=pixels, seed=i)))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uids[i % studies], series_uids[i % studies]
        ds.StudyDate = "20240110"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append((buffer.getvalue(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def rate(uris: list[str], read, threads: int) -> float:  # type: ignore[no-untyped-def]
    """Images per second through ``read(uri)`` then ``load_image`` on ``threads`` threads."""
    from deepcovid.preprocess import load_image

    def one(uri: str) -> None:
        load_image(read(uri))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, uris[: threads * 2]))  # warm: imports, connections, codec tables
        start = time.perf_counter()
        list(pool.map(one, uris))
        return len(uris) / (time.perf_counter() - start)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024, help="pixels per side (16-bit, uncompressed)")
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each rate")
    args = parser.parse_args()

    from deepcovid.dicomweb import instance_uri
    from deepcovid.settings import Settings
    from deepcovid.storage import Storage
    from pacs.crawl import Crawl
    from tests.fixtures.orthanc import start_orthanc

    instances = make_instances(args.images, args.size, args.studies)
    with tempfile.TemporaryDirectory(prefix="deepcovid-bench-dicomweb-") as tmp:
        folder = Path(tmp) / "files"
        folder.mkdir()
        files = []
        for i, (data, *_uids) in enumerate(instances):
            path = folder / f"im{i:05d}.dcm"
            path.write_bytes(data)
            files.append(str(path))
        server = start_orthanc(Path(tmp) / "orthanc")
        try:
            for data, *_uids in instances:
                server.upload(data)
            settings = Settings(
                data_dir=Path(tmp) / "data",
                storage_roots=[folder],
                dicomweb_allow=[server.dicomweb],
                dicomweb_max_connections=max(4, args.threads),
            )
            storage = Storage(settings)
            uris = [instance_uri(server.dicomweb, study, series, sop) for _, study, series, sop in instances]
            # Interleaved, so load from whatever else the machine runs falls on both alike.
            pairs = [
                (rate(files, storage.read, args.threads), rate(uris, storage.read, args.threads))
                for _ in range(args.repeats)
            ]
            disk, web = max(d for d, _ in pairs), max(w for _, w in pairs)
            crawl = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                listed = sum(1 for _ in Crawl(server.dicomweb + "?modality=DX", settings, resumable=False))
                crawl.append(listed / (time.perf_counter() - start))
        finally:
            server.stop()

    megabytes = sum(len(d) for d, *_ in instances) / len(instances) / 1e6
    print(f"{args.images} DX instances of {args.size}x{args.size} (16-bit, {megabytes:.1f} MB each), "
          f"{args.studies} studies; {args.threads} decode threads; best of {args.repeats}")  # fmt: skip
    print()
    print("| path | images/s |")
    print("|---|---:|")
    print(f"| files on disk: read + decode | {disk:,.1f} |")
    print(f"| Orthanc on loopback, WADO-RS: fetch + decode | {web:,.1f} |")
    print(f"| **ratio DICOMweb / disk** | **{web / disk:.2f}** (target >= {TARGET_RATIO:.2f}) |")
    print(f"| QIDO-RS crawl: instances listed per second | {max(crawl):,.0f} ({listed} listed) |")
    print()
    print("ratio in each interleaved repeat: " + ", ".join(f"{w / d:.2f}" for d, w in pairs))


if __name__ == "__main__":
    main()
