"""The failure vocabulary shared by decoding, storage and the database.

One exception type carries a short machine ``reason`` (stored in the database, counted in
summaries) and a human ``detail``; callers never need to parse messages.
"""

from __future__ import annotations

from deepcovid.exitcodes import ExitCode

# Every reason an image can fail with. The database stores these strings verbatim.
REASONS: dict[str, str] = {
    "empty_file": "the file has zero bytes",
    "truncated": "the file ends before the image data does",
    "not_an_image": "the bytes are not a supported image format",
    "too_large": "the image or file exceeds the configured size limits",
    "unsupported_image": "an image format or mode this screener does not handle (e.g. animated)",
    "not_eligible": "a DICOM the eligibility rules leave out (lateral view, not the chest, not a radiograph)",
    "unsupported_dicom": "a DICOM this screener refuses (multi-frame, no pixels, not a projection X-ray)",
    "corrupt": "the image data is damaged and cannot be decoded",
    "unreadable": "the file could not be read",
    "not_found": "no such file or object",
    "permission_denied": "the storage refused access",
    "is_a_directory": "the path is a directory, not a file",
    "outside_storage_root": "the path resolves outside the configured storage roots",
    "crashed_worker": "scoring this image killed its worker process repeatedly",
    "internal_error": "an unexpected error while scoring this image",
    "timed_out": "its chunk reached the task time limit on every attempt, even when re-sent smaller",
    "bundle_unusable": "the job's bundle could not be loaded on the worker (missing or fails verification)",
}


class ImageError(Exception):
    """A per-image failure: recorded against that image, never fails its batch."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        self.reason = reason
        self.detail = detail or REASONS[reason]
        super().__init__(f"{reason}: {self.detail}")


class DecodeError(ImageError):
    """The bytes were read but are not an image this screener can score."""


class StorageError(ImageError):
    """The bytes could not be read from storage for a reason specific to this image."""


class TransientError(Exception):
    """A failure worth retrying later (database or S3 unreachable, throttling): not the image's fault."""


class UserError(Exception):
    """A problem the person running a command can fix: one line for them and a distinct exit code.

    Raised by domain functions (pre-flight checks, the database opener); the CLI prints ``message`` and
    exits with ``exit_code`` instead of a traceback.
    """

    def __init__(self, exit_code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)
        self.message = message
