"""Opening a dataset root: what the dataset modules (cub, aircraft, nabirds, food101, dogs, cars,
vegfru) share instead of each repeating it.

A dataset module describes its files once (`DatasetFiles`: its name, expected layout and where to
get it, which every not-found error quotes), reads its list files in a `ListedSource` subclass
(the split check, the root, the published-size check and the `ImageListSource` contract are
here), and binds `make_source`'s entry point `open_source` to a `SourceOpener`: the extracted
archive first, then a locally built TFDS copy (never downloaded), else a `DatasetNotFoundError`
with the path looked at, the expected layout and how to get the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from fdh_jax.data.sources.base import (
    DatasetNotFoundError,
    ImageListSource,
    check_split,
    require_path,
    resolve_root,
)
from fdh_jax.data.sources.tfds_source import TfdsSource, find_prepared_tfds


@dataclass(frozen=True)
class DatasetFiles:
    """A dataset's name, expected layout and how to get it: what its not-found errors say."""

    name: str
    layout: str
    how_to_get: str

    def not_found(self, *looked_at: str | os.PathLike) -> DatasetNotFoundError:
        """The error naming the path looked at (several paths are joined with " or ")."""
        joined = " or ".join(os.fspath(path) for path in looked_at)
        return DatasetNotFoundError(self.name, joined, self.layout, self.how_to_get)

    def not_found_under(self, root: Path, *relative: str) -> DatasetNotFoundError:
        """The error for a root without the layout: `root` itself if it is not a folder, else
        the files looked for in it (`relative` to it)."""
        if not root.is_dir():
            return self.not_found(root)
        return self.not_found(*(root / path for path in relative))

    def require(self, path: Path, *, is_dir: bool = False) -> Path:
        """`path` if it exists (a folder if `is_dir`), else raises the not-found error."""
        return require_path(self.name, path, self.layout, self.how_to_get, is_dir=is_dir)


def first_folder_holding(relative: str, candidates: Iterable[Path]) -> Path | None:
    """The first folder of `candidates` holding the file `relative` (to it), or None: where an
    extracted archive is, given the places it may be below a root."""
    for candidate in candidates:
        if (candidate / relative).is_file():
            return candidate
    return None


class ImageList(NamedTuple):
    """What a dataset's list files give for one split (see `ImageListSource`)."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    image_transform: Callable[[np.ndarray], np.ndarray] | None = None


class ListedSource(ImageListSource):
    """An `ImageListSource` read from the list files of an extracted dataset archive.

    Subclasses set `dataset_files` and implement `read_lists`; `locate` finds the folder the
    lists are read from (stored as `root`). The split name is checked before anything is read,
    and the split's size against `expected_size` (the published size) after.
    """

    dataset_files: ClassVar[DatasetFiles]

    def __init__(self, root: str | os.PathLike, split: str, *, expected_size: int | None = None):
        """Reads split `split` ("train" or "test") of the archive at or below `root`; raises
        `SplitSizeMismatchError` if `expected_size` is given and differs."""
        check_split(split)
        self.root = self.locate(resolve_root(root))
        listed = self.read_lists(split)
        super().__init__(
            name=self.dataset_files.name,
            split=split,
            paths=listed.paths,
            labels=listed.labels,
            class_names=listed.class_names,
            image_transform=listed.image_transform,
            expected_size=expected_size,
        )

    def locate(self, root: Path) -> Path:
        """The folder holding the list files, given the resolved root: the root itself here."""
        return root

    def read_lists(self, split: str) -> ImageList:
        """Reads split `split` from the list files under `self.root`."""
        raise NotImplementedError


@dataclass(frozen=True)
class SourceOpener:
    """A dataset module's `open_source`, the entry point `make_source` calls.

    Attributes:
      open_archive: the source over the extracted archive.
      find_archive: where the extracted archive is, given the resolved root (None if it is not
        there); None for a dataset without a TFDS copy, whose `open_archive` opens and checks
        the root itself.
      tfds_name: the locally built TFDS dataset to use when the archive is not found, or None.
      tfds_splits: the TFDS split of each split, where the names differ.
      looked_for: the files, relative to the root, that the not-found error names when neither
        is there; empty: the root goes to `open_archive`, which names the missing file itself.
    """

    open_archive: type[ListedSource]
    find_archive: Callable[[Path], Path | None] | None = None
    tfds_name: str | None = None
    tfds_splits: Mapping[str, str] | None = None
    looked_for: tuple[str, ...] = ()

    def __call__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        seed: int = 0,
        test_fraction: float = 0.5,
        expected_size: int | None = None,
    ) -> ListedSource | TfdsSource:
        """Opens split `split` of the dataset under `root` (`seed` and `test_fraction` are unused:
        the split is the dataset's own): the extracted archive if found, else a built TFDS copy.
        """
        del seed, test_fraction
        if self.find_archive is None:
            return self.open_archive(root, split, expected_size=expected_size)
        resolved = resolve_root(root)
        archive = self.find_archive(resolved)
        if archive is not None:
            return self.open_archive(archive, split, expected_size=expected_size)
        if self.tfds_name is not None and find_prepared_tfds(resolved, self.tfds_name) is not None:
            return TfdsSource(
                name=self.open_archive.dataset_files.name,
                tfds_name=self.tfds_name,
                data_dir=resolved,
                split=check_split(split),
                tfds_split=(self.tfds_splits or {}).get(split, split),
                expected_size=expected_size,
            )
        if self.looked_for or not resolved.is_dir():
            raise self.open_archive.dataset_files.not_found_under(resolved, *self.looked_for)
        return self.open_archive(resolved, split, expected_size=expected_size)
