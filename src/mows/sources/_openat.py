"""Opening files beneath a directory descriptor, so that no symbolic link leads outside it.

Checking a path with ``realpath`` and opening it by name later is a time-of-check/time-of-use
race: a symlink swapped in between makes the daemon (often running with more rights than its
clients) copy any file it can read into the pool. Here every open is resolved by the kernel
relative to a descriptor held open, with Linux ``openat2(2)`` and ``RESOLVE_BENEATH``. Where
``openat2`` is missing (kernels before 5.6, or a seccomp filter that refuses it), a walker
does the same in user space: one ``openat(O_NOFOLLOW)`` per component, relative symlinks
expanded by hand and ``..`` popping back to the descriptor it came from, never above the
anchor. Both refuse absolute symlinks and escapes with ``EXDEV``, as ``openat2`` does.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading

__all__ = ["have_openat2", "open_beneath", "open_no_symlinks"]

log = logging.getLogger("mows.sources")

_SYS_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)
_AT_FDCWD = -100
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_MAX_LINKS = 40  # the kernel's own limit on symlinks in one lookup
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_have: bool | None = None  # whether openat2 works here; probed once (tests may force False)
_probe_lock = threading.Lock()


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    raw = os.fsencode(path)
    for _ in range(16):
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(raw),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        # EAGAIN: RESOLVE_BENEATH saw a concurrent rename or mount and asks to retry.
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
except (OSError, AttributeError):  # pragma: no cover - no libc syscall(): walker only
    _have = False


def have_openat2() -> bool:
    """Whether ``openat2`` works on this kernel and under this seccomp filter; logged once."""
    global _have
    if _have is None:
        with _probe_lock:
            if _have is None:
                why = ""
                try:
                    os.close(_openat2(_AT_FDCWD, "/", _DIR_PATH, _RESOLVE_NO_SYMLINKS))
                    _have = True
                except OSError as e:  # ENOSYS (old kernel), EPERM (seccomp), E2BIG, EINVAL
                    why = f" (openat2 unavailable: {e.strerror})"
                    _have = False
                log.info(
                    "local sources open files %s%s",
                    "with openat2(RESOLVE_BENEATH)"
                    if _have
                    else "by walking each path component with openat(O_NOFOLLOW)",
                    why,
                )
    return _have


def open_beneath(anchor: int, rel: str, flags: int) -> int:
    """Open ``rel`` relative to the directory descriptor ``anchor``, following only
    relative symlinks that stay beneath it. ``flags`` must not hold ``O_PATH`` (with
    ``O_NOFOLLOW`` it would open a final symlink itself in the walker)."""
    if have_openat2():
        return _openat2(anchor, rel, flags, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    return _walk(anchor, rel, flags, follow=True)


def open_no_symlinks(path: str, flags: int) -> int:
    """Open the absolute ``path`` with no symlink anywhere in it (a realpath'd directory
    that someone turned into a symlink afterwards is refused with ``ELOOP``)."""
    if have_openat2():
        return _openat2(_AT_FDCWD, path, flags, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    top = os.open("/", _DIR_PATH)
    try:
        return _walk(top, path, flags, follow=False)
    finally:
        os.close(top)


def _walk(anchor: int, rel: str, flags: int, *, follow: bool) -> int:
    """``openat2(RESOLVE_BENEATH)`` in user space: the kernel never follows a link here."""
    stack: list[int] = []  # directories opened below the anchor; the last is the current one
    todo = rel.split("/")[::-1]  # components still to resolve, the next one last
    links = retries = 0
    try:
        while todo:
            name = todo.pop()
            cur = stack[-1] if stack else anchor
            if name in ("", "."):
                continue
            if name == "..":
                if not stack:
                    raise OSError(errno.EXDEV, "resolves outside the directory", rel)
                os.close(stack.pop())  # back to the descriptor we came from, not the parent
                continue
            final = not any(p not in ("", ".") for p in todo)
            try:
                fd = os.open(
                    name, (flags if final else _DIR_PATH) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur
                )
            except OSError as e:
                # A symlink fails with ELOOP (ENOTDIR when a directory was asked for).
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                try:
                    target = os.readlink(name, dir_fd=cur)
                except OSError:
                    # Not a symlink: a file mid-path (the open's own error), or a link
                    # replaced by a directory since the open, worth another look.
                    retries += 1
                    if retries > 3:
                        raise e from None
                    todo.append(name)
                    continue
                links += 1
                if not follow:
                    raise OSError(errno.ELOOP, "a symbolic link in the path", rel) from None
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel) from None
                if target.startswith("/"):
                    raise OSError(errno.EXDEV, "absolute symbolic link", rel) from None
                todo.extend(target.split("/")[::-1])
                continue
            if final:
                return fd
            stack.append(fd)
        # The path ended at a directory (a trailing "..", or the anchor itself).
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=stack[-1] if stack else anchor)
    finally:
        for fd in stack:
            os.close(fd)
