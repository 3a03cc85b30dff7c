"""Talking to the local daemon and handing out zero-copy tensors."""

from __future__ import annotations

from ._model import (
    DaemonFallbackWarning,
    ModelHandle,
    OriginUnreachableWarning,
    TensorSlice,
    iter_weights,
    load_state_dict,
    open_model,
)
from ._session import Session, get_session

__all__ = [
    "DaemonFallbackWarning",
    "ModelHandle",
    "OriginUnreachableWarning",
    "Session",
    "TensorSlice",
    "get_session",
    "iter_weights",
    "load_state_dict",
    "open_model",
]
