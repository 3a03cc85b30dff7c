from __future__ import annotations

import mows
import mows.manifest
import mows.sources
import mows.transport


def test_exports_are_sorted_and_exist() -> None:
    for module in (mows, mows.manifest, mows.sources, mows.transport):
        names = list(module.__all__)
        # isort-style, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions.
        kind = lambda n: 0 if n.isupper() else 1 if n[:1].isupper() else 2  # noqa: E731
        assert names == sorted(names, key=lambda n: (kind(n), n)), module.__name__
        assert len(set(names)) == len(names)
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_one_error_tree() -> None:
    for name in mows.__all__:
        obj = getattr(mows, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and name.endswith("Error"):
            assert issubclass(obj, mows.MowsError), name
