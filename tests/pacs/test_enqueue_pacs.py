"""``enqueue`` from a real Orthanc through real workers: a worker killed and the PACS stopped mid-job lose
nothing, the reports are published as chunks finish, and crawling again duplicates nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.fixtures.orthanc import OrthancServer
from tests.fixtures.services import wait_for
from tests.pacs.instances import archive, instance
from tests.pacs.sr_check import sr_instances
from tests.producer.test_enqueue_worker import (
    counts,
    flat,
    job_id_from,
    register_and_promote,
    wait_job_finished,
)

pytestmark = pytest.mark.slow


def test_enqueue_from_a_pacs_survives_a_killed_worker_and_a_stopped_pacs(
    run_cli, worker_env: dict, producer_env, start_worker, orthanc: OrthancServer, tiny_bundle_path: Path,
    bundles_dir: Path,
) -> None:  # fmt: skip
    busy = generate_uid()
    made = archive() + [instance(study=busy, study_date="20240601", seed=20 + i) for i in range(8)]
    for item in made:
        orthanc.upload(item.data)
    listed = [m for m in made if m.modality in ("CR", "DX") and m.study != made[6].study]  # 2025 left out
    env = worker_env | {
        "DEEPCOVID_DICOMWEB_ALLOW": orthanc.dicomweb,
        "DEEPCOVID_PUBLISH_TO": orthanc.dicomweb,
        "DEEPCOVID_VISIBILITY_TIMEOUT": "5",
        "DEEPCOVID_BATCH_SIZE": "1",
        "DEEPCOVID_DICOMWEB_MAX_ATTEMPTS": "2",
        "DEEPCOVID_RETRY_BACKOFF_MAX": "2",
    }
    producer_env(**env)
    url = env["DEEPCOVID_DATABASE_URL"]
    register_and_promote(url, tiny_bundle_path, bundles_dir)

    first = start_worker(env)
    result = run_cli("enqueue", orthanc.dicomweb, "--since", "2024-01-01", "--until", "2024-12-31")
    assert result.exit_code == 0, result.output
    assert f"listed {len(listed)}, queued {len(listed)}" in flat(result.stdout)
    job = job_id_from(result.stdout)
    wait_for(lambda: "received" in first.log(), 60, "the first worker to receive a chunk")
    orthanc.stop()  # the PACS goes away mid-job: chunks retry instead of failing their images
    first.kill()  # and so does the worker
    time.sleep(6)  # past the visibility timeout: Redis gives unacknowledged chunks to the next worker
    second = start_worker(env)
    wait_for(lambda: "retry" in second.log().lower(), 60, "a chunk to be retried while the PACS is down")
    orthanc.start()
    wait_job_finished(url, job)

    states = counts(
        url,
        "SELECT i.uri, j.state || ':' || coalesce(j.failure_reason, '') FROM job_images j "
        f"JOIN images i ON i.id = j.image_id WHERE j.job_id = {job}",
    )
    expected = {m.sop: "scored:" if m.eligible else "failed:not_eligible" for m in listed}
    assert {uri.rsplit("/", 1)[-1]: state for uri, state in states.items()} == expected
    scored = [m for m in listed if m.eligible]
    per_image = counts(url, "SELECT image_id, count(*) FROM predictions GROUP BY image_id")
    assert len(per_image) == len(scored) and set(per_image.values()) == {1}

    # Published as the chunks finished (those whose PACS was down are failed, and publish sends them).
    again = run_cli("publish", str(job))
    assert again.exit_code == 0, again.output
    published = counts(url, "SELECT state, count(*) FROM publications GROUP BY state")
    assert published == {"published": len(scored)}
    assert "reports published" in second.log()  # DEEPCOVID_PUBLISH_TO: the worker published chunk by chunk
    for study in {m.study for m in scored}:
        assert len(sr_instances(orthanc, study)) == len([m for m in scored if m.study == study])

    # Crawling again lists the same instances and registers no new image.
    rerun = run_cli("enqueue", orthanc.dicomweb, "--since", "2024-01-01", "--until", "2024-12-31")
    assert rerun.exit_code == 0, rerun.output
    assert f"listed {len(listed)}" in flat(rerun.stdout) and f"skipped {len(scored)}" in flat(rerun.stdout)
    assert counts(url, "SELECT storage, count(*) FROM images GROUP BY storage") == {"dicomweb": len(listed)}
