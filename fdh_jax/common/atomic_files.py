"""Files that appear whole or not at all: write a temporary file beside the target, then rename.

A rename within one file system is atomic, so a reader (or a run restarted after a kill) sees
either the previous file or the complete new one, never half of it. The temporary name carries
the process id, so two processes writing the same target never write into one temporary file;
the last rename wins and both results are complete.
"""

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def fsync_directory(path: str | os.PathLike) -> None:
    """Makes the renames and new names inside directory `path` durable (a power cut after a
    rename can otherwise bring back the old name); a process kill never needs it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`write_bytes_atomically` for UTF-8 text."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def write_npz_atomically(path: str | os.PathLike, arrays: dict) -> Path:
    """`np.savez` of `arrays` (no pickle) to `path`, through `write_bytes_atomically`."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomically(path, buffer.getvalue())


def replace_directory(staging: Path, target: Path) -> None:
    """Moves the complete directory `staging` to `target`, replacing a previous `target`.

    The previous directory is first renamed aside, so at every moment `target` is either the
    old complete directory, absent for the instant between two renames, or the new one.
    """
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        aside.rmdir()
        target.rename(aside)
    staging.rename(target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
