"""Reading the MATLAB list files of Stanford Dogs and Stanford Cars (scipy.io.loadmat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io


def load_mat(path: Path) -> dict[str, Any]:
    """`scipy.io.loadmat` with 1xN / Nx1 arrays squeezed; cell arrays become object arrays."""
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except (ValueError, TypeError, OSError) as error:
        raise ValueError(f"{path}: not a readable MATLAB file ({error})") from None


def mat_strings(values: Any) -> list[str]:
    """A MATLAB cell array (or char array) of strings, squeezed, as a list of `str`."""
    array = np.atleast_1d(np.asarray(values, dtype=object))
    return [
        str(np.asarray(value).reshape(-1)[0]) if np.ndim(value) else str(value) for value in array
    ]


def mat_ints(values: Any) -> np.ndarray:
    """A MATLAB numeric vector (or struct-field object array) as `int64 [N]`."""
    return np.atleast_1d(np.asarray(values)).astype(np.int64).reshape(-1)
