"""mows: a model-weight service that caches LLM weights in node memory and shares them."""

from __future__ import annotations

from ._crc import crc32, crc32_combine
from ._errors import (
    AccessDeniedError,
    CapacityError,
    ClusterError,
    ConfigError,
    Crc32FileError,
    DaemonError,
    DaemonUnavailableError,
    HeaderError,
    IntegrityError,
    ManifestError,
    MowsError,
    PeerError,
    ProtocolError,
    SourceError,
    SourceNotFoundError,
)
from .client import (
    DaemonFallbackWarning,
    ModelHandle,
    OriginUnreachableWarning,
    TensorSlice,
    iter_weights,
    load_state_dict,
    open_model,
)

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "CapacityError",
    "ClusterError",
    "ConfigError",
    "Crc32FileError",
    "DaemonError",
    "DaemonFallbackWarning",
    "DaemonUnavailableError",
    "HeaderError",
    "IntegrityError",
    "ManifestError",
    "ModelHandle",
    "MowsError",
    "OriginUnreachableWarning",
    "PeerError",
    "ProtocolError",
    "SourceError",
    "SourceNotFoundError",
    "TensorSlice",
    "__version__",
    "crc32",
    "crc32_combine",
    "iter_weights",
    "load_state_dict",
    "open_model",
]
