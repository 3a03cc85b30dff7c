"""SGLang: pass ``MowsLoader`` as ``load_format`` to SGLang's engine API.

SGLang's ``get_model_loader`` instantiates ``load_config.load_format`` when it is a class, so
``sglang.Engine(model_path=..., load_format=mows.integrations.sglang.loader_class())`` loads
through the node's daemon. Weights reach ``model.load_weights`` from ``mows.iter_weights``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["loader_class"]


def loader_class(socket: str | None = None, fallback: bool = True) -> type:
    """A subclass of SGLang's ``DefaultModelLoader`` whose weights come from the mows pool."""
    from sglang.srt.model_loader.loader import DefaultModelLoader

    from ..client import get_session, iter_weights

    class MowsLoader(DefaultModelLoader):  # type: ignore[misc]
        def download_model(self, model_config: Any) -> None:
            get_session(socket).open(str(model_config.model_path), pin=False)

        def _get_weights_iterator(self, source: Any) -> Any:
            return iter_weights(source.model_or_path, socket=socket, fallback=fallback)

    return MowsLoader
