"""Model handles: tensors that are views of shared pool pages.

Each safetensors pool file is mapped ``MAP_PRIVATE`` with write permission: reads share the
pool's physical pages with every other process (zero-copy), while an engine that modifies a
tensor in place gets a private copy of just that page instead of corrupting the pool, and
torch sees a writable buffer. A tensor keeps its mapping alive; the daemon pin is released
when the handle is closed and the last tensor of the model is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import mmap
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .._errors import CapacityError, DaemonUnavailableError, IntegrityError, MowsError
from ..manifest import FileEntry, Manifest, TensorInfo, build_manifest
from ..sources import open_source
from ._session import get_session

if TYPE_CHECKING:
    import torch

__all__ = [
    "DaemonFallbackWarning",
    "ModelHandle",
    "OriginUnreachableWarning",
    "TensorSlice",
    "iter_weights",
    "load_state_dict",
    "open_model",
]

log = logging.getLogger("mows.client")

ProgressFn = Callable[[int, int], None]

# A stream's fetch-ahead that found no room in the pool tries again this often (each time
# the consumer comes back for a tensor).
AHEAD_RETRY = 0.25


class DaemonFallbackWarning(UserWarning):
    """No daemon answered: the model was read straight from its source."""


class OriginUnreachableWarning(UserWarning):
    """The model's origin could not be asked whether it changed: the daemon opened the
    version it has cached (complete and verified), which may be older than the origin's."""


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": torch.uint16,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": torch.uint32,
        "F32": torch.float32,
        "I64": torch.int64,
        "U64": torch.uint64,
        "F64": torch.float64,
        "C64": torch.complex64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", torch.uint8),
    }
    return table[name]


class _PinGuard:
    """Calls ``release`` once the handle is closed and every mapping it made is collected."""

    def __init__(self, release: Callable[[], None] | None) -> None:
        self._release = release
        self._count = 1  # the handle itself
        self._lock = threading.Lock()

    def track(self, obj: object) -> None:
        with self._lock:
            self._count += 1
        # Not at interpreter exit (finalize's default): the mapping may outlive that (a
        # tensor in a module global), and its pin must too; the kernel ends the connection,
        # and with it the pins, only after unmapping.
        weakref.finalize(obj, self.drop).atexit = False

    def drop(self) -> None:
        with self._lock:
            self._count -= 1
            fire = self._count == 0
        if fire and self._release is not None:
            self._release()

    @property
    def released(self) -> bool:
        """The handle is closed and no mapping of it is left: its pin is going or gone."""
        return self._count == 0


class TensorSlice:
    """A lazily sliced tensor (like safetensors' ``get_slice``): index it to get a view."""

    def __init__(self, handle: ModelHandle, info: TensorInfo) -> None:
        self._handle = handle
        self.info = info

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    def get_dtype(self) -> str:
        return self.info.dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._handle.get_tensor(self.info.name)[index]


class ModelHandle:
    """A model's tensors, mapped from the pool (or from the source in fallback mode)."""

    def __init__(
        self,
        manifest: Manifest,
        files: Mapping[str, str],
        *,
        model: str = "",
        release: Callable[[], None] | None = None,
        stats: Mapping[str, float] | None = None,
    ) -> None:
        self.manifest = manifest
        self.model = model
        self.version = model  # the version id: every tensor of this handle comes from it
        self.files = dict(files)  # relative path -> local file (pool file, or source file)
        self.stats = dict(stats or {})
        self._guard = _PinGuard(release)
        self._maps: dict[str, mmap.mmap] | None = {}
        self._index: dict[str, tuple[FileEntry, TensorInfo]] = {}
        self._metadata: dict[str, str] = {}
        for entry in manifest.files:
            if entry.safetensors is None or entry.path not in self.files:
                continue  # a streaming handle holds some of the files only
            self._metadata.update(entry.safetensors.metadata)
            for t in entry.safetensors.tensors:
                if t.end > entry.size:
                    raise MowsError(
                        f"{entry.path}: tensor {t.name!r} lies past the end of the file"
                    )
                self._index[t.name] = (entry, t)
        self._lock = threading.Lock()

    # -- the safetensors-like API -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._index)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def tensor_info(self, name: str) -> TensorInfo:
        return self._index[name][1]

    def get_slice(self, name: str) -> TensorSlice:
        if name not in self._index:
            raise KeyError(name)
        return TensorSlice(self, self._index[name][1])

    def get_tensor(self, name: str) -> torch.Tensor:
        """A tensor viewing the shared pages: no copy."""
        import torch

        entry, info = self._index[name]
        dtype = _torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = self._map(entry.path)
        count = info.nbytes // dtype.itemsize
        flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=info.start)
        return flat.view(info.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.get_tensor(name) for name in self._index}

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors in file order, then offset order: sequential over the pages."""
        for entry in self.manifest.files:
            if entry.safetensors is not None and entry.path in self.files:
                for t in entry.safetensors.tensors:
                    yield t.name, self.get_tensor(t.name)

    @property
    def released(self) -> bool:
        """Closed, and no tensor of it is left (its pin is released)."""
        return self._guard.released

    def file_path(self, rel: str) -> str:
        """The local path of any model file (config.json, tokenizer...), read-only."""
        return self.files[rel]

    def _map(self, rel: str) -> mmap.mmap:
        with self._lock:
            if self._maps is None:
                raise MowsError("the model handle is closed")
            m = self._maps.get(rel)
            if m is None:
                try:
                    fd = os.open(self.files[rel], os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:  # retired (it failed a scrub) before we mapped it
                    raise MowsError(
                        f"{rel} was taken out of the pool after this model was opened (its "
                        "bytes failed a check): open the model again"
                    ) from None
                try:
                    # Held by the mapping's own descriptor (mmap keeps a duplicate) for as
                    # long as it lives: a daemon restarted meanwhile, which never saw our
                    # pins, sees the lock and does not evict the file under us.
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    size = os.fstat(fd).st_size
                    m = mmap.mmap(
                        fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                    )
                finally:
                    os.close(fd)
                self._maps[rel] = m
                self._guard.track(m)
            return m

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the handle's hold; tensors already handed out stay valid while referenced."""
        with self._lock:
            if self._maps is None:
                return
            self._maps = None
        self._guard.drop()

    def __enter__(self) -> ModelHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_maps", None) is not None:
            self.close()


def open_model(
    path: str | os.PathLike[str],
    *,
    socket: str | None = None,
    fallback: bool = True,
    crc32_file: str | None = None,
    progress: ProgressFn | None = None,
) -> ModelHandle:
    """Open a model through the local daemon, which fetches it into the pool if needed.

    The handle is bound to one version of the model: whatever happens at the origin while it
    is open, every tensor it gives comes from that version. If the origin cannot be reached
    and the daemon holds a cached version, that version is opened with an
    ``OriginUnreachableWarning``. ``crc32_file`` is the daemon's configuration: naming
    another one is a ``ConfigError`` (it is used when reading directly, without a daemon).

    With no daemon reachable, reads the source directly with one ``DaemonFallbackWarning``
    (or raises ``DaemonUnavailableError`` if ``fallback`` is False).
    """
    location = os.fspath(path)
    if "://" not in location:
        location = os.path.abspath(location)
    try:
        session = get_session(socket)
    except DaemonUnavailableError as e:
        if not fallback:
            raise
        warnings.warn(
            f"{e}; reading {location} directly from its source", DaemonFallbackWarning, stacklevel=2
        )
        return _open_direct(location, crc32_file or "crc32.txt")
    ready = session.open(location, crc32_file, progress)
    if ready.stale:
        warnings.warn(
            f"{location}: the origin could not be reached ({ready.stale}); opened the cached "
            f"version {ready.model}",
            OriginUnreachableWarning,
            stacklevel=2,
        )
    model = ready.model
    return ModelHandle(
        ready.manifest,
        ready.files,
        model=model,
        release=lambda: session.release(model),
        stats={
            "seconds": ready.seconds,
            "bytes": ready.manifest.total_bytes,
            "bytes_from_origin": ready.bytes_from_origin,
            "bytes_from_peers": ready.bytes_from_peers,
            "bytes_from_pool": ready.bytes_from_pool,
        },
    )


def _open_direct(location: str, crc32_file: str) -> ModelHandle:
    """Fallback: map local source files directly, after checking them against crc32.txt."""
    from .._verify import crc32_of_files
    from ..manifest import FileStat
    from ..sources._local import LocalSource

    source = open_source(location)
    if not isinstance(source, LocalSource):
        raise DaemonUnavailableError(f"{location}: reading a remote model needs the mows daemon")
    manifest = build_manifest(source, crc32_file=crc32_file)
    listed = [FileStat(f.path, f.size, f.mtime_ns) for f in manifest.files if f.crc32 is not None]
    actual = crc32_of_files(source, listed)
    for f in manifest.files:
        if f.crc32 is None:
            continue
        got = actual[f.path]
        if isinstance(got, Exception):
            raise got
        if got != f.crc32:
            raise IntegrityError(f"{location}/{f.path}", f.crc32, got, source="origin")
    files = {f.path: os.path.join(source.root, f.path) for f in manifest.files}
    return ModelHandle(manifest, files)


def load_state_dict(
    path: str | os.PathLike[str], *, socket: str | None = None, fallback: bool = True
) -> dict[str, torch.Tensor]:
    """Every tensor of the model, as views of the shared pool pages."""
    with open_model(path, socket=socket, fallback=fallback) as handle:
        return handle.state_dict()


def iter_weights(
    path: str | os.PathLike[str],
    *,
    socket: str | None = None,
    fallback: bool = True,
    stream: bool | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs for engines' ``load_weights``, in file order.

    A model that does not fit the pool (``CapacityError``) is streamed: files are fetched
    one ahead of the consumer and released as soon as it has moved past them, so the pool
    never holds more than two of them. ``stream=True`` always streams, ``False`` never.

    The file ahead is fetched only if the pool has room for it now: a stream never waits
    for space while it holds a file, so streams sharing a tight pool (each holding its
    current file, each needing the next) cannot wait on each other. Without that room, the
    last tensor of the current file is yielded as a private copy, and the next file is
    waited for once the consumer has moved past the current one, whose pin then goes: a
    stream needs room for one file at a time. A consumer that keeps tensors of the files it
    moved past keeps them in the pool, and is not streaming: its stream may then wait for
    space up to the daemon's ``--load-timeout``, and fails with a ``CapacityError`` naming
    the files it still holds.
    """
    if not stream:
        try:
            handle = open_model(path, socket=socket, fallback=fallback)
        except CapacityError:
            if stream is False:
                raise
            log.info("%s does not fit the pool: streaming it file by file", path)
        else:
            with handle:
                yield from handle.iter_weights()
            return
    yield from _stream(os.fspath(path), socket)


def _stream(path: str, socket: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    location = path if "://" in path else os.path.abspath(path)
    first = get_session(socket)
    head = first.open(location, files=[], pin=False)
    # Every file is then asked for by version: an update at the origin mid-stream is never
    # mixed in (the old version's files stay fetchable, and are checked, by its manifest).
    version, manifest = head.model, head.manifest
    if head.stale:
        warnings.warn(
            f"{location}: the origin could not be reached ({head.stale}); streaming the cached "
            f"version {version}",
            OriginUnreachableWarning,
            stacklevel=3,
        )
    order = [f.path for f in manifest.files if f.path.endswith(".safetensors")]
    # Two connections: the next file loads on one while the consumer reads the other's. Both
    # live as long as the process, like its main one: a pin must outlast the stream while a
    # tensor the consumer kept still maps its file.
    sessions = (first, get_session(socket, lane="stream-ahead"))

    def fetch(i: int, wait: bool) -> ModelHandle | None:
        """File ``i``, pinned; None if ``wait`` is False and the pool has no room now."""
        session, rel = sessions[i % 2], order[i]
        try:
            ready = session.open(location, files=[rel], version=version, wait=wait)
        except CapacityError:
            if wait:
                raise
            return None  # not now: fetched once this stream has let go of its current file
        model = ready.model
        # Released (and evicted first) once the consumer has moved past the file and no
        # tensor of it is left: the pool never counts less than what is mapped.
        return ModelHandle(
            ready.manifest,
            ready.files,
            model=model,
            release=lambda: session.release(model, [rel], consumed=True),
        )

    def fetch_after(i: int, passed: list[ModelHandle]) -> ModelHandle:
        """File ``i``, waiting for room: this stream holds no other file by now, unless the
        consumer keeps tensors of files it moved past (``passed``)."""
        for s in sessions:  # what this stream let go of counts before what it asks for
            s._wait_releases()
        try:
            got = fetch(i, True)
        except CapacityError as e:
            held = [rel for h in passed if not h.released for rel in h.files]
            raise CapacityError(
                f"{location}: streaming needs room for one file at a time, and "
                f"{order[i]} ({manifest.file(order[i]).size:,} bytes) found none"
                + (
                    f" while the consumer still keeps tensors of {', '.join(held)} (a "
                    "consumer that keeps tensors of the files it moved past is not "
                    "streaming: the pool must hold all of them)"
                    if held
                    else ""
                )
                + f": {e}"
            ) from None
        assert got is not None
        return got

    def tensor_names(handle: ModelHandle) -> list[str]:
        return [
            t.name
            for e in handle.manifest.files
            if e.safetensors is not None and e.path in handle.files
            for t in e.safetensors.tensors
        ]

    with ThreadPoolExecutor(1, thread_name_prefix="mows-stream") as ahead:
        pending: Future[ModelHandle | None] | None = None  # fetching the next file ahead
        nxt: ModelHandle | None = None  # the next file, fetched ahead
        passed: list[ModelHandle] = []  # files the consumer moved past, pins not yet gone
        handle: ModelHandle | None = None
        tensor: torch.Tensor | None = None
        try:
            for i in range(len(order)):
                more = i + 1 < len(order)
                handle, nxt = nxt, None
                passed = [h for h in passed if not h.released]
                if handle is None:  # no room was found ahead: wait for it
                    handle = fetch_after(i, passed)
                tried = -AHEAD_RETRY
                with handle:
                    names = tensor_names(handle)
                    for k, name in enumerate(names):
                        last = k == len(names) - 1
                        if more and nxt is None:
                            if pending is not None and (last or pending.done()):
                                done, pending = pending, None
                                nxt = done.result()
                            # Never waits for space (a stream that waits while it holds a
                            # file can wait on another that does the same), and only while
                            # this stream holds just this file (the consumer, back from a
                            # tensor of it, has let go of the file before): two at most.
                            if (
                                nxt is None
                                and pending is None
                                and all(h.released for h in passed)
                                and (last or time.monotonic() - tried >= AHEAD_RETRY)
                            ):
                                tried = time.monotonic()
                                pending = ahead.submit(fetch, i + 1, False)
                                if last:
                                    done, pending = pending, None
                                    nxt = done.result()
                        tensor = handle.get_tensor(name)
                        if last and more and nxt is None:
                            # No room for the next file: it is waited for once this one's
                            # pin is gone, so the tensor the consumer holds meanwhile (the
                            # last one it got) must not map this file.
                            tensor = tensor.clone()
                        yield name, tensor
                        tensor = None
                passed.append(handle)
        except Exception:
            # The error's traceback keeps this frame (and cycles through it: the future that
            # raised it): not the last tensor it yielded, whose mapping keeps its file's pin
            # once the caller is done with the tensor. Not on GeneratorExit (a consumer that
            # stops early): nothing holds the frame then, and a collection costs.
            tensor = handle = None
            passed = []
            gc.collect()
            raise
        finally:
            if nxt is not None:
                nxt.close()  # fetched ahead, never read: release it
            if pending is not None and not pending.cancel():
                with contextlib.suppress(MowsError, OSError):
                    got = pending.result()
                    if got is not None:
                        got.close()  # fetched ahead, never read: release it
