"""transformers models whose parameters are views of the node pool: no second copy.

``from_pretrained`` builds the model skeleton without initialising weights, then assigns every
checkpoint tensor as the parameter itself (``load_state_dict(assign=True)``), so N processes on
a node share one copy of the weights. Asking for a ``dtype`` other than the checkpoint's
converts, which copies those tensors into process memory (said in a log line).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from ..client import open_model

__all__ = ["from_pretrained"]

log = logging.getLogger("mows.integrations")


def from_pretrained(
    path: str | os.PathLike[str],
    *,
    socket: str | None = None,
    fallback: bool = True,
    dtype: Any = None,
    auto_class: str = "AutoModelForCausalLM",
    **kwargs: Any,
) -> Any:
    """Like ``AutoModelForCausalLM.from_pretrained(path)``, loaded through the mows daemon."""
    import torch

    tf: Any = importlib.import_module("transformers")
    handle = open_model(path, socket=socket, fallback=fallback)
    try:
        config_dir = os.path.dirname(handle.file_path("config.json"))
        config = tf.AutoConfig.from_pretrained(config_dir, **kwargs)
        state = handle.state_dict()
    finally:
        handle.close()  # the tensors keep the mappings (and the daemon pin) alive
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    target = dtype or (stored.pop() if len(stored) == 1 else getattr(config, "dtype", None))
    if isinstance(target, str):
        target = getattr(torch, target)
    converted = 0
    if target is not None:
        for name, t in state.items():
            if t.is_floating_point() and t.dtype != target:
                state[name] = t.to(target)
                converted += 1
    if converted:
        log.info(
            "converted %d tensors to %s: those are copies, not shared pages", converted, target
        )
    try:
        init: Any = importlib.import_module("transformers.initialization")  # v5
    except ImportError:
        init = tf.modeling_utils  # v4
    with init.no_init_weights():  # the random init would be thrown away
        model = getattr(tf, auto_class).from_config(config, dtype=target)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if _is_unset(model, k)]
    if missing:
        raise KeyError(f"{path}: the checkpoint lacks {len(missing)} parameters: {missing[:5]}")
    if result.unexpected_keys:
        log.warning(
            "%s: %d checkpoint tensors unused: %s",
            path,
            len(result.unexpected_keys),
            result.unexpected_keys[:5],
        )
    return model.eval()


def _is_unset(model: Any, name: str) -> bool:
    """A parameter still on the meta device or never assigned (tied ones are set by tie)."""
    try:
        t = model.get_parameter(name)
    except AttributeError:
        try:
            t = model.get_buffer(name)
        except AttributeError:
            return True
    return bool(t.is_meta)
