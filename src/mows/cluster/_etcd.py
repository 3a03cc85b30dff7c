"""Connecting to etcd: TLS (server verification and client certificates), user/password
authentication, and gRPC options sized for the directory.

aetcd and grpc are imported only when a client is made: they cost ~100 ms at import.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError

if TYPE_CHECKING:
    from .._config import DaemonConfig

__all__ = ["EtcdSecurity", "KeyValue", "get_prefix_paged", "open_client", "parse_endpoint"]

# gRPC refuses replies over 4 MiB by default: a directory prefix of many nodes and models
# grows past that. Records themselves are bounded by the directory (see _directory.py).
MAX_RECEIVE = 64 * 2**20
_OPTIONS = {"grpc.max_receive_message_length": MAX_RECEIVE}
# Keys a range read returns at once: the directory's values are at most 64 KiB, so a page is
# at most a few MiB whatever the prefix's total (etcd's own request limit is 1.5 MiB a put).
PAGE_KEYS = 256


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int


async def get_prefix_paged(
    client: Any, prefix: bytes, *, page: int = PAGE_KEYS, keys_only: bool = False
) -> tuple[list[KeyValue], int]:
    """Every key under ``prefix`` as of one revision, read ``page`` keys at a time (aetcd's
    get_prefix reads the whole range in one reply); returns them and that revision."""
    import aetcd.utils
    from aetcd import exceptions, rpc

    end = aetcd.utils.prefix_range_end(prefix)
    key, revision = prefix, 0
    out: list[KeyValue] = []
    while True:
        request = client._build_get_range_request(key=key, range_end=end, keys_only=keys_only)
        request.limit = page
        request.revision = revision  # 0 on the first page: the current one
        try:
            reply = await client.kvstub.Range(
                request, timeout=client._timeout, metadata=client.metadata
            )
        except rpc.AioRpcError as e:  # as aetcd's @_handle_errors does
            exceptions._handle_exception(e)
        revision = revision or int(reply.header.revision)
        out += [KeyValue(kv.key, kv.value, kv.mod_revision) for kv in reply.kvs]
        if not reply.more or not reply.kvs:
            return out, revision
        key = reply.kvs[-1].key + b"\0"


@dataclass(frozen=True)
class EtcdSecurity:
    """What proves etcd to us and us to etcd; the PEM and password contents, read once."""

    ca: bytes | None = None  # roots for https:// endpoints; None: the system's
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: DaemonConfig) -> EtcdSecurity:
        """The daemon's etcd_* settings, their files read now."""
        return cls.load(
            ca_file=config.etcd_ca_file,
            cert_file=config.etcd_cert_file,
            key_file=config.etcd_key_file,
            user=config.etcd_user,
            password_file=config.etcd_password_file,
        )

    @classmethod
    def load(
        cls,
        *,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        user: str = "",
        password_file: str = "",
    ) -> EtcdSecurity:
        """Read the files now, so a missing one stops the daemon at start, naming it."""
        if bool(cert_file) != bool(key_file):
            raise ConfigError("etcd_cert_file and etcd_key_file: give both or neither")
        if bool(user) != bool(password_file):
            raise ConfigError("etcd_user and etcd_password_file: give both or neither")
        password = None
        if password_file:
            # A trailing newline is the file's, not the password's (echo pw > file).
            raw = _read(password_file, "etcd_password_file").rstrip(b"\r\n")
            try:
                password = raw.decode()
            except UnicodeDecodeError:
                raise ConfigError(f"etcd_password_file: {password_file}: not UTF-8") from None
        return cls(
            ca=_read(ca_file, "etcd_ca_file") if ca_file else None,
            cert=_read(cert_file, "etcd_cert_file") if cert_file else None,
            key=_read(key_file, "etcd_key_file") if key_file else None,
            user=user or None,
            password=password,
        )

    @property
    def tls_settings(self) -> bool:
        return self.ca is not None or self.cert is not None


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise ConfigError(f"{key}: {path}: {e.strerror}") from None


def parse_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """(host, port, tls) of ``https://HOST:PORT``, ``http://HOST:PORT`` or ``HOST:PORT``."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "http", endpoint
    host, _, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("http", "https") or not host or not port.isdigit():
        raise ConfigError(f"etcd: expected http(s)://HOST:PORT, got {endpoint!r}")
    if not 0 < int(port) < 65536:
        raise ConfigError(f"etcd: port out of range in {endpoint!r}")
    return host, int(port), scheme == "https"


def open_client(endpoint: str, security: EtcdSecurity, timeout: int = 3) -> Any:
    """An aetcd client (not yet connected) for ``endpoint``: TLS when it is https://."""
    import aetcd

    host, port, tls = parse_endpoint(endpoint)
    kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "username": security.user,
        "password": security.password,
        "timeout": timeout,
        "options": _OPTIONS,
    }
    if not tls:
        return aetcd.Client(**kwargs)
    import grpc

    roots = security.ca if security.ca is not None else _system_roots()
    credentials = grpc.ssl_channel_credentials(roots, security.key, security.cert)
    return _tls_client_class()(credentials, **kwargs)


def _system_roots() -> bytes | None:
    """The OS trust store (what curl and openssl trust); None: gRPC's own bundle."""
    cafile = ssl.get_default_verify_paths().cafile
    if not cafile:
        return None
    try:
        with open(cafile, "rb") as fh:
            return fh.read()
    except OSError:
        return None


@functools.cache
def _tls_client_class() -> type:
    import aetcd
    from aetcd import exceptions, rpc, watcher

    class TlsClient(aetcd.Client):  # type: ignore[misc]
        """aetcd.Client over TLS. aetcd 1.0.0's Client.connect always opens
        ``rpc.insecure_channel``; this mirrors that method with a secure channel (the only
        change), which is why pyproject pins aetcd < 1.1."""

        def __init__(self, credentials: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._credentials = credentials
            self._is_connecting: bool = False  # set by aetcd too; declared for mypy

        async def connect(self) -> None:
            if self._connected.is_set():
                return
            if self._is_connecting:  # another task is connecting: wait for it
                await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
                return
            self._is_connecting = True
            try:
                target = f"{self._host}:{self._port}"
                self.channel = rpc.secure_channel(
                    target, self._credentials, options=self._options.items()
                )
                if self._username is not None and self._password is not None:
                    self.auth_stub = rpc.AuthStub(self.channel)
                    request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                    resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                    self.metadata = (("token", resp.token),)
                self.kvstub = rpc.KVStub(self.channel)
                self.clusterstub = rpc.ClusterStub(self.channel)
                self.leasestub = rpc.LeaseStub(self.channel)
                self.maintenancestub = rpc.MaintenanceStub(self.channel)
                self._watcher = watcher.Watcher(
                    rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
                )
                self._connected.set()
            except rpc.AioRpcError as e:  # as aetcd's @_handle_errors does
                exceptions._handle_exception(e)
            finally:
                self._is_connecting = False

    return TlsClient
