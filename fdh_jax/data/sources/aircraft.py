"""FGVC-Aircraft 2013b at the variant level: 100 classes, 6,667 trainval / 3,333 test images.

Layout: `root` is `fgvc-aircraft-2013b/data/` (or `fgvc-aircraft-2013b/`, or its parent) with
`variants.txt` (one variant name per line; class index = line order),
`images_variant_trainval.txt` and `images_variant_test.txt` (`<7-digit id> <variant name>`,
names may contain spaces and slashes) and `images/<id>.jpg`. The retrieval database is the
official trainval split.

Every FGVC-Aircraft photo has a 20-pixel copyright banner along its bottom edge; the archive's
README says to remove it, so `__getitem__` returns the image without its bottom 20 rows
(images of 20 rows or fewer are returned whole).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fdh_jax.data.sources.base import (
    DatasetNotFoundError,
    ImageListSource,
    check_split,
    read_id_value_table,
    read_text_lines,
    require_path,
    resolve_root,
)

COPYRIGHT_BANNER_ROWS = 20
LIST_FILES = {"train": "images_variant_trainval.txt", "test": "images_variant_test.txt"}
LAYOUT = """\
  ROOT/variants.txt, images_variant_trainval.txt, images_variant_test.txt, images/<id>.jpg
  (ROOT = fgvc-aircraft-2013b/data/, or fgvc-aircraft-2013b/ or its parent)"""
HOW_TO_GET = (
    "download fgvc-aircraft-2013b.tar.gz from the FGVC-Aircraft page of the Oxford Visual "
    "Geometry Group (www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft) and extract it"
)


def crop_copyright_banner(image: np.ndarray) -> np.ndarray:
    """Drops the bottom banner: `uint8 [H, W, 3] -> uint8 [H - 20, W, 3]` (whole if H <= 20)."""
    if image.shape[0] <= COPYRIGHT_BANNER_ROWS:
        return image
    return image[:-COPYRIGHT_BANNER_ROWS]


def find_data_root(root: Path) -> Path | None:
    """The folder holding variants.txt, or None."""
    for candidate in (root, root / "data", root / "fgvc-aircraft-2013b" / "data"):
        if (candidate / "variants.txt").is_file():
            return candidate
    return None


class AircraftSource(ImageListSource):
    """FGVC-Aircraft variants (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, split: str, *, expected_size: int | None = None):
        check_split(split)
        resolved = resolve_root(root)
        data_root = find_data_root(resolved)
        if data_root is None:
            missing = resolved if not resolved.is_dir() else resolved / "variants.txt"
            raise DatasetNotFoundError("aircraft", missing, LAYOUT, HOW_TO_GET)
        self.root = data_root
        class_names = read_text_lines(data_root / "variants.txt")
        index_of_class = {name: i for i, name in enumerate(class_names)}
        list_file = require_path("aircraft", data_root / LIST_FILES[split], LAYOUT, HOW_TO_GET)
        require_path("aircraft", data_root / "images", LAYOUT, HOW_TO_GET, is_dir=True)
        paths, labels = [], []
        for image_id, variant in read_id_value_table(list_file):
            if variant not in index_of_class:
                raise ValueError(f"{list_file}: variant {variant!r} is not in variants.txt")
            paths.append(str(data_root / "images" / f"{image_id}.jpg"))
            labels.append(index_of_class[variant])
        super().__init__(
            name="aircraft",
            split=split,
            paths=paths,
            labels=labels,
            class_names=class_names,
            image_transform=crop_copyright_banner,
            expected_size=expected_size,
        )


def open_source(
    root: str | os.PathLike,
    split: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.5,
    expected_size: int | None = None,
) -> AircraftSource:
    """`make_source` entry."""
    del seed, test_fraction
    return AircraftSource(root, split, expected_size=expected_size)
