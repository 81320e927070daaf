"""Stanford Dogs: 120 classes, 12,000 train / 8,580 test images.

Layouts accepted for `root`, in this order:

1. the extracted archives (`images.tar` and `lists.tar`): `root/Images/<wnid>-<breed>/<file>.jpg`
   and the MATLAB lists `train_list.mat` / `test_list.mat` in `root/lists/` or in `root` itself
   (fields `file_list`: paths relative to `Images/`, `labels`: 1-based class per image). The class
   name of label k is the breed part of its images' folder (`n02085620-Chihuahua` -> `Chihuahua`),
   taken from both lists;
2. a TFDS data dir holding a locally built `stanford_dogs` (array_record).
"""

from __future__ import annotations

from pathlib import Path

from fdh_jax.data.sources.base import first_existing
from fdh_jax.data.sources.matlab_lists import load_mat, mat_ints, mat_strings
from fdh_jax.data.sources.opening import DatasetFiles, ImageList, ListedSource, SourceOpener

TFDS_NAME = "stanford_dogs"
LAYOUT = """\
  ROOT/Images/<wnid>-<breed>/<file>.jpg
  ROOT/lists/train_list.mat, ROOT/lists/test_list.mat   (or directly in ROOT)
  or a TFDS data dir with a built stanford_dogs/<version>/ (array_record)"""
HOW_TO_GET = (
    "download images.tar and lists.tar from the Stanford Dogs Dataset page "
    "(vision.stanford.edu/aditya86/ImageNetDogs) and extract both into ROOT"
)
FILES = DatasetFiles("dogs", LAYOUT, HOW_TO_GET)


def read_dogs_list(path: Path) -> tuple[list[str], list[int]]:
    """`(file_list, labels 1-based)` of a Stanford Dogs `*_list.mat`."""
    contents = load_mat(path)
    if "file_list" not in contents or "labels" not in contents:
        raise ValueError(f"{path}: expected the fields file_list and labels")
    files = mat_strings(contents["file_list"])
    labels = mat_ints(contents["labels"]).tolist()
    if len(files) != len(labels):
        raise ValueError(f"{path}: {len(files)} files but {len(labels)} labels")
    return files, labels


def find_list(root: Path, split: str) -> Path | None:
    """`root/lists/<split>_list.mat` or `root/<split>_list.mat`, the first that exists, or None."""
    name = f"{split}_list.mat"
    return first_existing([root / "lists" / name, root / name])


def find_extracted_root(root: Path) -> Path | None:
    """`root` if it holds the train list (see `find_list`), else None."""
    return root if find_list(root, "train") is not None else None


class DogsSource(ListedSource):
    """The extracted Stanford Dogs archives (layout 1 of the module docstring)."""

    dataset_files = FILES

    def read_lists(self, split: str) -> ImageList:
        """Split `split` of the MATLAB lists; class names come from both lists' folders."""
        lists = {}
        for list_split in ("train", "test"):
            list_path = find_list(self.root, list_split)
            if list_path is None:
                name = f"{list_split}_list.mat"
                raise FILES.not_found(self.root / "lists" / name, self.root / name)
            lists[list_split] = read_dogs_list(list_path)
        FILES.require(self.root / "Images", is_dir=True)
        folder_of_label: dict[int, str] = {}
        for files, labels in lists.values():
            for file, label in zip(files, labels, strict=True):
                folder = file.split("/", 1)[0]
                if folder_of_label.setdefault(label, folder) != folder:
                    raise ValueError(f"dogs: label {label} used for {folder} and another folder")
        num_classes = max(folder_of_label)
        if sorted(folder_of_label) != list(range(1, num_classes + 1)):
            raise ValueError(f"dogs: labels are not 1..{num_classes} without gaps")
        class_names = [folder_of_label[k].split("-", 1)[-1] for k in range(1, num_classes + 1)]
        files, labels = lists[split]
        return ImageList(
            [str(self.root / "Images" / file) for file in files],
            [label - 1 for label in labels],
            class_names,
        )


# The extracted archives if the train list is found, else a built TFDS copy; with neither, a
# folder goes to DogsSource, which names the missing list in both places it may be.
open_source = SourceOpener(DogsSource, find_extracted_root, TFDS_NAME)
