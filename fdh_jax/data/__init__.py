"""Data: sources (one per dataset layout, plus the synthetic set) and the grain pipeline.

The names below are imported on first use, so that importing a light submodule
(`fdh_jax.data.decode`, `fdh_jax.data.transforms`: NumPy and Pillow only, what a loaded export
needs) does not import every dataset source.
"""

from fdh_jax.common.lazy import lazy_exports

_EXPORTS = {
    "DatasetNotFoundError": "fdh_jax.data.sources",
    "make_source": "fdh_jax.data.sources",
    "SyntheticFineGrained": "fdh_jax.data.synthetic",
    "load_split": "fdh_jax.data.splits",
    "load_splits": "fdh_jax.data.splits",
    "validation_split": "fdh_jax.data.splits",
    "class_validation_split": "fdh_jax.data.splits",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
