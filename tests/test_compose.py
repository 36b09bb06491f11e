"""docker-compose.yml: valid for a real compose implementation, no fallback secrets, least privilege.

``docker-compose config`` (Debian's docker-compose 1.29 in CI) needs no daemon; the structural checks
below run everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.services import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
DUMMY_ENV = REPO_ROOT / "tests" / "fixtures" / "compose.env"
SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MINIO_READER_USER",
    "MINIO_READER_PASSWORD",
    "FLOWER_BASIC_AUTH",
    "REVIEW_SECRET_KEY",
)
# Services whose image cannot run with these settings; none so far.
NOT_HARDENED: dict[str, str] = {}
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")


def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (CI installs Debian's docker-compose 1.29)")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [binary, "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE), "--env-file", str(env_file),
         "config", "-q"],
        capture_output=True, text=True, timeout=120, env=clean, cwd=REPO_ROOT,
    )  # fmt: skip


def test_docker_compose_validates_the_file() -> None:
    result = compose_config(DUMMY_ENV)
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_run_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose_config(empty)
    assert result.returncode != 0
    assert "Missing mandatory value" in result.stderr, result.stderr


def test_every_secret_is_required_and_has_no_fallback() -> None:
    text = COMPOSE.read_text()
    references: dict[str, set[str]] = {}
    for name, modifier in REFERENCE.findall(text):
        references.setdefault(name, set()).add(modifier[:2])
    for name in SECRETS:
        assert references.get(name), f"{name} is not used"
        assert references[name] == {":?"}, f"{name} must be written ${{{name}:?...}}, not {references[name]}"
    fallbacks = [name for name, kinds in references.items() if kinds & {":-", "-"}]
    assert not [name for name in fallbacks if re.search("PASSWORD|SECRET|USER|AUTH|KEY", name)], fallbacks
    assert "change-me" not in text


def test_the_example_env_and_the_ci_env_name_every_secret() -> None:
    def names(path: Path) -> dict[str, str]:
        lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
        return dict(line.split("=", 1) for line in lines)

    example, dummy = names(REPO_ROOT / ".env.example"), names(DUMMY_ENV)
    for name in SECRETS:
        assert name in example and name in dummy, name
    assert all(not example[name] for name in SECRETS if "PASSWORD" in name or "AUTH" in name), example


def test_images_are_pinned() -> None:
    for name, service in services().items():
        image = service["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        # A release, not a moving name: 7.2.5-alpine or RELEASE.2024-..., never latest or 7-alpine.
        assert re.match(r"(\d+\.\d+|RELEASE\.)", tag), f"{name}: {image} is not pinned to a release"


def test_every_service_is_read_only_without_capabilities() -> None:
    for name, service in services().items():
        if name in NOT_HARDENED:
            continue
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("cap_add"), name


def test_redis_requires_a_password_that_is_on_no_command_line() -> None:
    all_services = services()
    redis = all_services["redis"]
    command = " ".join(redis["command"])
    assert "requirepass $$REDIS_PASSWORD" in command
    assert "--requirepass" not in command
    assert environment(redis)["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert "REDIS_PASSWORD" in " ".join(redis["healthcheck"]["test"])
    for name, service in all_services.items():
        broker = environment(service).get("DEEPCOVID_BROKER_URL")
        if broker is not None:
            assert broker.startswith("redis://:${REDIS_PASSWORD:?"), name


def test_flower_gets_its_login_from_the_environment_and_no_other_secret() -> None:
    flower = services()["flower"]
    command = " ".join(flower["command"])
    assert "basic-auth" not in command and "PASSWORD" not in command
    env = environment(flower)
    assert env["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert set(env) == {"DEEPCOVID_BROKER_URL", "FLOWER_BASIC_AUTH"}


def test_only_minio_and_its_init_see_the_root_credentials() -> None:
    for name, service in services().items():
        env = environment(service)
        if name not in ("minio", "minio-init"):
            assert "MINIO_ROOT" not in " ".join(f"{k}={v}" for k, v in env.items()), name
        if "DEEPCOVID_S3_ACCESS_KEY_ID" in env:
            assert env["DEEPCOVID_S3_ACCESS_KEY_ID"].startswith("${MINIO_READER_USER:?"), name
            assert env["DEEPCOVID_S3_SECRET_ACCESS_KEY"].startswith("${MINIO_READER_PASSWORD:?"), name
            assert env.get("DEEPCOVID_S3_ALLOW"), f"{name} may read every bucket"


def test_the_reader_user_can_only_list_and_get() -> None:
    script = services()["minio-init"]["command"][0]
    assert 'mc admin user add local "$$MINIO_READER_USER"' in script
    assert "mc admin policy attach local read-xrays --user" in script
    actions = set(re.findall(r'"(s3:[A-Za-z*]+)"', script))
    assert actions == {"s3:GetBucketLocation", "s3:ListBucket", "s3:GetObject"}, actions


def test_workers_mount_bundles_and_archive_read_only() -> None:
    for name in ("worker", "worker-cpu"):
        volumes = [str(v) for v in services()[name]["volumes"]]
        assert volumes and all(v.endswith(":ro") for v in volumes), (name, volumes)
