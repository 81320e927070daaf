"""Data: sources (one per dataset layout, plus the synthetic set) and the grain pipeline.

The names below are imported on first use, so that importing a light submodule
(`fdh_jax.data.decode`, `fdh_jax.data.transforms`: NumPy and Pillow only, what a loaded export
needs) does not import every dataset source.
"""

import importlib

_EXPORTS = {
    "DatasetNotFoundError": "fdh_jax.data.sources",
    "make_source": "fdh_jax.data.sources",
    "SyntheticFineGrained": "fdh_jax.data.synthetic",
    "load_split": "fdh_jax.data.splits",
    "load_splits": "fdh_jax.data.splits",
    "validation_split": "fdh_jax.data.splits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fdh_jax.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
