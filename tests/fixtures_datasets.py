"""Tiny on-disk dataset trees in the real formats, for tests/test_sources.py.

Images are small solid colours so decoded values can be checked against the colour written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

IMAGE_HEIGHT, IMAGE_WIDTH = 16, 24  # non-square; 16 rows = whole JPEG blocks (banner edge)


def color_for(index: int) -> tuple[int, int, int]:
    """A distinct saturated-enough RGB colour per index (JPEG keeps solid colours within ~3)."""
    palette = [
        (200, 30, 30),
        (30, 200, 30),
        (30, 30, 200),
        (200, 200, 30),
        (30, 200, 200),
        (200, 30, 200),
        (120, 60, 20),
        (20, 120, 60),
    ]
    return palette[index % len(palette)]


def solid_rgb(color: tuple[int, int, int], height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH):
    """`uint8 [height, width, 3]` filled with `color`."""
    return np.broadcast_to(np.asarray(color, np.uint8), (height, width, 3)).copy()


def write_rgb_jpeg(path: Path, color: tuple[int, int, int], **size) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(solid_rgb(color, **size)).save(path, "JPEG", quality=95)
    return path


def write_gray_jpeg(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (IMAGE_WIDTH, IMAGE_HEIGHT), value).save(path, "JPEG", quality=95)
    return path


def write_cmyk_jpeg(path: Path, cmyk: tuple[int, int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (IMAGE_WIDTH, IMAGE_HEIGHT), cmyk).save(path, "JPEG", quality=95)
    return path


def write_rgba_png(path: Path, rgba: tuple[int, int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (IMAGE_WIDTH, IMAGE_HEIGHT), rgba).save(path, "PNG")
    return path


def truncated_jpeg_bytes() -> bytes:
    """A valid JPEG of noise with its second half cut off (Pillow would grey-fill it if allowed)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def write_truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(truncated_jpeg_bytes())
    return path


def write_image_kind(path: Path, kind: str, index: int) -> tuple[int, int, int] | None:
    """Writes one image of `kind` and returns the RGB value a correct decoder yields (None: bad).

    kind: "rgb" (colour_for(index)), "gray" (value 90), "cmyk" (pure cyan-ish), "rgba" (half
    transparent red, composited on white), "truncated".
    """
    if kind == "rgb":
        color = color_for(index)
        write_rgb_jpeg(path, color)
        return color
    if kind == "gray":
        write_gray_jpeg(path, 90)
        return (90, 90, 90)
    if kind == "cmyk":
        write_cmyk_jpeg(path, (255, 0, 0, 0))  # full cyan -> RGB (0, 255, 255) in Pillow
        return (0, 255, 255)
    if kind == "rgba":
        write_rgba_png(path, (255, 0, 0, 128))  # 50 % red over white -> (255, 127, 127)
        return (255, 127, 127)
    if kind == "truncated":
        write_truncated_jpeg(path)
        return None
    raise ValueError(kind)


# ---------------------------------------------------------------------------- dataset trees

# Image kinds of each split of every fixture: the train split holds one of each awkward format.
SPLIT_KINDS = {
    "train": ["rgb", "gray", "cmyk", "rgba", "truncated", "rgb"],
    "test": ["rgb", "rgb", "rgb", "gray"],
}
NUM_FIXTURE_CLASSES = 3


class FixtureImage(NamedTuple):
    path: str  # absolute
    label: int  # expected 0-based label
    color: tuple[int, int, int] | None  # expected decoded RGB, None for the truncated file


class FixtureDataset(NamedTuple):
    root: Path  # what to pass to make_source
    class_names: list[str]
    splits: dict[str, list[FixtureImage]]
    missing_list_file: Path  # a list file whose removal must raise DatasetNotFoundError
    missing_list_split: str  # the split whose construction reads that file


def _labels_and_kinds(split: str) -> list[tuple[int, str]]:
    """Labels cycle over the classes so every class appears in both splits."""
    return [(i % NUM_FIXTURE_CLASSES, kind) for i, kind in enumerate(SPLIT_KINDS[split])]


def write_banner_jpeg(path: Path, color: tuple[int, int, int]) -> Path:
    """An aircraft-style photo: `color` on top of a 20-row black copyright banner."""
    pixels = np.zeros((IMAGE_HEIGHT + 20, IMAGE_WIDTH, 3), np.uint8)
    pixels[:IMAGE_HEIGHT] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    # 4:4:4 and a block-aligned edge: no chroma upsampling bleeds the banner into the photo.
    Image.fromarray(pixels).save(path, "JPEG", quality=95, subsampling=0)
    return path


def _write(path: Path, kind: str, label: int, banner: bool = False) -> FixtureImage:
    if banner and kind == "rgb":
        write_banner_jpeg(path, color_for(label))
        return FixtureImage(str(path), label, color_for(label))
    return FixtureImage(str(path), label, write_image_kind(path, kind, label))


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_cub_tree(tmp_path: Path) -> FixtureDataset:
    """`tmp_path/CUB_200_2011/` with the five list files (root given as its parent)."""
    base = tmp_path / "CUB_200_2011"
    folders = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "010.Red_winged_Blackbird"]
    class_lines = [f"{i + 1} {name}" for i, name in enumerate(folders)]
    images, labels, flags = [], [], []
    splits: dict[str, list[FixtureImage]] = {"train": [], "test": []}
    image_id = 0
    for split in ("test", "train"):  # the real files interleave; order must follow images.txt
        for label, kind in _labels_and_kinds(split):
            image_id += 1
            relative = (
                f"{folders[label]}/{folders[label][4:]}_{image_id:04d}_{790000 + image_id}.jpg"
            )
            splits[split].append(_write(base / "images" / relative, kind, label))
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {label + 1}")
            flags.append(f"{image_id} {1 if split == 'train' else 0}")
    _write_lines(base / "classes.txt", class_lines)
    _write_lines(base / "images.txt", images)
    _write_lines(base / "image_class_labels.txt", labels)
    _write_lines(base / "train_test_split.txt", flags)
    return FixtureDataset(tmp_path, folders, splits, base / "image_class_labels.txt", "train")


def write_aircraft_tree(tmp_path: Path) -> FixtureDataset:
    """`tmp_path/fgvc-aircraft-2013b/data/` (root given as fgvc-aircraft-2013b/)."""
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "Cessna 172", "F/A-18"]
    _write_lines(data / "variants.txt", variants)
    splits: dict[str, list[FixtureImage]] = {}
    image_id = 1025790
    for split, list_name in (("train", "trainval"), ("test", "test")):
        lines, splits[split] = [], []
        for label, kind in _labels_and_kinds(split):
            image_id += 1
            path = data / "images" / f"{image_id:07d}.jpg"
            splits[split].append(_write(path, kind, label, banner=True))
            lines.append(f"{image_id:07d} {variants[label]}")
        _write_lines(data / f"images_variant_{list_name}.txt", lines)
    return FixtureDataset(
        tmp_path / "fgvc-aircraft-2013b",
        variants,
        splits,
        data / "images_variant_test.txt",
        "test",
    )


def write_nabirds_tree(tmp_path: Path) -> FixtureDataset:
    """`tmp_path/nabirds/`: a 3-leaf taxonomy whose ids sort differently as text and numbers."""
    base = tmp_path / "nabirds"
    leaves = {295: "Mallard (Male)", 313: "Wood Duck", 1000: "Common Raven"}
    classes = {0: "Birds", 1: "Perching Birds", 2: "Ducks", 400: "Unused leaf"} | leaves
    hierarchy = ["1 0", "2 0", "295 2", "313 2", "1000 1", "400 1"]
    leaf_ids = sorted(leaves)  # label k <-> k-th smallest used leaf id
    images, labels, flags = [], [], []
    splits: dict[str, list[FixtureImage]] = {"train": [], "test": []}
    rng = np.random.default_rng(7)
    for split in ("train", "test"):
        for label, kind in _labels_and_kinds(split):
            image_id = "".join(rng.choice(list("0123456789abcdef"), 32))
            relative = f"{leaf_ids[label]:04d}/{image_id}.jpg"
            splits[split].append(_write(base / "images" / relative, kind, label))
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {leaf_ids[label]}")
            flags.append(f"{image_id} {1 if split == 'train' else 0}")
    _write_lines(base / "classes.txt", [f"{k} {v}" for k, v in sorted(classes.items())])
    _write_lines(base / "hierarchy.txt", hierarchy)
    _write_lines(base / "images.txt", images)
    _write_lines(base / "image_class_labels.txt", labels)
    _write_lines(base / "train_test_split.txt", flags)
    return FixtureDataset(
        base, [leaves[k] for k in leaf_ids], splits, base / "hierarchy.txt", "test"
    )


def write_food101_tree(tmp_path: Path) -> FixtureDataset:
    """`tmp_path/food-101/` (root given as its parent)."""
    base = tmp_path / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "caesar_salad"]
    _write_lines(base / "meta" / "classes.txt", classes)
    splits: dict[str, list[FixtureImage]] = {}
    image_id = 1005640
    for split in ("train", "test"):
        lines, splits[split] = [], []
        for label, kind in _labels_and_kinds(split):
            image_id += 1
            line = f"{classes[label]}/{image_id}"
            splits[split].append(_write(base / "images" / f"{line}.jpg", kind, label))
            lines.append(line)
        _write_lines(base / "meta" / f"{split}.txt", lines)
    return FixtureDataset(tmp_path, classes, splits, base / "meta" / "test.txt", "test")


def write_dogs_tree(tmp_path: Path) -> FixtureDataset:
    """`tmp_path/Images/<wnid>-<breed>/` and `tmp_path/lists/*_list.mat` (MATLAB cell arrays)."""
    import scipy.io

    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02116738-African_hunting_dog"]
    splits: dict[str, list[FixtureImage]] = {}
    number = 10070
    for split in ("train", "test"):
        files, splits[split] = [], []
        for label, kind in _labels_and_kinds(split):
            number += 1
            relative = f"{folders[label]}/{folders[label][:9]}_{number}.jpg"
            splits[split].append(_write(tmp_path / "Images" / relative, kind, label))
            files.append(relative)
        (tmp_path / "lists").mkdir(exist_ok=True)
        scipy.io.savemat(
            tmp_path / "lists" / f"{split}_list.mat",
            {
                "file_list": np.array(files, dtype=object).reshape(-1, 1),
                "annotation_list": np.array([f[:-4] for f in files], dtype=object).reshape(-1, 1),
                "labels": np.array(
                    [image.label + 1 for image in splits[split]], dtype=np.float64
                ).reshape(-1, 1),
            },
        )
    names = [folder.split("-", 1)[1] for folder in folders]
    return FixtureDataset(tmp_path, names, splits, tmp_path / "lists" / "test_list.mat", "train")


def _cars_annotations(files: list[str], classes: list[int]) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    annotations = np.zeros((1, len(files)), dtype=[(f, object) for f in fields])
    for i, (file, class_id) in enumerate(zip(files, classes, strict=True)):
        annotations[0, i] = (
            np.uint8(1),
            np.uint8(2),
            np.uint8(10),
            np.uint8(8),
            np.uint8(class_id),
            file,
        )
    return annotations


def write_cars_tree(tmp_path: Path) -> FixtureDataset:
    """Stanford Cars: devkit/*.mat, cars_test_annos_withlabels.mat at the root, cars_*/ images."""
    import scipy.io

    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]
    (tmp_path / "devkit").mkdir()
    scipy.io.savemat(
        tmp_path / "devkit" / "cars_meta.mat",
        {"class_names": np.array(names, dtype=object).reshape(1, -1)},
    )
    splits: dict[str, list[FixtureImage]] = {}
    for split, mat_path in (
        ("train", tmp_path / "devkit" / "cars_train_annos.mat"),
        ("test", tmp_path / "cars_test_annos_withlabels.mat"),
    ):
        files, splits[split] = [], []
        for i, (label, kind) in enumerate(_labels_and_kinds(split)):
            file = f"{i + 1:05d}.jpg"
            splits[split].append(_write(tmp_path / f"cars_{split}" / file, kind, label))
            files.append(file)
        classes = [image.label + 1 for image in splits[split]]
        scipy.io.savemat(mat_path, {"annotations": _cars_annotations(files, classes)})
    return FixtureDataset(
        tmp_path, names, splits, tmp_path / "cars_test_annos_withlabels.mat", "test"
    )


def write_vegfru_tree(tmp_path: Path) -> FixtureDataset:
    """`vegfru_list/vegfru_{train,test}.txt` with veg200_images/ and fru92_images/."""
    folders = ["veg200_images/Chinese_artichoke", "veg200_images/asparagus", "fru92_images/apricot"]
    splits: dict[str, list[FixtureImage]] = {}
    number = 0
    for split in ("train", "test"):
        lines, splits[split] = [], []
        for label, kind in _labels_and_kinds(split):
            number += 1
            relative = f"{folders[label]}/v_{label + 1:02d}_01_{number:04d}.jpg"
            splits[split].append(_write(tmp_path / relative, kind, label))
            lines.append(f"{relative} {label}")
        _write_lines(tmp_path / "vegfru_list" / f"vegfru_{split}.txt", lines)
    names = [folder.split("/")[1] for folder in folders]
    return FixtureDataset(
        tmp_path, names, splits, tmp_path / "vegfru_list" / "vegfru_train.txt", "test"
    )


DATASET_WRITERS = {
    "cub": write_cub_tree,
    "aircraft": write_aircraft_tree,
    "nabirds": write_nabirds_tree,
    "food101": write_food101_tree,
    "dogs": write_dogs_tree,
    "cars": write_cars_tree,
    "vegfru": write_vegfru_tree,
}
