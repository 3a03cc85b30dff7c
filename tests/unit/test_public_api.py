from __future__ import annotations

import mows
import mows.manifest
import mows.sources


def test_exports_are_sorted_and_exist() -> None:
    for module in (mows, mows.manifest, mows.sources):
        names = list(module.__all__)
        assert names == sorted(names), module.__name__
        for name in names:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_one_error_tree() -> None:
    for name in mows.__all__:
        obj = getattr(mows, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and name.endswith("Error"):
            assert issubclass(obj, mows.MowsError), name
