"""The one table of exit codes: every command exits with one of these, and help and docs are made from it."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """A command's exit status; ``describe`` says what it means to the person who ran it."""

    OK = 0
    FAILURES = 1
    USAGE = 2
    SCHEMA_NOT_CURRENT = 3
    BAD_SETTING = 4
    MISSING_PATH = 10
    UNREADABLE_PATH = 11
    NO_SUCH_BUCKET = 12
    BUCKET_ACCESS_DENIED = 13
    BROKER_UNREACHABLE = 14
    DATABASE_UNREACHABLE = 15
    NO_BUNDLE = 16
    OUTSIDE_STORAGE_ROOTS = 17
    S3_UNREACHABLE = 18
    NO_IMAGES = 19
    STALLED = 20
    DATA_DIR_NOT_WRITABLE = 21
    PACS_UNREACHABLE = 24
    INTERRUPTED = 130

    @property
    def describe(self) -> str:
        return _MEANINGS[self]


_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success (for `inspect`: every file decoded; for `enqueue`: queued, or nothing to do)",
    ExitCode.FAILURES: "some files failed (`inspect`, `explain`, and `screen` unless `--allow-failures`), "
    "a job finished with failed images (`status --check`), a refused promotion, a bundle or training error",
    ExitCode.USAGE: "usage error (bad option, missing path for `inspect`)",
    ExitCode.SCHEMA_NOT_CURRENT: "database schema not current: run `deepcovid db upgrade`",
    ExitCode.BAD_SETTING: "a setting (a DEEPCOVID_* variable or .env) has a value that is not allowed",
    ExitCode.MISSING_PATH: "source path missing (`enqueue`, `screen`)",
    ExitCode.UNREADABLE_PATH: "source path cannot be read",
    ExitCode.NO_SUCH_BUCKET: "S3 bucket does not exist",
    ExitCode.BUCKET_ACCESS_DENIED: "S3 bucket denies access",
    ExitCode.BROKER_UNREACHABLE: "broker unreachable",
    ExitCode.DATABASE_UNREACHABLE: "database unreachable",
    ExitCode.NO_BUNDLE: "no bundle to score with (register and promote one)",
    ExitCode.OUTSIDE_STORAGE_ROOTS: "source outside the storage roots (or none configured)",
    ExitCode.S3_UNREACHABLE: "S3 endpoint unreachable",
    ExitCode.NO_IMAGES: "`enqueue`/`screen`: the source holds no image to list (no job is created)",
    ExitCode.STALLED: "`status --check`: the job is stalled; recover with `deepcovid requeue JOB --queued`",
    ExitCode.DATA_DIR_NOT_WRITABLE: "a command that writes: the data directory, the bundles directory or the "
    "SQLite file cannot be created or is not writable",
    ExitCode.PACS_UNREACHABLE: "a DICOMweb PACS did not answer, or refused the request (`enqueue`, `screen`, "
    "`publish`)",
    ExitCode.INTERRUPTED: "interrupted; what was done is kept, run the same command again to resume",
}


def help_text(codes: tuple[ExitCode, ...] = tuple(ExitCode)) -> str:
    """One paragraph for a command's ``--help``: ``Exit codes: 0 ...; 2 ...``."""
    return "Exit codes: " + "; ".join(f"{int(code)} {code.describe}" for code in codes) + "."


def markdown_table() -> str:
    """The table in docs/architecture.md (a test keeps the two equal)."""
    rows = [f"| {int(code)} | {code.describe} |" for code in ExitCode]
    return "\n".join(["| code | meaning |", "|---:|---|", *rows])


if __name__ == "__main__":
    print(markdown_table())
