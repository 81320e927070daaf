"""Any folder of class sub-folders (docs/design.md, "Contracts"), e.g. `configs/folder.py`.

Layout searched, in this order:

    DIR/images/<class>/<file>     (if DIR/images/ holds at least one class folder)
    DIR/<class>/<file>

Only entries directly inside a class folder count; names starting with "." are ignored; image
extensions are jpg, jpeg, png, bmp, webp, gif in any case. Every entry with an image extension
that is not a directory is an image, including dangling symbolic links, link loops and special
files: they then fail to decode and the bad-image scan (`data.bad_images`) names them, instead of
vanishing from the dataset unseen. A class folder that cannot be listed (no permission, a link
loop) is not a traceback either: it lands in `listing_errors`, which the scan reports with the bad
files. Class index = position of the class folder name in sorted (code-point) order.

Split:
- if `DIR/split.csv` exists (header `path,split`; `path` relative to DIR, e.g.
  `images/Blue_Jay/0001.jpg`; `split` in {train, test}) it decides: listed files only, each at most
  once, each must exist inside a class folder (a listed path with nothing there is a
  `DatasetNotFoundError`; one that is there but unreadable is a bad image). The classes are those
  of the listed files; folders are not listed, so `listing_errors` stays empty.
- otherwise each class is split on its own: its files in sorted order are permuted with a
  generator seeded by `(seed, crc32(class name))`, and the first `round(test_fraction * n)`
  (at most n - 1, so every class keeps a train image) are the test split. The split of one class
  therefore does not change when other classes are added or removed.
"""

from __future__ import annotations

import csv
import os
import stat
import zlib
from pathlib import Path

import numpy as np

from fdh_jax.data.decode import BadImage, os_error_reason
from fdh_jax.data.sources.base import ImageListSource, check_split, resolve_root
from fdh_jax.data.sources.opening import DatasetFiles

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
SPLIT_FILE = "split.csv"

_LAYOUT = """\
  DIR/images/<class>/<image file>   or   DIR/<class>/<image file>
  DIR/split.csv                     optional: columns path,split (path relative to DIR,
                                    split = train|test); without it a seeded per-class split
  image files: .jpg .jpeg .png .bmp .webp .gif"""
_HOW_TO_GET = "any folder of your own images, one sub-folder per class"
_FILES = DatasetFiles("folder", _LAYOUT, _HOW_TO_GET)


def _is_image_entry(entry: os.DirEntry) -> bool:
    """An entry with an image extension that is not a directory (see the module docstring)."""
    if (
        entry.name.startswith(".")
        or os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS
    ):
        return False
    try:
        return not entry.is_dir()
    except OSError:  # a link loop: listed, so that decoding reports it
        return True


def _class_folder_files(class_dir: Path) -> list[str]:
    """Sorted image entry names directly inside one class folder (OSError if unlistable)."""
    with os.scandir(class_dir) as entries:
        return sorted(entry.name for entry in entries if _is_image_entry(entry))


def list_class_folders(directory: Path) -> tuple[dict[str, list[str]], list[BadImage]]:
    """The class folders of `directory` with their image entries, and what could not be listed.

    Returns:
      classes: `{class name: sorted image entry names}` in sorted class order, only classes with
        at least one image entry.
      listing_errors: `BadImage(path, reason)` for each entry that may be a class folder but
        could not be listed: a link loop, a folder without read permission. Dangling links and
        plain files at this level are not class folders and are ignored, as they always were.
    """
    with os.scandir(directory) as entries:
        names = sorted(entry.name for entry in entries if not entry.name.startswith("."))
    classes: dict[str, list[str]] = {}
    errors: list[BadImage] = []
    for name in names:
        path = directory / name
        try:
            files = _class_folder_files(path) if stat.S_ISDIR(os.stat(path).st_mode) else []
        except FileNotFoundError:  # a dangling link (or removed meanwhile): not a folder
            continue
        except OSError as error:  # a link loop, or a folder that cannot be read
            errors.append(BadImage(str(path), f"cannot list folder: {os_error_reason(error)}"))
            continue
        if files:
            classes[name] = files
    return classes, errors


def _class_folders(directory: Path) -> list[str]:
    """Sorted names of sub-folders of `directory` that hold at least one image entry."""
    return list(list_class_folders(directory)[0])


def find_images_directory(root: Path) -> Path:
    """The folder whose sub-folders are the classes: `root/images` if it has any, else `root`."""
    if not root.is_dir():
        raise _FILES.not_found(root)
    nested = root / "images"
    try:
        if nested.is_dir() and _class_folders(nested):
            return nested
        if _class_folders(root):
            return root
    except OSError as error:  # the dataset folder itself cannot be listed
        raise _FILES.not_found(f"{error.filename or root} ({os_error_reason(error)})") from None
    raise _FILES.not_found(root / "<class>" / "<image file>")


def _something_at(path: Path) -> bool:
    """Whether `path` names a directory entry at all, even a broken or unreadable one.

    A listed file that is there but unreadable (a dangling link, no permission) is a bad image
    the scan names with its reason; only a path with nothing there is a missing file.
    """
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:  # e.g. a folder on the way without search permission: there, unreadable
        return True
    return True


def seeded_test_mask(num_images: int, class_name: str, seed: int, test_fraction: float):
    """Which of a class's `num_images` (sorted) files are test images.

    Returns:
      is_test: `bool [num_images]`, `min(round(test_fraction * n), n - 1)` of them True.
    """
    num_test = min(int(round(test_fraction * num_images)), num_images - 1)
    generator = np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])
    is_test = np.zeros(num_images, dtype=bool)
    is_test[generator.permutation(num_images)[:num_test]] = True
    return is_test


def read_split_csv(split_file: Path) -> list[tuple[str, str]]:
    """Rows `(relative path, split)` of a split.csv, validated (header, split names, duplicates)."""
    with open(split_file, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["path", "split"]:
            raise ValueError(f"{split_file}: the first line must be the header 'path,split'")
        rows: list[tuple[str, str]] = []
        seen: set[str] = set()
        for line_number, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{split_file}:{line_number}: expected 'path,split', got {row}")
            relative_path, split = row[0].strip(), row[1].strip()
            if split not in ("train", "test"):
                raise ValueError(
                    f"{split_file}:{line_number}: split must be train or test, got {split!r}"
                )
            if relative_path in seen:
                raise ValueError(f"{split_file}:{line_number}: {relative_path} listed twice")
            seen.add(relative_path)
            rows.append((relative_path, split))
    if not rows:
        raise ValueError(f"{split_file}: no rows")
    return rows


class FolderSource(ImageListSource):
    """Images in class folders; see the module docstring for layout and split rules."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        seed: int = 0,
        test_fraction: float = 0.5,
        name: str = "folder",
    ):
        check_split(split)
        self.root = resolve_root(root)
        images_dir = find_images_directory(self.root)
        split_file = self.root / SPLIT_FILE
        if split_file.is_file():
            paths, class_of_path, class_names = self._listed_split(images_dir, split_file, split)
            self.split_rule = f"{split_file}"
        else:
            if not 0.0 < test_fraction < 1.0:
                raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
            paths, class_of_path, class_names = self._seeded_split(
                images_dir, split, seed, test_fraction
            )
            self.split_rule = f"seeded per-class split (seed={seed}, test_fraction={test_fraction})"
        index_of_class = {class_name: i for i, class_name in enumerate(class_names)}
        labels = [index_of_class[c] for c in class_of_path]
        super().__init__(
            name=name, split=split, paths=paths, labels=labels, class_names=class_names
        )

    def _seeded_split(
        self, images_dir: Path, split: str, seed: int, test_fraction: float
    ) -> tuple[list[str], list[str], list[str]]:
        files_of_class, self.listing_errors = list_class_folders(images_dir)
        class_names = list(files_of_class)
        paths: list[str] = []
        classes: list[str] = []
        for class_name, files in files_of_class.items():
            is_test = seeded_test_mask(len(files), class_name, seed, test_fraction)
            for file_name, test in zip(files, is_test, strict=True):
                if test == (split == "test"):
                    paths.append(str(images_dir / class_name / file_name))
                    classes.append(class_name)
        return paths, classes, class_names

    def _listed_split(
        self, images_dir: Path, split_file: Path, split: str
    ) -> tuple[list[str], list[str], list[str]]:
        rows = read_split_csv(split_file)
        images_dir_parts = images_dir.relative_to(self.root).parts
        class_of_row: list[str] = []
        for relative_path, _ in rows:
            parts = Path(relative_path).parts
            inside = parts[: len(images_dir_parts)] == images_dir_parts
            if not inside or len(parts) != len(images_dir_parts) + 2:
                raise ValueError(
                    f"{split_file}: {relative_path} is not <class>/<file> inside {images_dir}"
                )
            class_of_row.append(parts[-2])
        class_names = sorted(set(class_of_row))
        paths: list[str] = []
        classes: list[str] = []
        missing: list[str] = []
        for (relative_path, row_split), class_name in zip(rows, class_of_row, strict=True):
            if row_split != split:
                continue
            path = self.root / relative_path
            if not _something_at(path):
                missing.append(str(path))
            paths.append(str(path))
            classes.append(class_name)
        if missing:
            shown = "\n  ".join(missing[:10])
            raise _FILES.not_found(
                f"{len(missing)} file(s) listed in {split_file}, e.g.\n  {shown}"
            )
        return paths, classes, class_names


def open_source(
    root: str | os.PathLike,
    split: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.5,
    expected_size: int | None = None,
) -> FolderSource:
    """`make_source` entry: a `FolderSource` (a folder has no published size to check)."""
    del expected_size
    return FolderSource(root, split, seed=seed, test_fraction=test_fraction)
