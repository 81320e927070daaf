"""Package attributes imported on first use (PEP 562), so that importing a package stays light."""

import importlib
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`: name -> the module that defines it.

    The first lookup of a name imports its module and stores the value in `namespace` (the
    package's globals), so later lookups skip `__getattr__`.
    """

    def __getattr__(name: str) -> object:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
