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

from pathlib import Path

import numpy as np

from fdh_jax.data.sources.base import read_id_value_table, read_text_lines
from fdh_jax.data.sources.opening import (
    DatasetFiles,
    ImageList,
    ListedSource,
    SourceOpener,
    first_folder_holding,
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
FILES = DatasetFiles("aircraft", LAYOUT, HOW_TO_GET)


def crop_copyright_banner(image: np.ndarray) -> np.ndarray:
    """Drops the bottom banner: `uint8 [H, W, 3] -> uint8 [H - 20, W, 3]` (whole if H <= 20)."""
    if image.shape[0] <= COPYRIGHT_BANNER_ROWS:
        return image
    return image[:-COPYRIGHT_BANNER_ROWS]


def find_data_root(root: Path) -> Path | None:
    """The folder holding variants.txt, or None."""
    candidates = (root, root / "data", root / "fgvc-aircraft-2013b" / "data")
    return first_folder_holding("variants.txt", candidates)


class AircraftSource(ListedSource):
    """FGVC-Aircraft variants (see the module docstring)."""

    dataset_files = FILES

    def locate(self, root: Path) -> Path:
        """The folder holding variants.txt (see `find_data_root`)."""
        data_root = find_data_root(root)
        if data_root is None:
            raise FILES.not_found_under(root, "variants.txt")
        return data_root

    def read_lists(self, split: str) -> ImageList:
        """The images of the split's list file, labelled by their line in variants.txt."""
        class_names = read_text_lines(self.root / "variants.txt")
        index_of_class = {name: i for i, name in enumerate(class_names)}
        list_file = FILES.require(self.root / LIST_FILES[split])
        FILES.require(self.root / "images", is_dir=True)
        paths, labels = [], []
        for image_id, variant in read_id_value_table(list_file):
            if variant not in index_of_class:
                raise ValueError(f"{list_file}: variant {variant!r} is not in variants.txt")
            paths.append(str(self.root / "images" / f"{image_id}.jpg"))
            labels.append(index_of_class[variant])
        return ImageList(paths, labels, class_names, crop_copyright_banner)


open_source = SourceOpener(AircraftSource)
