"""Loading `configs/*.py` files outside the command line (notebooks, tests, scripts)."""

import importlib.util
from pathlib import Path

import ml_collections


def load_config(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns `get_config(arg)` of the config file at `path` (e.g. `configs/demo.py`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path.resolve()}")
    spec = importlib.util.spec_from_file_location(f"fdh_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()
