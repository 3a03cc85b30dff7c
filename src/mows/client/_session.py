"""One connection per process to the local daemon, shared by every model it opens.

Pins live with this connection: the daemon drops them when it closes, however the process
ends (SIGKILL included). Releases are queued and sent by a background thread, so they are
safe to trigger from garbage-collection finalizers on any thread.
"""

from __future__ import annotations

import atexit
import os
import queue
import select
import socket
import threading
from collections.abc import Callable

import msgspec

from .. import _protocol as p
from .._config import default_socket
from .._errors import DaemonUnavailableError, ProtocolError

__all__ = ["Session", "get_session"]


class Session:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.pid = os.getpid()
        self.closed = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            p.send_frame(sock, p.Hello(p.PROTOCOL_VERSION, os.getpid()))
            welcome = p.decode_response(p.recv_frame(sock))
            sock.settimeout(None)
        except OSError as e:
            sock.close()
            raise DaemonUnavailableError(
                f"no mows daemon answers on {path}: {e.strerror or e}"
            ) from None
        if isinstance(welcome, p.Error):
            sock.close()
            p.raise_error(welcome)
        if not isinstance(welcome, p.Welcome):
            sock.close()
            raise ProtocolError(f"{path}: unexpected greeting {type(welcome).__name__}")
        self._sock = sock
        self._request_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._releases: queue.SimpleQueue[p.Release | None] = queue.SimpleQueue()
        self._unsent = 0  # releases queued and not yet sent
        self._sent = threading.Condition()
        threading.Thread(target=self._release_loop, name="mows-release", daemon=True).start()

    def _send(self, msg: msgspec.Struct) -> None:
        with self._send_lock:
            p.send_frame(self._sock, msg)

    def _recv(self) -> p.Response:
        try:
            return p.decode_response(p.recv_frame(self._sock))
        except (OSError, ConnectionError) as e:
            self.closed = True
            raise DaemonUnavailableError(
                f"lost the connection to the daemon on {self.path}: {e}"
            ) from None

    def open(
        self,
        path: str,
        crc32_file: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        pin: bool = True,
        files: list[str] | None = None,
        version: str | None = None,
        wait: bool = True,
    ) -> p.Ready:
        """Have the daemon fetch ``path`` (or only ``files`` of it) into the pool; ``pin``
        keeps them there while this connection holds them (the caller then owes one
        ``release`` with the same ``files``). ``version`` asks for that exact version (a
        reader that must not see an update made at the origin meanwhile). ``wait=False``:
        a ``CapacityError`` at once if the pool has no room now, instead of waiting for it."""
        self._wait_releases()  # what this process let go of counts before what it asks for
        with self._request_lock:
            try:
                self._send(p.Open(path, crc32_file, pin, files, version, wait))
            except OSError as e:
                self.closed = True
                raise DaemonUnavailableError(
                    f"lost the connection to the daemon on {self.path}: {e}"
                ) from None
            while True:
                msg = self._recv()
                if isinstance(msg, p.Progress):
                    if progress is not None:
                        progress(msg.done, msg.total)
                elif isinstance(msg, p.Ready):
                    return msg
                elif isinstance(msg, p.Error):
                    p.raise_error(msg)
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} while opening {path}")

    def status(self) -> dict[str, object]:
        return self._ask(p.Status())

    def prefetch(self, path: str) -> dict[str, object]:
        """Add a model to the daemon's idle prefetch list."""
        return self._ask(p.Prefetch(path))

    def reload(self) -> dict[str, object]:
        """Have the daemon re-read its model list (as SIGHUP does)."""
        return self._ask(p.Reload())

    def scrub(self) -> dict[str, object]:
        """Have the daemon re-check every pool file against its chunk CRCs now (a full scrub
        pass; bad files are dropped and fetched again on their next open); its summary."""
        return self._ask(p.Scrub())

    def _ask(self, request: msgspec.Struct) -> dict[str, object]:
        with self._request_lock:
            self._send(request)
            msg = self._recv()
        if isinstance(msg, p.Error):
            p.raise_error(msg)
        if not isinstance(msg, p.StatusReply):
            raise ProtocolError(f"unexpected {type(msg).__name__} for {type(request).__name__}")
        return msg.status

    def release(
        self, model: str, files: list[str] | None = None, *, consumed: bool = False
    ) -> None:
        """Drop one pin on ``model`` (or on ``files``); safe to call from a finalizer."""
        if os.getpid() == self.pid and not self.closed:
            with self._sent:
                self._unsent += 1
            self._releases.put(p.Release(model, files, consumed))

    def _wait_releases(self, timeout: float = 2.0) -> None:
        with self._sent:
            self._sent.wait_for(lambda: self._unsent == 0 or self.closed, timeout)

    def _release_loop(self) -> None:
        while True:
            msg = self._releases.get()
            if msg is None:
                return
            try:
                self._send(msg)
            except OSError:
                self.closed = True
                return
            finally:
                with self._sent:
                    self._unsent -= 1
                    self._sent.notify_all()

    def hung_up(self) -> bool:
        """The daemon closed the connection (it restarted, say): between requests it sends
        nothing, so end-of-file waiting on the socket means it is gone."""
        try:
            # select first: on a socket with a timeout, recv waits for data whatever its flags
            if not select.select([self._sock], [], [], 0)[0]:
                return False  # nothing to read: alive
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # another thread read what was there: alive
            return False
        except (OSError, ValueError):  # ValueError: closed under us
            return True

    def close(self) -> None:
        self.closed = True
        self._releases.put(None)
        self._sock.close()


_sessions: dict[tuple[str, str], Session] = {}
_lock = threading.Lock()


def get_session(path: str | None = None, lane: str = "") -> Session:
    """This process's connection to the daemon on ``path`` (default: MOWS_SOCKET, then
    /run/mows/mows.sock), made on first use and remade if it was lost. Another ``lane`` is
    another connection of the same lifetime (requests on one connection run one at a time)."""
    path = path or default_socket()
    with _lock:
        session = _sessions.get((path, lane))
        if session is None or session.closed or session.pid != os.getpid() or session.hung_up():
            if session is not None and session.pid == os.getpid():
                # The daemon went (a restart): its pins went with it. Closed even if a
                # failed send or receive marked it closed already: that left its socket open.
                session.close()
            session = _sessions[(path, lane)] = Session(path)
        return session


def _after_fork() -> None:
    # The child must not share the parent's socket (or send releases for the parent's pins).
    _sessions.clear()


def _close_all() -> None:
    """At exit: stop the sessions but leave their sockets to the kernel. Tensors still alive
    (an engine's weights, a traceback) map pool files until the process is gone, and the
    daemon drops a connection's pins when it closes; the kernel closes a dying process's
    files only after unmapping its memory, so the pins outlive every mapping."""
    with _lock:
        for session in _sessions.values():
            session.closed = True
            session._releases.put(None)
            session._sock.detach()  # not closed here, and no "unclosed socket" warning
        _sessions.clear()


os.register_at_fork(after_in_child=_after_fork)
atexit.register(_close_all)
