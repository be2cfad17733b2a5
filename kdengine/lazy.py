"""Package names that load on first use (PEP 562), so a package's light modules import without torch."""

import importlib


def lazy_getattr(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package``: ``exports`` maps each public name to the submodule defining it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
