"""Image decoding with Pillow, and the pre-training scan for unreadable images.

`decode_image` turns any file a dataset may hold into `uint8 [H, W, 3]` RGB:

- grayscale (`L`, `1`, `I`, `I;16*`, `F`) is replicated to three channels; 16- and 32-bit integer
  images are scaled from 0..65535 to 0..255 (`round(x / 257)`), float images are clipped to
  0..255;
- palette (`P`) images are expanded through their palette (with the palette's transparency, if any,
  handled as alpha below);
- images with alpha (`RGBA`, `LA`, `PA`, `RGBa`, `La`) are **composited on white**: transparent
  pixels of product photos and icons are meant to be seen on a page, and dropping alpha instead
  exposes whatever colour the encoder left under them (often black or noise);
- CMYK (including Adobe's inverted CMYK JPEGs, which Pillow already undoes) goes through Pillow's
  plain `convert("RGB")`; embedded ICC profiles are ignored, as every peer's loader does;
- the **EXIF orientation** tag is applied by default (`apply_exif_orientation=True`), so the array
  is the image as viewers show it; phone photos in user folders are otherwise sideways. Peers'
  loaders (torchvision `ImageFolder`, `tf.image.decode_jpeg`) ignore the tag; in the standard
  fine-grained datasets almost no file carries a non-trivial one, so results stay comparable;
- animated GIF/WebP: the first frame.

Unreadable files raise `BadImageError(path, reason)`: missing, empty (0 bytes), not a regular
file (a FIFO named `.jpg` would block a plain `open` forever, so files are opened non-blocking
and checked with `fstat` first), a dangling symbolic link or a link loop, no read permission, not
an image (an HTML page saved as `.jpg` is named as such; EPS is refused, as Pillow would run
Ghostscript on it), truncated, a decompression bomb, or an undecodable mode.

Decompression bombs are refused by `MAX_PIXELS` from the header alone, before any pixel is
allocated, whatever `PIL.Image.MAX_IMAGE_PIXELS` says; so the memory of one decode is bounded by
a fixed multiple of `MAX_PIXELS` (Pillow's 4-byte pixels, a converted copy or two, the 3-byte
array), and a scan runs at most `max_workers` decodes at once. Truncated JPEGs are never filled
with grey: decoding relies on Pillow's default `ImageFile.LOAD_TRUNCATED_IMAGES = False` and
forces the full decode with `.load()`; `decode_image` refuses to run if some other code switched
that flag on.

`find_bad_images` decodes every item of a source (in threads; Pillow releases the GIL while
decoding) and returns the unreadable ones; `fdh_jax.data.image_scan.scan_splits` applies
`config.data.bad_images` to all splits at once ("error": stop and list every bad file, "skip":
drop them), with a cache.
"""

from __future__ import annotations

import concurrent.futures
import errno
import functools
import io
import os
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

BAD_IMAGE_POLICIES = ("error", "skip")
# Pillow's own default MAX_IMAGE_PIXELS (~89.5 megapixels): above any camera photo (a 48 MP phone
# photo is about half), far below a bomb. Pillow only *raises* at twice its limit and its limit
# can be switched off globally, hence a limit of our own.
MAX_PIXELS = 89_478_485
_SHOWN_SKIPPED_PATHS = 10  # how many paths the "skip" warning of one source names


class BadImageError(Exception):
    """An image file that cannot be decoded: `path` (or a description of the bytes) and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep both fields when pickled across grain worker processes
        return (type(self), (self.path, self.reason))


class BadImage(NamedTuple):
    """One unreadable image found by `find_bad_images`."""

    path: str
    reason: str


_FIX_OR_SKIP = "fix or remove them, or set --config.data.bad_images=skip to train without them"


class BadImagesFoundError(RuntimeError):
    """Unreadable images found under the "error" policy: the message lists every one of them.

    Every bad file is listed (not the first few), so one run tells the whole clean-up job; the
    count and the way out are on the first line for when the list is long.

    Args:
      source_description: what was scanned, e.g. "folder/train" or "folder".
      bad_images: the bad images, or `{split: bad images}` to list them split by split.
      advice: what to do about them (the end of the first line).
    """

    def __init__(
        self,
        source_description: str,
        bad_images: Sequence[BadImage] | Mapping[str, Sequence[BadImage]],
        advice: str = _FIX_OR_SKIP,
    ):
        self.source_description = source_description
        self.advice = advice
        if isinstance(bad_images, Mapping):
            self.bad_by_split = {split: list(bad) for split, bad in bad_images.items()}
        else:
            self.bad_by_split = {"": list(bad_images)}
        self.bad_images = [bad for split_bad in self.bad_by_split.values() for bad in split_bad]
        counts = ", ".join(
            f"{split}: {len(bad)}" for split, bad in self.bad_by_split.items() if split
        )
        lines = [
            f"{len(self.bad_images)} unreadable image(s) in {source_description}"
            + (f" ({counts})" if counts else "")
            + f"; {advice}:"
        ]
        for split, split_bad in self.bad_by_split.items():
            prefix = f"{split}: " if split else ""
            lines.extend(f"  {prefix}{bad.path}: {bad.reason}" for bad in split_bad)
        super().__init__("\n".join(lines))

    def __reduce__(self):  # picklable with both fields, like BadImageError
        return (type(self), (self.source_description, self.bad_by_split, self.advice))


# ---------------------------------------------------------------------------- decoding


def _image_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Converts a loaded Pillow image of any mode to `uint8 [H, W, 3]` RGB (see module doc)."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image)
        if mode == "F":
            gray = np.clip(np.nan_to_num(values), 0.0, 255.0)
        else:
            gray = np.clip(values.astype(np.float64) / 257.0, 0.0, 255.0)
        gray = np.rint(gray).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return rgb


def os_error_reason(error: OSError, path: str | None = None) -> str:
    """A short reason for an error of `open`/`stat`/`scandir` on `path` (links named as such)."""
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(error, FileNotFoundError):
        if path is not None and os.path.islink(path):
            try:
                return f"dangling symbolic link (-> {os.readlink(path)})"
            except OSError:  # replaced meanwhile: still a link that led nowhere
                return "dangling symbolic link"
        return "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"{type(error).__name__}: {error.strerror or error}"


def _open_regular_file(path: str, label: str) -> io.BufferedReader:
    """Opens `path` for reading if it is a non-empty regular file, else raises BadImageError.

    O_NONBLOCK makes opening a FIFO or a device return at once instead of waiting for a writer;
    `fstat` on the open descriptor then refuses it (no window between a check and the open).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise BadImageError(label, os_error_reason(error, path)) from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            kind = "a directory" if stat.S_ISDIR(status.st_mode) else "a FIFO, socket or device"
            raise BadImageError(label, f"not a regular file ({kind})")
        if status.st_size == 0:
            raise BadImageError(label, "empty file (0 bytes)")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


# Formats Pillow opens that decoding refuses: Pillow "decodes" EPS by running Ghostscript on the
# file (where installed), and a PostScript program can loop forever; no dataset ships EPS photos.
_REFUSED_FORMATS = frozenset({"EPS"})


@functools.cache
def _decodable_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so Image.OPEN is complete
    return tuple(name for name in Image.OPEN if name not in _REFUSED_FORMATS)


def _unrecognised_reason(head: bytes) -> str:
    """Why bytes that no Pillow plugin accepts are not an image, from their first bytes."""
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in start:
        return "not an image: an HTML page (a saved web page or a download error?)"
    if start.startswith((b"<?xml", b"<svg")):
        return "not a supported image: XML/SVG"
    if start.startswith(b"%!ps") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return "not a supported image: PostScript/EPS (refused: decoding would run it)"
    return "not a recognised image format"


def _decode_open_file(
    file: Any, label: str, apply_exif_orientation: bool, max_pixels: int | None
) -> np.ndarray:
    """Decodes an open binary file to RGB; every failure becomes BadImageError(label, reason)."""
    try:
        with Image.open(file, formats=_decodable_formats()) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                # Image.open read the header only: nothing of the image is allocated yet.
                raise BadImageError(
                    label,
                    f"decompression bomb: {width}x{height} = {width * height:,} pixels, over "
                    f"the limit of {max_pixels:,} (refused before decoding)",
                )
            image.load()
            if image.width == 0 or image.height == 0:
                raise BadImageError(label, f"empty image ({image.width}x{image.height})")
            if apply_exif_orientation:
                oriented = ImageOps.exif_transpose(image)
                image = oriented if oriented is not None else image
            return np.ascontiguousarray(_image_to_rgb_array(image))
    except BadImageError:
        raise
    except UnidentifiedImageError:
        file.seek(0)
        raise BadImageError(label, _unrecognised_reason(file.read(512))) from None
    except Image.DecompressionBombError as error:  # Pillow's own limit, if lower than ours
        raise BadImageError(label, f"decompression bomb: {error}") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        # Malformed headers reach these in some Pillow plugins (Pillow's own fuzz tests accept
        # them); a scan must report the file, not crash on it.
        IndexError,
        KeyError,
        TypeError,
        ZeroDivisionError,
    ) as error:
        # Pillow reports truncation as OSError("image file is truncated ..."), corrupt data as
        # OSError / SyntaxError / ValueError, and unconvertible modes as ValueError.
        raise BadImageError(label, f"{type(error).__name__}: {error}") from None


def decode_image(
    path_or_bytes: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    apply_exif_orientation: bool = True,
    max_pixels: int | None = MAX_PIXELS,
) -> np.ndarray:
    """Decodes one image file (or its bytes) to RGB.

    Args:
      path_or_bytes: a file path, or the encoded bytes of an image.
      name: what to call the image in errors (defaults to the path, or "<N bytes>").
      apply_exif_orientation: rotate/flip as the EXIF orientation tag says.
      max_pixels: refuse images with more pixels (width x height, read from the header before
        decoding); None for no limit of our own (Pillow's global one still applies).

    Returns:
      image: `uint8 [H, W, 3]` RGB, C-contiguous.

    Raises:
      BadImageError: the file cannot be read or decoded (see the module docstring for why).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process: truncated "
            "images would be silently filled with grey. Set it back to False."
        )
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        label = name or f"<{len(path_or_bytes)} bytes>"
        if len(path_or_bytes) == 0:
            raise BadImageError(label, "empty file (0 bytes)")
        return _decode_open_file(
            io.BytesIO(path_or_bytes), label, apply_exif_orientation, max_pixels
        )
    path = os.fspath(path_or_bytes)
    label = name or path
    with _open_regular_file(path, label) as file:
        return _decode_open_file(file, label, apply_exif_orientation, max_pixels)


# ---------------------------------------------------------------------------- scanning


def _default_progress(done: int, total: int, num_bad: int, elapsed: float) -> None:
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(
        f"checking images: {done}/{total} ({num_bad} unreadable), {rate:.0f} img/s, "
        f"ETA {eta:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def find_bad_images(
    source: Any,
    *,
    max_workers: int | None = None,
    progress: Callable[[int, int, int, float], None] | None = _default_progress,
    progress_every_s: float = 10.0,
) -> list[BadImage]:
    """Decodes every item of `source` and lists those that cannot be decoded.

    Uses `source[i]` itself, so what is checked is exactly what training reads (crops, TFDS bytes
    included). Items are decoded in a thread pool and discarded.

    Args:
      source: any object following the source contract (`len`, `__getitem__`, `paths`).
      max_workers: decoding threads (default: 2 x CPU count, at most 32).
      progress: called as `progress(done, total, num_bad, elapsed_s)` at most every
        `progress_every_s` seconds and once at the end of scans that took longer than that;
        None for silence.
      progress_every_s: seconds between progress calls.

    Returns:
      bad_images: `BadImage(path, reason)` in index order; empty when all decode.
    """
    bad = find_bad_items(
        source,
        range(len(source)),
        max_workers=max_workers,
        progress=progress,
        progress_every_s=progress_every_s,
    )
    return [bad[i] for i in sorted(bad)]


def find_bad_items(
    source: Any,
    indices: Sequence[int],
    *,
    max_workers: int | None = None,
    progress: Callable[[int, int, int, float], None] | None = _default_progress,
    progress_every_s: float = 10.0,
) -> dict[int, BadImage]:
    """`find_bad_images` over the items `indices` only (one process's share of a scan).

    Returns:
      `{index: BadImage}` for the items of `indices` that cannot be decoded.
    """
    total = len(indices)
    if max_workers is None:
        max_workers = min(32, 2 * (os.cpu_count() or 1))

    def check(index: int) -> BadImage | None:
        try:
            source[index]
        except BadImageError as error:
            return BadImage(error.path, error.reason)
        return None

    bad: dict[int, BadImage] = {}
    start = last_report = time.monotonic()
    done = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        # Submit in chunks so a huge source does not hold a million futures at once.
        chunk = 4096
        for chunk_start in range(0, total, chunk):
            chunk_indices = [int(i) for i in indices[chunk_start : chunk_start + chunk]]
            for index, result in zip(chunk_indices, pool.map(check, chunk_indices), strict=True):
                done += 1
                if result is not None:
                    bad[index] = result
                now = time.monotonic()
                if progress is not None and now - last_report >= progress_every_s:
                    progress(done, total, len(bad), now - start)
                    last_report = now
    if progress is not None and last_report != start:
        progress(done, total, len(bad), time.monotonic() - start)
    return bad


class SubsetSource:
    """A view of a source restricted to `indices`, with the same contract attributes.

    `labels: int32 [len(indices)]`, `paths`, `class_names`, `num_classes`, `name`, `split` follow
    the parent; class indices are unchanged (a class may end up with no images).
    """

    def __init__(self, parent: Any, indices: Sequence[int] | np.ndarray):
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(parent)):
            raise IndexError(f"subset indices out of range for a source of {len(parent)} items")
        self.labels = np.asarray(parent.labels, dtype=np.int32)[self.indices]
        self.paths = [parent.paths[i] for i in self.indices]
        self.class_names = list(parent.class_names)
        self.num_classes = int(parent.num_classes)
        self.name = parent.name
        self.split = parent.split

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.parent[int(self.indices[index])]

    def __getattr__(self, name: str) -> Any:
        # A parent of stored stage-map views (`fdh_jax.training.feature_cache.StageMapViews`) also
        # offers `num_views`, `model_inputs` and `view_inputs(index, view)`: so does the subset.
        if name not in ("num_views", "model_inputs", "view_inputs"):
            raise AttributeError(name)
        value = getattr(self.__dict__.get("parent"), name)  # AttributeError if the parent lacks it
        if name != "view_inputs":
            return value
        return lambda index, view: value(int(self.indices[index]), view)

    def __repr__(self) -> str:
        return f"SubsetSource({self.parent!r}, {len(self)} of {len(self.parent)} items)"


def without_images(source: Any, bad_images: Iterable[BadImage | tuple[str, str] | str]) -> Any:
    """Returns `source` without the items whose path is listed in `bad_images`.

    Args:
      source: a source (contract: `paths` aligned with indices).
      bad_images: `BadImage`s / `(path, reason)` pairs from `find_bad_images`, or bare paths.

    Returns:
      `source` itself when nothing is removed, else a `SubsetSource` view.
    """
    bad_paths = {item if isinstance(item, str) else item[0] for item in bad_images}
    if not bad_paths:
        return source
    keep = [i for i, path in enumerate(source.paths) if path not in bad_paths]
    return SubsetSource(source, keep)
