"""Daemon configuration: frozen, validated, read in one place.

Precedence: command-line flags > ``MOWS_*`` environment variables > TOML file > defaults.
Library code never reads the environment; ``load_daemon_config`` is the one function that does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigError

__all__ = [
    "DEFAULT_POOL_DIR",
    "DEFAULT_SOCKET",
    "DaemonConfig",
    "default_socket",
    "explain_daemon_config",
    "load_daemon_config",
    "parse_size",
]

DEFAULT_SOCKET = "/run/mows/mows.sock"
DEFAULT_POOL_DIR = "/dev/shm/mows"
SINGLE_NODE_CHUNK_SIZE = 64 * 2**20

_UNITS = {
    "": 2**30,  # a bare number is GB, as on the product page (binary: GiB)
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_size(value: str | int | float, key: str = "size") -> int:
    """``"200"`` / ``200`` = 200 GiB; ``"512MiB"``, ``"1.5G"``, ``"4096b"`` as written."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    text = str(value) if isinstance(value, int | float) else value.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{key}: cannot parse size {value!r} (examples: 200, 1.5GiB, 512MiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"{key}: size must be positive, got {value!r}")
    return size


def default_socket(env: Mapping[str, str] | None = None) -> str:
    """The socket clients use when none is given: ``MOWS_SOCKET``, then the default."""
    env = os.environ if env is None else env
    return env.get("MOWS_SOCKET") or DEFAULT_SOCKET


@dataclass(frozen=True)
class DaemonConfig:
    max_memory: int
    model_paths: tuple[str, ...] = ()
    allow_roots: tuple[str, ...] = ()
    crc32_file: str = "crc32.txt"
    sha256_file: str = "sha256sums.txt"  # SHA-256 digests checked when present; "" = never ask
    nic: str = "tcp"
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    pool_dir: str = DEFAULT_POOL_DIR
    chunk_size: int = 0  # bytes; 0 = auto: chosen per model from its size (choose_chunk_size)
    workers: int = 4
    sources: dict[str, Any] = field(default_factory=dict)  # options passed to open_source
    # cluster mode (off without etcd)
    etcd: tuple[str, ...] = ()
    cluster: str = "default"
    listen: str = "0.0.0.0:7470"
    advertise: str = ""
    node_id: str = ""
    cluster_secret_file: str = ""
    peer_encryption: bool = False  # AES-256-CTR on chunk bytes between peers (needs the secret)
    etcd_ca_file: str = ""  # PEM CA bundle for https:// endpoints; empty: the system roots
    etcd_cert_file: str = ""  # client certificate (PEM), with etcd_key_file
    etcd_key_file: str = ""
    etcd_user: str = ""  # etcd user/password auth, with etcd_password_file
    etcd_password_file: str = ""
    lease_ttl: int = 5
    peer_timeout: float = 30.0
    peer_connections: int = 4
    metrics_listen: str = ""  # HOST:PORT for Prometheus metrics; off when empty
    prefetch: str = "share"  # idle prefetch of model_paths: "share" (cluster share), "full", "off"
    prefetch_rate: int = 0  # bytes/s cap of prefetch; 0 = no cap
    prefetch_delay: float = 3.0  # seconds after start before prefetching (membership settles)
    drain_timeout: float = 10.0  # seconds SIGTERM waits for loads in progress
    load_timeout: float = 60.0  # seconds a load may wait for pool space before CapacityError
    # Background re-check of READY pool files against their chunk CRCs: a full pass per
    # scrub_interval seconds (0: only on request, `mows scrub`), never faster than scrub_rate.
    scrub_interval: float = 86400.0
    scrub_rate: int = 64 * 2**20  # bytes/s ceiling of the background scrub; 0 = no cap

    def __post_init__(self) -> None:
        if self.max_memory <= 0:
            raise ConfigError("max_memory: must be positive")
        if self.nic not in ("tcp", "ucx"):
            raise ConfigError(f"nic: must be 'tcp' or 'ucx', got {self.nic!r}")
        page = os.sysconf("SC_PAGE_SIZE")
        if self.chunk_size and (self.chunk_size < page or self.chunk_size % page):
            raise ConfigError(
                f"chunk_size: must be 'auto' (0) or a positive multiple of {page} bytes"
            )
        if not 1 <= self.workers <= 256:
            raise ConfigError("workers: must be between 1 and 256")
        if not self.socket:
            raise ConfigError("socket: must not be empty")
        if not 2 <= self.lease_ttl <= 600:
            raise ConfigError("lease_ttl: must be between 2 and 600 seconds")
        if self.peer_timeout <= 0:
            raise ConfigError("peer_timeout: must be positive")
        if not 1 <= self.peer_connections <= 64:
            raise ConfigError("peer_connections: must be between 1 and 64")
        if self.prefetch not in ("share", "full", "off"):
            raise ConfigError(f"prefetch: must be 'share', 'full' or 'off', got {self.prefetch!r}")
        if self.prefetch_rate < 0 or self.prefetch_delay < 0:
            raise ConfigError("prefetch_rate and prefetch_delay: must be >= 0")
        if self.drain_timeout < 0:
            raise ConfigError("drain_timeout: must be >= 0")
        if self.load_timeout < 0:
            raise ConfigError("load_timeout: must be >= 0")
        if not 0 <= self.scrub_interval < float("inf") or self.scrub_rate < 0:
            raise ConfigError("scrub_interval and scrub_rate: must be >= 0 (0: off, no cap)")
        for key in ("listen", "advertise", "metrics_listen"):
            value = getattr(self, key)
            if value and not re.fullmatch(r"\[?[^\s\]]*\]?:\d{1,5}", value):
                raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.cluster):
            raise ConfigError(
                f"cluster: names may use letters, digits, '.', '_', '-' ({self.cluster!r})"
            )
        if self.peer_encryption and not self.cluster_secret_file:
            raise ConfigError(
                "peer_encryption: needs cluster_secret_file (the key is derived from it)"
            )
        if bool(self.etcd_cert_file) != bool(self.etcd_key_file):
            raise ConfigError("etcd_cert_file and etcd_key_file: give both or neither")
        if bool(self.etcd_user) != bool(self.etcd_password_file):
            raise ConfigError("etcd_user and etcd_password_file: give both or neither")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError("socket_mode: must be an octal file mode such as 0o660")

    def cluster_secret(self) -> bytes | None:
        """The shared secret peers must prove, read from ``cluster_secret_file``."""
        if not self.cluster_secret_file:
            return None
        try:
            with open(self.cluster_secret_file, "rb") as fh:
                secret = fh.read().strip()
        except OSError as e:
            raise ConfigError(
                f"cluster_secret_file: {self.cluster_secret_file}: {e.strerror}"
            ) from None
        if len(secret) < 16:
            raise ConfigError("cluster_secret_file: the secret must be at least 16 bytes")
        return secret

    @property
    def model_chunk_size(self) -> int:
        """The chunk size each model's manifest is built with: as set, else by default 64 MiB
        on a single node (fewest origin requests: a range GET each) and auto in a cluster
        (model size / 256 within 1-64 MiB: small enough for chunks to pipeline between nodes)."""
        if self.chunk_size:
            return self.chunk_size
        return 0 if self.etcd else SINGLE_NODE_CHUNK_SIZE

    @property
    def roots(self) -> tuple[str, ...]:
        """Where clients may ask the daemon to read: the model paths and the allowed roots."""
        return self.model_paths + self.allow_roots


# TOML key / env suffix -> (field, converter)
_FIELDS: dict[str, tuple[str, Any]] = {
    "max_memory": ("max_memory", lambda v, k: parse_size(v, k)),
    "model_path": ("model_paths", lambda v, k: _str_list(v, k)),
    "model_paths": ("model_paths", lambda v, k: _str_list(v, k)),
    "allow_root": ("allow_roots", lambda v, k: _str_list(v, k)),
    "allow_roots": ("allow_roots", lambda v, k: _str_list(v, k)),
    "crc32_file": ("crc32_file", lambda v, k: _str(v, k)),
    "sha256_file": ("sha256_file", lambda v, k: _str(v, k)),
    "nic": ("nic", lambda v, k: _str(v, k)),
    "socket": ("socket", lambda v, k: _str(v, k)),
    "socket_mode": ("socket_mode", lambda v, k: _mode(v, k)),
    "pool_dir": ("pool_dir", lambda v, k: _str(v, k)),
    "chunk_size": ("chunk_size", lambda v, k: _chunk_size(v, k)),
    "workers": ("workers", lambda v, k: _int(v, k)),
    "etcd": ("etcd", lambda v, k: _str_list(v, k)),
    "cluster": ("cluster", lambda v, k: _str(v, k)),
    "listen": ("listen", lambda v, k: _str(v, k)),
    "advertise": ("advertise", lambda v, k: _str(v, k)),
    "node_id": ("node_id", lambda v, k: _str(v, k)),
    "cluster_secret_file": ("cluster_secret_file", lambda v, k: _str(v, k)),
    "peer_encryption": ("peer_encryption", lambda v, k: _bool(v, k)),
    "etcd_ca_file": ("etcd_ca_file", lambda v, k: _str(v, k)),
    "etcd_cert_file": ("etcd_cert_file", lambda v, k: _str(v, k)),
    "etcd_key_file": ("etcd_key_file", lambda v, k: _str(v, k)),
    "etcd_user": ("etcd_user", lambda v, k: _str(v, k)),
    "etcd_password_file": ("etcd_password_file", lambda v, k: _str(v, k)),
    "lease_ttl": ("lease_ttl", lambda v, k: _int(v, k)),
    "peer_timeout": ("peer_timeout", lambda v, k: _float(v, k)),
    "peer_connections": ("peer_connections", lambda v, k: _int(v, k)),
    "metrics_listen": ("metrics_listen", lambda v, k: _str(v, k)),
    "drain_timeout": ("drain_timeout", lambda v, k: _float(v, k)),
    "load_timeout": ("load_timeout", lambda v, k: _float(v, k)),
    "prefetch": ("prefetch", lambda v, k: _str(v, k)),
    "prefetch_rate": ("prefetch_rate", lambda v, k: 0 if str(v) == "0" else parse_size(v, k)),
    "prefetch_delay": ("prefetch_delay", lambda v, k: _float(v, k)),
    "scrub_interval": ("scrub_interval", lambda v, k: _float(v, k)),
    "scrub_rate": ("scrub_rate", lambda v, k: 0 if str(v) == "0" else parse_size(v, k)),
}


def _bare(v: object) -> bool:
    return isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())


def _chunk_size(v: object, key: str) -> int:
    """``auto`` (or 0): chosen per model; a bare number is MiB; else a size such as 512KiB."""
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ConfigError(f"{key}: expected 'auto' or a size, got {v!r}")
    if str(v).strip().lower() in ("auto", "0"):
        return 0
    return parse_size(v if not _bare(v) else f"{v}MiB", key)


def _str(v: object, key: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {v!r}")
    return v


def _str_list(v: object, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(p for p in v.split(",") if p)
    if isinstance(v, list | tuple) and all(isinstance(p, str) for p in v):
        return tuple(v)
    raise ConfigError(f"{key}: expected a list of strings, got {v!r}")


def _bool(v: object, key: str) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: expected true or false, got {v!r}")


def _int(v: object, key: str) -> int:
    try:
        return int(str(v), 10)
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {v!r}") from None


def _float(v: object, key: str) -> float:
    try:
        return float(str(v))
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {v!r}") from None


def _mode(v: object, key: str) -> int:
    try:
        return v if isinstance(v, int) else int(str(v), 8)
    except ValueError:
        raise ConfigError(f"{key}: expected an octal mode such as 660, got {v!r}") from None


def load_daemon_config(
    flags: Mapping[str, object],
    *,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> DaemonConfig:
    """Merge ``flags`` (TOML-style keys; None = not given) over env, the TOML file, defaults."""
    return explain_daemon_config(flags, config_file=config_file, env=env)[0]


def explain_daemon_config(
    flags: Mapping[str, object],
    *,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[DaemonConfig, dict[str, str]]:
    """The configuration and, for each field, where its value came from."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def apply(key: str, raw: object, where: str) -> None:
        spec = _FIELDS.get(key)
        if spec is None:
            raise ConfigError(
                f"{where}: unknown setting {key!r} (known: {', '.join(sorted(_FIELDS))})"
            )
        name, conv = spec
        values[name] = conv(raw, f"{where} {key}".strip())
        origins[name] = where

    path = config_file or env.get("MOWS_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        section = doc.pop("daemon", doc)
        sources = section.pop("sources", None)
        for key, raw in section.items():
            apply(key, raw, path)
        if sources is not None:
            if not isinstance(sources, dict):
                raise ConfigError(f"{path}: [sources] must be a table")
            values["sources"] = dict(sources)
            origins["sources"] = path
    for key in _FIELDS:
        raw = env.get(f"MOWS_{key.upper()}")
        if raw is not None and raw != "":
            apply(key, raw, f"MOWS_{key.upper()}")
    for key, raw in flags.items():
        if raw is None or raw == ():
            continue
        apply(key, raw, "--" + key.replace("_", "-"))
    if "max_memory" not in values:
        raise ConfigError(
            "max_memory: required (--max-memory GB, MOWS_MAX_MEMORY or the config file)"
        )
    try:
        config = DaemonConfig(**values)
    except TypeError as e:  # pragma: no cover - guarded by _FIELDS
        raise ConfigError(str(e)) from None
    for f in dataclasses.fields(DaemonConfig):
        origins.setdefault(f.name, "default")
    return config, origins


def replace(config: DaemonConfig, **changes: Any) -> DaemonConfig:
    return dataclasses.replace(config, **changes)
