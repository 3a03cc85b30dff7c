"""vLLM: ``--load-format mows``.

Installed through the ``vllm.general_plugins`` entry point, so every vLLM process (each
tensor-parallel rank included) registers the ``mows`` load format. Every rank is a client of
the node's one daemon, so a node fetches a model once whatever its TP size.

``--model-loader-extra-config`` keys (JSON):

- ``socket``: the daemon's socket [``MOWS_SOCKET``, then ``/run/mows/mows.sock``];
- ``fallback``: with no daemon, read the files directly (checked against crc32.txt) with a
  warning [true]; false makes an absent daemon an error at once;
- ``prefetch``: start the pool fetch when loading begins, while vLLM builds the model, rather
  than when it asks for the first weight [true];
- ``model``: the weights' location for the daemon, e.g. an ``http(s)://`` URL, when vLLM's
  ``--model`` is a local directory of config and tokenizer files [vLLM's ``--model``].

vLLM 0.32 never calls a loader's ``download_model``; ``load_model`` is where a loader may start
early, so the fetch starts there, in a thread, and its progress goes to vLLM's log.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["register"]

# A child of vLLM's logger, so messages appear in vLLM's log with its format.
log = logging.getLogger("vllm.mows")

PROGRESS_EVERY = 5.0  # seconds between progress lines in vLLM's log

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` hook: register the ``mows`` load format."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader("mows")(_loader_class())
    _registered = True


class _Prefetch:
    """Fetch the model into the pool on a connection of its own, logging progress."""

    def __init__(self, model: str, socket: str | None) -> None:
        self.model = model
        self.socket = socket
        self.error: BaseException | None = None
        self._last = 0.0
        self._thread = threading.Thread(target=self._run, name="mows-prefetch", daemon=True)
        self._thread.start()

    def _progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY or done == total:
            self._last = now
            log.info(
                "mows: %s: %.2f of %.2f GiB in the pool", self.model, done / 2**30, total / 2**30
            )

    def _run(self) -> None:
        from .._config import default_socket
        from ..client import Session

        try:
            session = Session(self.socket or default_socket())
        except Exception as e:  # no daemon: load_weights decides (fallback or error)
            self.error = e
            return
        try:
            started = time.perf_counter()
            ready = session.open(self.model, progress=self._progress, pin=False)
            log.info(
                "mows: %s in the pool after %.2f s (%.2f GiB from origin, %.2f from peers, "
                "%.2f already cached)",
                self.model,
                time.perf_counter() - started,
                ready.bytes_from_origin / 2**30,
                ready.bytes_from_peers / 2**30,
                ready.bytes_from_pool / 2**30,
            )
        except Exception as e:  # the open in load_weights reports it
            self.error = e
        finally:
            session.close()

    def join(self) -> None:
        self._thread.join()


def _loader_class() -> type:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from ..client import get_session, iter_weights

    class MowsModelLoader(BaseModelLoader):  # type: ignore[misc]
        """Weights from the mows node pool: mapped, not copied, until they go to the device."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            extra = dict(getattr(load_config, "model_loader_extra_config", None) or {})
            self.socket = extra.pop("socket", None)
            self.fallback = bool(extra.pop("fallback", True))
            self.prefetch = bool(extra.pop("prefetch", True))
            model = extra.pop("model", None)
            if model is not None and not isinstance(model, str):
                raise ValueError(f"mows load format: 'model' must be a string, not {model!r}")
            self.model: str | None = model
            if extra:
                raise ValueError(
                    f"mows load format: unknown --model-loader-extra-config keys {sorted(extra)}"
                    " (known: socket, fallback, prefetch, model)"
                )

        def weights(self, model_config: Any) -> str:
            """Where the daemon reads the weights: the ``model`` key, else vLLM's --model."""
            return self.model or str(model_config.model)

        def download_model(self, model_config: Any) -> None:
            # Fetch into the pool now (no pin): load_weights then only maps.
            get_session(self.socket).open(self.weights(model_config), pin=False)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            # Start filling the pool while vLLM builds the model; load_weights joins the fetch.
            if self.prefetch:
                _Prefetch(self.weights(model_config), self.socket)
            return super().load_model(vllm_config, model_config, prefix)

        def load_weights(self, model: Any, model_config: Any) -> None:
            started = time.perf_counter()
            where = self.weights(model_config)
            weights = iter_weights(where, socket=self.socket, fallback=self.fallback)
            loaded = model.load_weights(weights)
            log.info(
                "mows: weights of %s loaded from the pool in %.2f s",
                where,
                time.perf_counter() - started,
            )
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
