"""SHA-256 digests of named arrays and of files: index, cache and checkpoint checksums, model
fingerprints."""

import hashlib
import os
from collections.abc import Mapping

import numpy as np


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) over every array's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """`{"bytes", "sha256"}` of a file: what `files_problem` checks it against later."""
    return {"bytes": os.stat(path).st_size, "sha256": file_sha256(path)}


def files_problem(directory: str | os.PathLike, records: Mapping[str, Mapping]) -> str | None:
    """Why the files `records` names under `directory` (relative path -> `file_record`) are not
    those recorded: the first missing, resized or altered one; None if all match."""
    for name, expected in records.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.stat(path).st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} expected"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None
