"""The pre-training scan for unreadable images of all splits at once: cached, shared, reported once.

`scan_splits({"train": database, "test": query}, policy)` decodes every item of every split (as
`decode.find_bad_images` does), then applies `config.data.bad_images`:

- "error": one `BadImagesFoundError` listing every bad file of *every* split with its reason
  (scanning split by split and stopping at the first split with bad files would make a user fix,
  rerun, and meet the next split's list);
- "skip": the sources without the bad files, and one stderr line per bad file after a line with
  the count, so the loss is visible. A split left with no image at all is still an error.

Entries a source could not even list (`listing_errors`, e.g. a class folder that is a link loop)
count as bad files in both policies.

**Cache.** Decoding a whole dataset takes minutes and every start (train, resume, eval, each
process) would repeat it. The result of a split is stored as a small JSON file named by the
SHA-256 of everything that decides it: `SCAN_VERSION`, the Pillow version, `MAX_PIXELS`, the
source's type, name, split and image transform, the user id (file permissions decide
readability), and each file's path with its `(size, mtime_ns, mode)` (or the error of `stat` and
the link target, for dangling links and loops). A touched, rewritten or chmod-ed file therefore
changes the key and the split is scanned again; the policy is not in the key (switching
error -> skip reuses the scan). Files are written atomically (temporary file + `os.replace`), so
concurrent writers of the same key are harmless; an unreadable or corrupt cache file is ignored
with a warning and rewritten. Only sources whose items are files (`ImageListSource`) are cached;
TFDS records and the synthetic set are scanned every time (they have no per-item file to stat).
Default folder: `$FDH_JAX_CACHE/image_scan`, else `$XDG_CACHE_HOME/fdh_jax/image_scan`, else
`~/.cache/fdh_jax/image_scan`.

**Several processes.** With `jax.process_count() == P > 1` every process first looks up its
cache; unless every process has every split cached, process `p` decodes items `p::P` only and
the processes combine their findings with one `process_allgather` of a fixed-size `uint8` flag
per item (strings do not travel; each process then decodes the few flagged files of the others'
shares itself to get their reasons). Progress and the "skip" summary are printed by process 0
only; every process raises the same error, so every process exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from fdh_jax.data.decode import (
    BAD_IMAGE_POLICIES,
    MAX_PIXELS,
    BadImage,
    BadImageError,
    BadImagesFoundError,
    SubsetSource,
    _default_progress,
    find_bad_items,
)
from fdh_jax.data.sources.base import ImageListSource

# Bump when decoding changes which files are bad or why, so old cached scans are not reused.
SCAN_VERSION = 1


def default_cache_dir() -> Path:
    """Where scans are cached unless told otherwise (see the module docstring)."""
    root = os.environ.get("FDH_JAX_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "fdh_jax")
    return Path(os.path.expanduser(root)) / "image_scan"


def _file_state(path: str) -> list[Any]:
    """What of a file decides whether it decodes: size, mtime and mode, or why stat failed."""
    try:
        status = os.stat(path)
    except OSError as error:
        try:
            target: str | None = os.readlink(path)
        except OSError:
            target = None
        return ["error", error.errno, target]
    return [status.st_size, status.st_mtime_ns, status.st_mode]


def scan_key(source: Any) -> str | None:
    """The cache key of `source`'s scan (a SHA-256 hex digest), or None if it is not cacheable.

    Stats every file once (no decoding); see the module docstring for what goes into the key.
    """
    if not isinstance(source, ImageListSource):
        return None
    transform = source.image_transform
    header = {
        "scan_version": SCAN_VERSION,
        "pillow": PIL.__version__,
        "max_pixels": MAX_PIXELS,
        "type": f"{type(source).__module__}.{type(source).__qualname__}",
        "name": source.name,
        "split": source.split,
        "transform": None
        if transform is None
        else f"{transform.__module__}.{transform.__qualname__}",
        "euid": os.geteuid() if hasattr(os, "geteuid") else None,
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
    digest.update(files_digest(source.paths).encode("ascii"))
    return digest.hexdigest()


def files_digest(paths: Sequence[str]) -> str:
    """SHA-256 (hex) over each file's absolute path and state (size, mtime, mode, or why stat
    failed), in order: changes when any file is touched, rewritten, renamed, chmod-ed or removed,
    but not with the spelling of the dataset root (`../data/x` and `/work/data/x` share caches)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(
            json.dumps([os.path.abspath(path), _file_state(path)]).encode("utf-8") + b"\n"
        )
    return digest.hexdigest()


def _read_cache(cache_file: Path, source: Any) -> dict[int, BadImage] | None:
    """The cached `{index: BadImage}` of `source`, or None (absent, unreadable or corrupt)."""
    try:
        text = cache_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        warnings.warn(
            f"cannot read the image-scan cache {cache_file} ({error}); scanning again",
            stacklevel=3,  # scan_splits' caller
        )
        return None
    try:
        record = json.loads(text)
        if record["scan_version"] != SCAN_VERSION or record["num_items"] != len(source):
            raise ValueError("written for another scan version or source size")
        bad: dict[int, BadImage] = {}
        for index, path, reason in record["bad"]:
            if not (isinstance(index, int) and 0 <= index < len(source)):
                raise ValueError(f"item index {index!r} out of range")
            if not (isinstance(path, str) and isinstance(reason, str)):
                raise ValueError("path and reason must be strings")
            bad[index] = BadImage(path, reason)
        return bad
    except (ValueError, KeyError, TypeError) as error:
        warnings.warn(
            f"ignoring the corrupt image-scan cache {cache_file} ({type(error).__name__}: "
            f"{error}); scanning again",
            stacklevel=3,
        )
        return None


def _write_cache(cache_file: Path, source: Any, bad: Mapping[int, BadImage]) -> None:
    """Stores a scan atomically; failing to write only costs a scan next time (a warning)."""
    record = {
        "scan_version": SCAN_VERSION,
        "source": repr(source),
        "num_items": len(source),
        "bad": [[index, bad[index].path, bad[index].reason] for index in sorted(bad)],
    }
    temporary = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=cache_file.parent, prefix=cache_file.stem + ".", suffix=".tmp"
        )
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(temporary, cache_file)
    except OSError as error:
        warnings.warn(f"cannot write the image-scan cache {cache_file} ({error})", stacklevel=3)
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def _processes() -> tuple[int, int]:
    """(this process's index, number of processes). JAX is imported here, only when scanning, to
    keep `import fdh_jax.data` light."""
    import jax  # noqa: PLC0415

    return jax.process_index(), jax.process_count()


def _allgather(values: np.ndarray) -> np.ndarray:
    """`values` of every process stacked: `[num_processes, *values.shape]`. JAX is imported only
    when scanning, as in `_processes`."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(values))


def _recheck(source: Any, index: int) -> BadImage:
    """The reason for an item another process found bad, decoded here."""
    try:
        source[index]
    except BadImageError as error:
        return BadImage(error.path, error.reason)
    # Only if the processes do not see the same files (per-host copies that differ).
    return BadImage(source.paths[index], "unreadable on another process, readable on this one")


def _without_indices(source: Any, bad: Mapping[int, BadImage]) -> Any:
    if not bad:
        return source
    return SubsetSource(source, [i for i in range(len(source)) if i not in bad])


def scan_splits(
    sources: Mapping[str, Any],
    policy: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    max_workers: int | None = None,
    progress: Callable[[int, int, int, float], None] | None = _default_progress,
) -> dict[str, Any]:
    """Scans every split for unreadable images and applies `policy` to all of them at once.

    Args:
      sources: `{split: source}`, e.g. `{"train": database, "test": query}`.
      policy: `config.data.bad_images`: "error" or "skip" (see the module docstring).
      cache_dir: where scans are cached (default `default_cache_dir()`).
      use_cache: False to scan without reading or writing the cache.
      max_workers: decoding threads per process (as in `decode.find_bad_images`).
      progress: as in `decode.find_bad_images`; called on process 0 only.

    Returns:
      `{split: source}` in the order of `sources`: each source itself when it has no bad file,
      else (under "skip") a `SubsetSource` without them.

    Raises:
      BadImagesFoundError: under "error", listing every bad file of every split; under "skip",
        if a split has no readable image left.
      ValueError: an unknown policy.
    """
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    process, num_processes = _processes()
    if process != 0:
        progress = None
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_files = {
        split: directory / f"{key}.json"
        for split in sources
        if use_cache and (key := scan_key(sources[split])) is not None
    }
    found = _cached_scans(sources, cache_files, num_processes)
    to_scan = [split for split in sources if split not in found]
    for split in to_scan:
        share = range(process, len(sources[split]), num_processes)
        found[split] = find_bad_items(
            sources[split],
            share,
            max_workers=max_workers,
            progress=progress if process == 0 else None,
        )
    if num_processes > 1 and to_scan:
        _merge_across_processes(sources, to_scan, found)
    for split in to_scan:
        if split in cache_files:
            _write_cache(cache_files[split], sources[split], found[split])
    return _apply_policy(sources, found, policy, process)


def _cached_scans(
    sources: Mapping[str, Any], cache_files: Mapping[str, Path], num_processes: int
) -> dict[str, dict[int, BadImage]]:
    """The splits whose scan is cached (on every process, when there are several: the
    collectives that follow must be entered by every process alike)."""
    found = {}
    for split, cache_file in cache_files.items():
        cached = _read_cache(cache_file, sources[split])
        if cached is not None:
            found[split] = cached
    if num_processes > 1:
        splits = list(sources)
        have = np.array([split in found for split in splits], dtype=np.uint8)
        everywhere = _allgather(have).min(axis=0)
        for split, cached_everywhere in zip(splits, everywhere, strict=True):
            if not cached_everywhere:
                found.pop(split, None)
    return found


def _merge_across_processes(
    sources: Mapping[str, Any], scanned: list[str], found: dict[str, dict[int, BadImage]]
) -> None:
    """Each process scanned its share: gathers every process's bad indices into `found`."""
    flags = []
    for split in scanned:
        flag = np.zeros(len(sources[split]), dtype=np.uint8)
        flag[list(found[split])] = 1
        flags.append(flag)
    combined = _allgather(np.concatenate(flags)).max(axis=0)
    offset = 0
    for split in scanned:
        size = len(sources[split])
        for index in np.flatnonzero(combined[offset : offset + size]).tolist():
            if index not in found[split]:
                found[split][index] = _recheck(sources[split], index)
        offset += size


def _apply_policy(
    sources: Mapping[str, Any], found: Mapping[str, dict[int, BadImage]], policy: str, process: int
) -> dict[str, Any]:
    """`scan_splits`'s result from the bad files found: the sources as they are, an error
    listing them all, or the sources without them."""
    # Listing errors first (a folder the scan could not even enter), each reported once.
    bad_by_split: dict[str, list[BadImage]] = {}
    listed: set[str] = set()
    for split in sources:
        listing = [
            entry
            for entry in getattr(sources[split], "listing_errors", ())
            if entry.path not in listed
        ]
        listed.update(entry.path for entry in listing)
        bad = listing + [found[split][i] for i in sorted(found[split])]
        if bad:
            bad_by_split[split] = bad
    if not bad_by_split:
        return dict(sources)
    description = _describe(sources)
    if policy == "error":
        raise BadImagesFoundError(description, bad_by_split)
    kept = {split: _without_indices(sources[split], found[split]) for split in sources}
    for split, source in kept.items():
        if len(source) == 0:
            raise BadImagesFoundError(
                description,
                bad_by_split,
                advice=f"every image of split '{split}' is unreadable, nothing is left to use",
            )
    if process == 0:
        _print_skipped(description, bad_by_split)
    return kept


def _describe(sources: Mapping[str, Any]) -> str:
    names = sorted({str(getattr(source, "name", "?")) for source in sources.values()})
    return "/".join(names)


def _print_skipped(description: str, bad_by_split: Mapping[str, Sequence[BadImage]]) -> None:
    total = sum(len(bad) for bad in bad_by_split.values())
    counts = ", ".join(f"{split}: {len(bad)}" for split, bad in bad_by_split.items())
    lines = [f"skipping {total} unreadable image(s) of {description} ({counts}):"]
    for split, bad in bad_by_split.items():
        lines.extend(f"  {split}: {entry.path}: {entry.reason}" for entry in bad)
    print("\n".join(lines), file=sys.stderr, flush=True)
