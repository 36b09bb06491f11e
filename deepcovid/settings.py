"""One typed settings object for every role, read from ``DEEPCOVID_*`` environment variables and ``.env``."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from deepcovid import defaults
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode

PREFIX = "DEEPCOVID_"
ENV_FILE = ".env"
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "deepcovid"


class HeatmapMode(StrEnum):
    """Which scored images get Grad-CAM maps: the flagged ones (default), every one, or none."""

    flagged = "flagged"
    all = "all"
    none = "none"


class Settings(BaseSettings):
    """Everything tunable, with defaults that work on one box with no services installed."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_file=ENV_FILE, extra="ignore")

    # Where the embedded SQLite database, registered bundles and checkpoints live.
    data_dir: Path = Field(default_factory=_default_data_dir)
    # SQLAlchemy URL; empty means a SQLite file in data_dir. Production: postgresql+psycopg://...
    database_url: SecretStr | None = None
    # Celery broker: redis://... or amqp://...
    broker_url: SecretStr = SecretStr(defaults.BROKER_URL)
    queue: str = defaults.QUEUE

    # Workers read images only under these roots (comma separated). Empty: no local files are readable.
    storage_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    s3_endpoint_url: str | None = None
    s3_region: str = defaults.S3_REGION
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_max_attempts: int = defaults.S3_MAX_ATTEMPTS
    # Buckets workers may read (comma separated ``bucket`` or ``bucket/prefix``). Empty: no S3 reads at all.
    s3_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Read files with several hard links: a link to a file outside the roots cannot be told apart by path.
    allow_hard_links: bool = False

    # DICOMweb PACSs workers may read (comma separated ``dicomweb[s]://host:port/path`` service roots).
    dicomweb_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Requests in flight to one PACS from one worker process.
    dicomweb_max_connections: int = Field(default=defaults.DICOMWEB_MAX_CONNECTIONS, ge=1)
    dicomweb_max_attempts: int = Field(default=defaults.DICOMWEB_MAX_ATTEMPTS, ge=1)
    dicomweb_timeout: float = Field(default=defaults.DICOMWEB_TIMEOUT_S, gt=0)
    # Authentication: HTTP basic (username + password) or a bearer token; client TLS certificate and key.
    dicomweb_username: str | None = None
    dicomweb_password: SecretStr | None = None
    dicomweb_token: SecretStr | None = None
    dicomweb_client_cert: Path | None = None
    dicomweb_client_key: Path | None = None
    dicomweb_ca_bundle: Path | None = None  # CA certificates for dicomwebs:// (default: the system's)
    # Where each chunk's DICOM SR reports are sent (STOW-RS) once scored; empty: `deepcovid publish` only.
    publish_to: str | None = None

    # Eligibility of DICOM images (any source), checked before their pixels are decoded. Comma separated.
    eligibility: bool = True  # false: every projection radiograph is scored
    eligible_modalities: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(defaults.ELIGIBLE_MODALITIES)
    )
    eligible_body_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(defaults.ELIGIBLE_BODY_PARTS)
    )
    ineligible_views: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(defaults.INELIGIBLE_VIEWS)
    )
    ineligible_series_words: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(defaults.INELIGIBLE_SERIES_WORDS)
    )

    # Scoring
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 0  # images per forward pass; 0: defaults.CPU_BATCH_SIZE or CUDA_BATCH_SIZE
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 2)
    chunk_size: int = defaults.CHUNK_SIZE
    # bf16 on CPU. auto: where the CPU computes bf16 natively and `train` measured the bundle's bf16
    # probabilities within bf16_tolerance of fp32 on its validation images; on: always; off: fp32.
    cpu_bf16: Literal["auto", "on", "off"] = "auto"
    bf16_tolerance: float = defaults.BF16_TOLERANCE  # largest |bf16 - fp32| validation probability for bf16
    # int8 on CPU (OpenVINO, the `openvino` extra). auto: where the bundle carries int8 networks whose
    # measured drift on validation images is within int8_tolerance and whose AUCs moved by at most
    # defaults.INT8_AUC_CHANGE, else bf16/fp32 as above; on: whenever the bundle carries them; off: never.
    cpu_int8: Literal["auto", "on", "off"] = "auto"
    int8_tolerance: float = defaults.INT8_TOLERANCE  # largest |int8 - fp32| validation probability for int8
    cpu_streams: int = 0  # networks run side by side on CPU; 0: one per core (at most one per network)
    torch_threads: int = 0  # per CPU stream; 0: the cores shared out between streams; on CUDA torch decides
    compile: bool = False  # torch.compile on CUDA

    # Grad-CAM maps, made right after scoring (deepcovid.heatmaps): flagged | all | none
    heatmaps: HeatmapMode = HeatmapMode.flagged
    # Where maps are stored: a directory, or s3://bucket/prefix; empty: <data_dir>/artifacts. Never
    # beneath a storage root or an S3_ALLOW prefix (the archive is read-only to the screener).
    artifacts: str = ""

    # Input limits: refuse before decoding rather than exhaust memory.
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS
    max_file_bytes: int = defaults.MAX_FILE_BYTES
    # Bytes decoding one image may hold, from its header; also what all decode threads hold at once.
    max_decoded_bytes: int = defaults.MAX_DECODED_BYTES

    # ImageNet weights: torchvision's hub cache is used when it holds them; otherwise this directory.
    imagenet_weights_dir: Path | None = None

    # Registered bundles are copied here so every worker finds them by id.
    bundles_dir: Path | None = None

    # Delivery
    max_attempts: int = (
        defaults.MAX_ATTEMPTS
    )  # unfinished deliveries (crash, time limit, error) before failing
    max_chunk_uris: int = defaults.MAX_CHUNK_URIS  # a task message with more URIs is rejected
    task_soft_time_limit: int = defaults.TASK_SOFT_TIME_LIMIT
    task_time_limit: int = defaults.TASK_TIME_LIMIT
    visibility_timeout: int = defaults.VISIBILITY_TIMEOUT
    retry_backoff_max: int = defaults.RETRY_BACKOFF_MAX
    # Seconds without progress before a running job with queued images is stalled; 0: derived (see below)
    stall_after: int = Field(default=0, ge=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Review workbench (`deepcovid serve`). The key signing session cookies; empty: one is generated and
    # kept in data_dir/secret_key (0600) on first use, so sessions survive restarts.
    secret_key: SecretStr | None = None
    # Behind a TLS-terminating proxy: trust its X-Forwarded-Proto to mark session cookies Secure.
    trust_forwarded_proto: bool = False

    @field_validator("cpu_bf16", "cpu_int8", mode="before")
    @classmethod
    def _bf16_switch(cls, value: object) -> object:
        """Booleans (``true``/``1``/``false``/``0``) as well as auto/on/off."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            word = value.strip().lower()
            return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(
                word, word
            )
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        word = value.strip().lower()
        if not _DEVICE.match(word):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return word

    @field_validator("storage_roots", "s3_allow", "dicomweb_allow", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in (part.strip() for part in value.split(",")) if p]
        return value

    @field_validator(
        "eligible_modalities",
        "eligible_body_parts",
        "ineligible_views",
        "ineligible_series_words",
        mode="before",
    )
    @classmethod
    def _split_words(cls, value: object) -> object:
        """Comma separated, upper-cased; an empty entry (``CHEST,,``) stands for a missing attribute."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            return list(dict.fromkeys(str(v).strip().upper() for v in value))
        return value

    @property
    def effective_database_url(self) -> str:
        if self.database_url is not None and self.database_url.get_secret_value():
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.data_dir / 'deepcovid.db'}"

    @property
    def effective_stall_after(self) -> int:
        """The stall window: no chunk runs longer than the hard time limit, so past it plus a margin
        nothing is still working on the job."""
        return self.stall_after or self.task_time_limit + defaults.STALL_MARGIN_S

    @property
    def effective_bundles_dir(self) -> Path:
        return self.bundles_dir or self.data_dir / "bundles"

    @property
    def effective_artifacts(self) -> str:
        """Where the artifact store lives: DEEPCOVID_ARTIFACTS, or ``artifacts`` in the data directory."""
        return self.artifacts.strip() or str(self.data_dir / "artifacts")

    def masked(self) -> dict[str, str]:
        """Effective settings for display: passwords in URLs and secrets replaced by ***."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "database_url":
                value = self.effective_database_url
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
                if name.startswith(("s3_", "dicomweb_")) or name == "secret_key":
                    value = "***" if value else ""
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            out[name] = mask_url(str(value)) if value is not None else ""
        out["bundles_dir"] = str(self.effective_bundles_dir)
        out["artifacts"] = mask_url(self.effective_artifacts)
        return out


def mask_url(value: str) -> str:
    """Hide the password in scheme://user:password@host URLs."""
    if "://" not in value or "@" not in value:
        return value
    scheme, rest = value.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"


class SettingsError(UserError):
    """A DEEPCOVID_* variable (or .env entry) holds a value its setting does not allow."""

    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.BAD_SETTING, message)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read once; a bad value raises SettingsError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad setting: the variable, the value given and what is allowed."""
    lines = []
    for problem in exc.errors():
        name = PREFIX + "_".join(str(part) for part in problem["loc"][:1]).upper()
        given = problem.get("input")
        shown = "***" if "secret" in name.lower() or "password" in name.lower() else given
        allowed = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{name}={shown!s} is not allowed: {allowed}")
    return "; ".join(lines)


def unknown_variables(
    environ: Mapping[str, str] | None = None, env_file: str | Path = ENV_FILE
) -> list[tuple[str, str | None]]:
    """DEEPCOVID_* names in the environment or ``env_file`` that no setting reads, each with the
    closest known name (a typo such as DEEPCOVID_CHUNKSIZE would otherwise be silently ignored)."""
    known = [PREFIX + name.upper() for name in Settings.model_fields]
    given = dict(environ if environ is not None else os.environ)
    if Path(env_file).is_file():
        given.update({k: v or "" for k, v in dotenv_values(env_file).items()})
    out = []
    for name in sorted(given):
        upper = name.upper()
        if upper.startswith(PREFIX) and upper not in known and upper not in _NOT_SETTINGS:
            # Compared without the prefix, which every name shares.
            close = difflib.get_close_matches(upper[len(PREFIX) :], [k[len(PREFIX) :] for k in known], n=1)
            out.append((name, PREFIX + close[0] if close else None))
    return out


# DEEPCOVID_* variables read by something other than Settings (tests and benchmarks).
_NOT_SETTINGS = frozenset(
    {
        "DEEPCOVID_SHARED_DATA",
        "DEEPCOVID_TEST_AMQP_URL",
        "DEEPCOVID_TEST_PG_ADMIN_URL",
        "DEEPCOVID_TEST_REDIS_URL",
    }
)
