"""Open a file beneath a directory without following a symbolic link at any component.

Checking a path and then opening it are two steps, and whoever can write in the archive can swap a parent
directory for a symlink between them. Here the kernel resolves the path relative to a directory fd and
refuses symlinks and ``..`` escapes as it goes: ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` where
the kernel has it (Linux 5.6+), otherwise one ``O_NOFOLLOW`` open per component from that fd.

Refusals are OSErrors: ``ELOOP`` for a symlink in the path, ``EXDEV`` for ``..`` above the directory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import sys
from typing import Any

RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100
# openat2 has the same number in every architecture's table that uses the generic one.
_SYS_OPENAT2 = {"x86_64": 437, "amd64": 437, "aarch64": 437, "arm64": 437}.get(platform.machine().lower())
_EAGAIN_RETRIES = 16
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

OPENAT2: bool | None = None
"""Whether openat2 is used: None until first use probes the kernel; tests set False to walk instead."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_syscall() -> Any:
    if _SYS_OPENAT2 is None or not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    call.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    return call


_syscall = _load_syscall()


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    fd = _syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


def openat2_available() -> bool:
    """Whether this kernel (and any seccomp filter in front of it) lets openat2 through."""
    global OPENAT2
    if OPENAT2 is None:
        if _syscall is None:
            OPENAT2 = False
        else:
            try:
                os.close(_openat2(_AT_FDCWD, "/", _O_PATH | _O_CLOEXEC, 0))
                OPENAT2 = True
            except OSError:  # ENOSYS; EPERM from container seccomp profiles that predate openat2
                OPENAT2 = False
    return OPENAT2


def open_beneath(dir_fd: int, path: str, flags: int) -> int:
    """An fd for ``path`` (relative) opened beneath ``dir_fd``, no symlink followed; OSError otherwise."""
    if openat2_available():
        for _ in range(_EAGAIN_RETRIES):
            try:
                return _openat2(dir_fd, path, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:  # EAGAIN: a rename raced a ".." lookup; try again
                    raise
        raise OSError(errno.EAGAIN, "the path kept changing while it was opened", path)
    return walk_beneath(dir_fd, path, flags)


def walk_beneath(dir_fd: int, path: str, flags: int) -> int:
    """``open_beneath`` in user space: one ``O_NOFOLLOW`` open per component, ``..`` pops what was opened."""
    if os.path.isabs(path):
        raise OSError(errno.EXDEV, "an absolute path is not beneath the directory", path)
    parts = [part for part in path.split("/") if part not in ("", ".")]
    opened: list[int] = []  # the directories walked through, so ".." never asks the file system
    try:
        for part in parts[:-1]:
            if part == "..":
                if not opened:
                    raise OSError(errno.EXDEV, "the path leads above the directory", path)
                os.close(opened.pop())
                continue
            parent = opened[-1] if opened else dir_fd
            opened.append(_open_directory(parent, part, path))
        parent = opened[-1] if opened else dir_fd
        last = parts[-1] if parts else "."
        if last == "..":
            if not opened:
                raise OSError(errno.EXDEV, "the path leads above the directory", path)
            os.close(opened.pop())
            last, parent = ".", opened[-1] if opened else dir_fd
        try:
            return os.open(last, flags | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        for fd in opened:
            os.close(fd)


def _open_directory(parent: int, name: str, path: str) -> int:
    # With O_PATH a symlink opens as itself and fstat tells it apart without a second, racy lookup.
    flags = _O_PATH | os.O_NOFOLLOW | _O_CLOEXEC | (0 if hasattr(os, "O_PATH") else os.O_DIRECTORY)
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISDIR(mode):
        os.close(fd)
        code = errno.ELOOP if stat.S_ISLNK(mode) else errno.ENOTDIR
        raise OSError(code, os.strerror(code), path)
    return fd
