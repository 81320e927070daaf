"""Any folder of class sub-folders (DESIGN section 3), e.g. `configs/folder.py`.

Layout searched, in this order:

    DIR/images/<class>/<file>     (if DIR/images/ holds at least one class folder)
    DIR/<class>/<file>

Only files directly inside a class folder count; names starting with "." are ignored; image
extensions are jpg, jpeg, png, bmp, webp, gif in any case. Class index = position of the class
folder name in sorted (code-point) order.

Split:
- if `DIR/split.csv` exists (header `path,split`; `path` relative to DIR, e.g.
  `images/Blue_Jay/0001.jpg`; `split` in {train, test}) it decides: listed files only, each at most
  once, each must exist inside a class folder. The classes are those of the listed files.
- otherwise each class is split on its own: its files in sorted order are permuted with a
  generator seeded by `(seed, crc32(class name))`, and the first `round(test_fraction * n)`
  (at most n - 1, so every class keeps a train image) are the test split. The split of one class
  therefore does not change when other classes are added or removed.
"""

from __future__ import annotations

import csv
import os
import zlib
from pathlib import Path

import numpy as np

from fdh_jax.data.sources.base import (
    DatasetNotFoundError,
    ImageListSource,
    check_split,
    resolve_root,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
SPLIT_FILE = "split.csv"

_LAYOUT = """\
  DIR/images/<class>/<image file>   or   DIR/<class>/<image file>
  DIR/split.csv                     optional: columns path,split (path relative to DIR,
                                    split = train|test); without it a seeded per-class split
  image files: .jpg .jpeg .png .bmp .webp .gif"""
_HOW_TO_GET = "any folder of your own images, one sub-folder per class"


def _is_image_file(entry: os.DirEntry) -> bool:
    return (
        not entry.name.startswith(".")
        and entry.is_file()
        and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
    )


def _class_folder_files(class_dir: Path) -> list[str]:
    """Sorted image file names directly inside one class folder."""
    with os.scandir(class_dir) as entries:
        return sorted(entry.name for entry in entries if _is_image_file(entry))


def _class_folders(directory: Path) -> list[str]:
    """Sorted names of sub-folders of `directory` that hold at least one image file."""
    with os.scandir(directory) as entries:
        candidates = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    return [name for name in candidates if _class_folder_files(directory / name)]


def find_images_directory(root: Path) -> Path:
    """The folder whose sub-folders are the classes: `root/images` if it has any, else `root`."""
    if not root.is_dir():
        raise DatasetNotFoundError("folder", root, _LAYOUT, _HOW_TO_GET)
    nested = root / "images"
    if nested.is_dir() and _class_folders(nested):
        return nested
    if _class_folders(root):
        return root
    raise DatasetNotFoundError("folder", root / "<class>" / "<image file>", _LAYOUT, _HOW_TO_GET)


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
        class_names = _class_folders(images_dir)
        paths: list[str] = []
        classes: list[str] = []
        for class_name in class_names:
            files = _class_folder_files(images_dir / class_name)
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
            if not path.is_file():
                missing.append(str(path))
            paths.append(str(path))
            classes.append(class_name)
        if missing:
            shown = "\n  ".join(missing[:10])
            raise DatasetNotFoundError(
                "folder",
                f"{len(missing)} file(s) listed in {split_file}, e.g.\n  {shown}",
                _LAYOUT,
                _HOW_TO_GET,
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
