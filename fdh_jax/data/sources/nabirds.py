"""NABirds: 555 leaf classes, 23,929 train / 24,633 test images.

Layout (`root` = the extracted `nabirds/` folder): `images.txt` (`<image id> <class>/<file>`),
`image_class_labels.txt` (`<image id> <class id>`), `train_test_split.txt`
(`<image id> <1 = train, 0 = test>`), `classes.txt` (`<class id> <name with spaces>`),
`hierarchy.txt` (`<child class id> <parent class id>`), `images/`.

classes.txt lists all 1,011 nodes of the taxonomy; images are labelled with its leaves only. The
classes are the leaves that label images, in increasing class-id order, remapped to 0..554; an
image labelled with an inner node of the hierarchy is an error.
"""

from __future__ import annotations

from fdh_jax.data.sources.base import read_id_value_table
from fdh_jax.data.sources.cub import read_image_tables
from fdh_jax.data.sources.opening import DatasetFiles, ImageList, ListedSource, SourceOpener

LAYOUT = """\
  ROOT/images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, hierarchy.txt,
  ROOT/images/<class id>/<file>   (ROOT = the extracted nabirds/ folder)"""
HOW_TO_GET = (
    "request and download nabirds.tar.gz from the Cornell Lab of Ornithology NABirds page "
    "(dl.allaboutbirds.org/nabirds) and extract it"
)
FILES = DatasetFiles("nabirds", LAYOUT, HOW_TO_GET)


class NabirdsSource(ListedSource):
    """NABirds leaf classes (see the module docstring)."""

    dataset_files = FILES

    def read_lists(self, split: str) -> ImageList:
        """The images flagged for `split`, labelled by leaf class (see the module docstring)."""
        image_rows, class_of_id, is_train_of_id = read_image_tables(FILES, self.root)
        name_of_class = dict(read_id_value_table(FILES.require(self.root / "classes.txt")))
        parent_rows = read_id_value_table(FILES.require(self.root / "hierarchy.txt"))
        FILES.require(self.root / "images", is_dir=True)

        unlabelled = [image_id for image_id, _ in image_rows if image_id not in class_of_id]
        if unlabelled:
            raise ValueError(f"nabirds: image ids {unlabelled[:5]} have no class label")
        inner_nodes = {parent for _, parent in parent_rows}
        used_classes = {class_of_id[image_id] for image_id, _ in image_rows}
        not_leaves = sorted(used_classes & inner_nodes, key=int)
        if not_leaves:
            raise ValueError(f"nabirds: images labelled with inner taxonomy nodes {not_leaves[:5]}")
        unnamed = sorted(used_classes - name_of_class.keys(), key=int)
        if unnamed:
            raise ValueError(f"nabirds: class ids {unnamed[:5]} are not in classes.txt")
        leaf_ids = sorted(used_classes, key=int)
        label_of_class = {class_id: i for i, class_id in enumerate(leaf_ids)}
        self.class_ids = [int(class_id) for class_id in leaf_ids]  # original ids, by label

        want_train = "1" if split == "train" else "0"
        paths, labels = [], []
        for image_id, relative_path in image_rows:
            if image_id not in is_train_of_id:
                raise ValueError(f"nabirds: image id {image_id} has no split flag")
            if is_train_of_id[image_id] == want_train:
                paths.append(str(self.root / "images" / relative_path))
                labels.append(label_of_class[class_of_id[image_id]])
        return ImageList(paths, labels, [name_of_class[class_id] for class_id in leaf_ids])


open_source = SourceOpener(NabirdsSource)
