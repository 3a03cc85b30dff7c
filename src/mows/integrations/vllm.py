"""vLLM: ``vllm serve MODEL --load-format=mows``.

Installed through the ``vllm.general_plugins`` entry point, so every vLLM process (each
tensor-parallel rank included) registers the ``mows`` load format. Every rank is a client of
the node's one daemon, so a node fetches a model once whatever its TP size. Options come from
``--model-loader-extra-config '{"socket": "/run/mows/mows.sock", "fallback": true}'``.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["register"]

log = logging.getLogger("mows.integrations")

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` hook: register the ``mows`` load format."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader("mows")(_loader_class())
    _registered = True


def _loader_class() -> type:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from ..client import get_session, iter_weights

    class MowsModelLoader(BaseModelLoader):  # type: ignore[misc]
        """Weights from the mows node pool: mapped, not copied, until they go to the GPU."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            extra = dict(getattr(load_config, "model_loader_extra_config", None) or {})
            self.socket = extra.pop("socket", None)
            self.fallback = bool(extra.pop("fallback", True))
            if extra:
                raise ValueError(f"mows load format: unknown extra config {sorted(extra)}")

        def download_model(self, model_config: Any) -> None:
            # Fetch into the pool now (no pin): load_weights then only maps.
            get_session(self.socket).open(str(model_config.model), pin=False)

        def load_weights(self, model: Any, model_config: Any) -> None:
            weights = iter_weights(model_config.model, socket=self.socket, fallback=self.fallback)
            loaded = model.load_weights(weights)
            if loaded is not None:
                expected = {n for n, _ in model.named_parameters()}
                missing = expected - set(loaded)
                if missing:
                    log.warning(
                        "mows: %d parameters not in the checkpoint: %s",
                        len(missing),
                        sorted(missing)[:5],
                    )

    return MowsModelLoader
