"""SHA-256 digests of named arrays and of files: index, cache and checkpoint checksums, model
fingerprints; `.npz` files that carry their own checksum (the hash index, multi-index tables)."""

import hashlib
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fdh_jax.common.atomic_files import write_npz_atomically


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


def save_checked_npz(path: str | os.PathLike, fields: Mapping[str, np.ndarray]) -> None:
    """Writes `fields` (which must include `format_version`) plus a `sha256` field over all of
    them to `path` atomically (no pickle)."""
    fields = dict(fields)
    fields["sha256"] = np.frombuffer(arrays_sha256(fields).encode("ascii"), np.uint8)
    write_npz_atomically(path, fields)


def load_checked_npz(
    path: str | os.PathLike, what: str, version: int, remedy: str, error: type[Exception]
) -> dict[str, np.ndarray]:
    """The fields of a file written by `save_checked_npz` (without `sha256`), or `error` with a
    one-line message naming the file: unreadable, not such a file, another `format_version`
    (then `remedy` says what to do) or a checksum mismatch. `what`: e.g. "hash index"."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            fields = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as problem:
        raise error(f"{path}: not a readable {what} file ({problem})") from problem
    if "format_version" not in fields or "sha256" not in fields:
        raise error(f"{path}: not a {what} file (no format_version/sha256)")
    found = int(fields["format_version"])
    if found != version:
        raise error(
            f"{path}: {what} format version {found}, this code reads version {version}; {remedy}"
        )
    stored = bytes(fields.pop("sha256")).decode("ascii", "replace")
    if stored != arrays_sha256(fields):
        raise error(f"{path}: checksum mismatch, the file is corrupted")
    return fields


# ------------------------------------------------------------------------ variable fingerprints
def flatten_variables(variables: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts of arrays -> `{"params/backbone/conv_init/kernel": array, ...}`."""
    flat = {}
    for key, value in variables.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten_variables(value, f"{name}/")
        else:
            flat[name] = value
    return flat


def unflatten_variables(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten_variables`."""
    nested: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def variables_fingerprint(variables: Mapping) -> str:
    """SHA-256 (hex) over every variable's name, dtype, shape and bytes, in name order."""
    flat = flatten_variables(variables)
    return arrays_sha256({name: np.asarray(jax.device_get(v)) for name, v in flat.items()})
