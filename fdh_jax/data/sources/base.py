"""What every dataset source shares: the image-list source, its errors and the split-size check.

A source (the contract the grain pipeline relies on) is an object with `__len__`,
`__getitem__(i) -> {"image": uint8 [H, W, 3] RGB, "label": int, "path": str}` and the attributes
`labels: int32 [N]`, `paths: list[str]`, `class_names: list[str]`, `num_classes: int`,
`name: str`, `split: str` ("train" = database, "test" = query). Constructing one reads only list
files; images are decoded lazily in `__getitem__`. A source may also have
`listing_errors: Sequence[BadImage]`: entries that could not even be listed (an unreadable class
folder, a link loop where a folder was expected); the bad-image scan reports them with the
undecodable files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fdh_jax.data.decode import BadImage, decode_image

SPLITS = ("train", "test")

# Published (train, test) split sizes (docs/design.md, "Evaluation protocol"). VegFru's test
# list is left unchecked: its size could not be confirmed from a primary source here (the VegFru
# paper reports 116,931 test images).
PUBLISHED_SPLIT_SIZES: dict[str, dict[str, int | None]] = {
    "cub": {"train": 5994, "test": 5794},
    "aircraft": {"train": 6667, "test": 3333},
    "food101": {"train": 75750, "test": 25250},
    "nabirds": {"train": 23929, "test": 24633},
    "dogs": {"train": 12000, "test": 8580},
    "cars": {"train": 8144, "test": 8041},
    "vegfru": {"train": 29200, "test": None},
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root or one of its list files is missing.

    The message names the path looked at, the expected layout and where to get the data.
    """

    def __init__(self, dataset: str, missing_path: str | os.PathLike, layout: str, how_to_get: str):
        self.dataset = dataset
        self.missing_path = str(missing_path)
        self.layout = layout
        self.how_to_get = how_to_get
        message = (
            f"{dataset}: not found: {self.missing_path}\n"
            f"Expected layout:\n{layout.rstrip()}\n"
            f"How to get it: {how_to_get}\n"
            "(fdh_jax never downloads datasets; set --config.data.root to the folder above.)"
        )
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.dataset, self.missing_path, self.layout, self.how_to_get))


class SplitSizeMismatchError(ValueError):
    """A split does not have the published number of images (incomplete or wrong dataset)."""

    def __init__(self, dataset: str, split: str, actual: int, expected: int):
        self.dataset, self.split, self.actual, self.expected = dataset, split, actual, expected
        super().__init__(
            f"{dataset} split '{split}' has {actual} images but the published split has "
            f"{expected}. The dataset on disk is incomplete or not the standard release; pass "
            "check_counts=False to use it anyway (results are then not comparable to papers)."
        )

    def __reduce__(self):
        return (type(self), (self.dataset, self.split, self.actual, self.expected))


def check_split(split: str) -> str:
    """Validates a split name ("train" = database, "test" = query)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_split_size(dataset: str, split: str, actual: int, expected: int | None) -> None:
    """Raises `SplitSizeMismatchError` if `expected` is given and differs from `actual`."""
    if expected is not None and actual != expected:
        raise SplitSizeMismatchError(dataset, split, actual, expected)


def require_path(
    dataset: str, path: Path, layout: str, how_to_get: str, *, is_dir: bool = False
) -> Path:
    """Returns `path` if it exists (a directory if `is_dir`), else raises DatasetNotFoundError."""
    exists = path.is_dir() if is_dir else path.is_file()
    if not exists:
        raise DatasetNotFoundError(dataset, path, layout, how_to_get)
    return path


def read_text_lines(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 list file, stripped of surrounding whitespace."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def resolve_root(root: str | os.PathLike) -> Path:
    """`root` with `~` expanded, made absolute (not resolving links)."""
    return Path(os.path.expanduser(os.fspath(root))).absolute()


class ImageListSource:
    """A source over a list of image files with integer labels.

    Attributes:
      paths: absolute image paths, `[N]`.
      labels: `int32 [N]` in `0..num_classes-1`.
      class_names: `[num_classes]`, index = label.
      num_classes, name, split: see the module docstring.
      image_transform: optional `uint8 [H, W, 3] -> uint8 [H', W', 3]` applied after decoding
        (e.g. the Aircraft copyright-banner crop); must be a picklable top-level function.
      listing_errors: entries that could not be listed (see the module docstring); none here,
        subclasses that walk folders fill it.
    """

    listing_errors: Sequence[BadImage] = ()

    def __init__(
        self,
        *,
        name: str,
        split: str,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        image_transform: Callable[[np.ndarray], np.ndarray] | None = None,
        expected_size: int | None = None,
    ):
        self.name = name
        self.split = check_split(split)
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int32).reshape(-1)
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.image_transform = image_transform
        if len(self.paths) != self.labels.size:
            raise ValueError(f"{name}: {len(self.paths)} paths but {self.labels.size} labels")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(
                f"{name}/{split}: labels span {self.labels.min()}..{self.labels.max()} but there "
                f"are {self.num_classes} classes"
            )
        if not self.paths:
            raise ValueError(f"{name}: split '{split}' is empty")
        check_split_size(name, split, len(self.paths), expected_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        image = decode_image(path)
        if self.image_transform is not None:
            image = self.image_transform(image)
        return {"image": image, "label": int(self.labels[index]), "path": path}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"{len(self)} images, {self.num_classes} classes)"
        )


def read_id_value_table(path: Path) -> list[tuple[str, str]]:
    """Rows `<id> <value>` of a list file, split at the first whitespace (values keep spaces)."""
    rows = []
    for line_number, line in enumerate(read_text_lines(path), start=1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{line_number}: expected '<id> <value>', got {line!r}")
        rows.append((parts[0], parts[1].strip()))
    return rows


def first_existing(candidates: Sequence[Path]) -> Path | None:
    """The first path in `candidates` that exists, or None."""
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return None
