"""Stanford Cars: 196 classes, 8,144 train / 8,041 test images.

Layout searched under `root` (the folder where `car_devkit.tgz`, `cars_train.tgz`,
`cars_test.tgz` and `cars_test_annos_withlabels.mat` were extracted / placed):

- `devkit/cars_meta.mat` (`class_names`: 196 names, index = class - 1);
- `devkit/cars_train_annos.mat` (struct array `annotations` with fields `fname`, `class` 1-based,
  and the bounding box, unused);
- `cars_test_annos_withlabels.mat` in `root` or in `root/devkit/` (same fields; the devkit's own
  `cars_test_annos.mat` has no labels and is not used);
- images in `cars_train/` and `cars_test/`, or one level deeper (`cars_train/cars_train/`, as
  some mirrors repack them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fdh_jax.data.sources.base import first_existing
from fdh_jax.data.sources.matlab_lists import load_mat, mat_ints, mat_strings
from fdh_jax.data.sources.opening import DatasetFiles, ImageList, ListedSource, SourceOpener

ANNOTATION_FILES = {"train": "cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}
IMAGE_FOLDERS = {"train": "cars_train", "test": "cars_test"}
LAYOUT = """\
  ROOT/devkit/cars_meta.mat, ROOT/devkit/cars_train_annos.mat,
  ROOT/cars_test_annos_withlabels.mat (or ROOT/devkit/...),
  ROOT/cars_train/<fname>.jpg, ROOT/cars_test/<fname>.jpg (or cars_train/cars_train/...)"""
HOW_TO_GET = (
    "download car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat "
    "from the Stanford Cars dataset page (ai.stanford.edu/~jkrause/cars/car_dataset.html; the "
    "original host is often offline, use a published mirror of the same files) into ROOT"
)
FILES = DatasetFiles("cars", LAYOUT, HOW_TO_GET)


def read_cars_annotations(path: Path) -> tuple[list[str], list[int]]:
    """`(fname, class 1-based)` of the `annotations` struct array of a Stanford Cars .mat file."""
    contents = load_mat(path)
    annotations = contents.get("annotations")
    if annotations is None or annotations.dtype.names is None:
        raise ValueError(f"{path}: expected a struct array 'annotations'")
    if not {"fname", "class"} <= set(annotations.dtype.names):
        raise ValueError(
            f"{path}: annotations have fields {annotations.dtype.names}, need fname and class"
        )
    annotations = np.atleast_1d(annotations)
    return mat_strings(annotations["fname"]), mat_ints(annotations["class"]).tolist()


class CarsSource(ListedSource):
    """Stanford Cars (see the module docstring for the layout searched)."""

    dataset_files = FILES

    def locate(self, root: Path) -> Path:
        """`root`, which must be a folder."""
        return FILES.require(root, is_dir=True)

    def read_lists(self, split: str) -> ImageList:
        """The split's annotations, with the images in the first of the folders searched."""
        meta = FILES.require(self.root / "devkit" / "cars_meta.mat")
        class_names = mat_strings(load_mat(meta)["class_names"])
        annotation_name = ANNOTATION_FILES[split]
        candidates = [self.root / annotation_name, self.root / "devkit" / annotation_name]
        annotation_file = first_existing(candidates)
        if annotation_file is None:
            raise FILES.not_found(*candidates)
        folder = IMAGE_FOLDERS[split]
        image_dir = first_existing([self.root / folder / folder, self.root / folder])
        image_dir = FILES.require(image_dir or self.root / folder, is_dir=True)
        files, classes = read_cars_annotations(annotation_file)
        return ImageList(
            [str(image_dir / file) for file in files], [c - 1 for c in classes], class_names
        )


open_source = SourceOpener(CarsSource)
