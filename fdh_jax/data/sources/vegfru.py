"""VegFru: 292 classes (200 vegetables, 92 fruits); the train list has 29,200 images.

Layout: `root/vegfru_list/vegfru_train.txt` and `vegfru_test.txt`, lines
`<path relative to root> <label>` (e.g. `veg200_images/<class>/<file>.jpg 0`, labels 0..291),
with the image folders `root/veg200_images/` and `root/fru92_images/`. The class name of a label is
the folder of its images, read from both lists. Hashing papers train on `vegfru_train.txt` (the
database) and query with `vegfru_test.txt`; the test list's size is not checked (see
`base.PUBLISHED_SPLIT_SIZES`).
"""

from __future__ import annotations

from pathlib import Path

from fdh_jax.data.sources.base import read_text_lines
from fdh_jax.data.sources.opening import DatasetFiles, ImageList, ListedSource, SourceOpener

LAYOUT = """\
  ROOT/vegfru_list/vegfru_train.txt, ROOT/vegfru_list/vegfru_test.txt  (<relative path> <label>)
  ROOT/veg200_images/<class>/<file>.jpg, ROOT/fru92_images/<class>/<file>.jpg"""
HOW_TO_GET = (
    "download the list files and the veg200_images / fru92_images archives linked from the "
    "VegFru page of the USTC VIM lab (vim.ustc.edu.cn; GitHub ustc-vim/vegfru) into ROOT"
)
FILES = DatasetFiles("vegfru", LAYOUT, HOW_TO_GET)


def read_vegfru_list(path: Path) -> list[tuple[str, int]]:
    """`(relative path, label)` rows of a VegFru list file (the label is the last column)."""
    rows = []
    for line_number, line in enumerate(read_text_lines(path), start=1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{line_number}: expected '<path> <label>', got {line!r}")
        rows.append((parts[0], int(parts[1])))
    return rows


class VegfruSource(ListedSource):
    """VegFru (see the module docstring)."""

    dataset_files = FILES

    def locate(self, root: Path) -> Path:
        """`root`, which must be a folder."""
        return FILES.require(root, is_dir=True)

    def read_lists(self, split: str) -> ImageList:
        """The split's list; class names are the image folders, read from both lists."""
        rows = {}
        for list_split in ("train", "test"):
            list_path = self.root / "vegfru_list" / f"vegfru_{list_split}.txt"
            rows[list_split] = read_vegfru_list(FILES.require(list_path))
        folder_of_label: dict[int, str] = {}
        for list_rows in rows.values():
            for relative_path, label in list_rows:
                folder = Path(relative_path).parent.name
                if folder_of_label.setdefault(label, folder) != folder:
                    raise ValueError(f"vegfru: label {label} used for {folder} and another folder")
        num_classes = max(folder_of_label) + 1
        if sorted(folder_of_label) != list(range(num_classes)):
            raise ValueError(f"vegfru: labels are not 0..{num_classes - 1} without gaps")
        return ImageList(
            [str(self.root / relative_path) for relative_path, _ in rows[split]],
            [label for _, label in rows[split]],
            [folder_of_label[k] for k in range(num_classes)],
        )


open_source = SourceOpener(VegfruSource)
