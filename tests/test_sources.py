"""Tests of image decoding, bad-image scanning and every dataset source layout.

Each layout gets a tiny fixture tree in its real on-disk format (list files, .mat files); a last
test reads the real CUB subset in /work/shared/data/cub100 through the `folder` source.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import (
    DATASET_WRITERS,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    NUM_FIXTURE_CLASSES,
    color_for,
    solid_rgb,
    truncated_jpeg_bytes,
    write_image_kind,
    write_rgb_jpeg,
    write_truncated_jpeg,
)
from PIL import Image

from fdh_jax.data import decode
from fdh_jax.data.decode import (
    BadImage,
    BadImageError,
    BadImagesFoundError,
    decode_image,
    find_bad_images,
    without_images,
)
from fdh_jax.data.image_scan import scan_splits
from fdh_jax.data.sources import (
    PUBLISHED_SPLIT_SIZES,
    DatasetNotFoundError,
    SplitSizeMismatchError,
    make_source,
    tfds_source,
)
from fdh_jax.data.sources.folder import FolderSource

JPEG_TOLERANCE = 4  # solid-colour JPEGs decode within a few levels of the written colour


def assert_solid(image: np.ndarray, color, tolerance: int = JPEG_TOLERANCE) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, image.shape
    difference = np.abs(image.astype(int) - np.asarray(color, int)[None, None, :])
    assert difference.max() <= tolerance, (image[0, 0], color)


# ---------------------------------------------------------------------------- decode_image


@pytest.mark.parametrize("kind", ["rgb", "gray", "cmyk", "rgba"])
def test_decode_image_modes_give_rgb_uint8(tmp_path, kind):
    path = tmp_path / f"image.{'png' if kind == 'rgba' else 'jpg'}"
    expected = write_image_kind(path, kind, index=3)
    image = decode_image(path)
    assert image.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3)
    assert image.flags.c_contiguous
    assert_solid(image, expected, tolerance=1 if kind == "rgba" else JPEG_TOLERANCE)


def test_decode_image_palette_with_transparency_composites_on_white():
    palette_image = Image.new("P", (4, 2), 0)
    palette_image.putpalette([10, 20, 30] + [200, 100, 50] + [0, 0, 0] * 254)
    palette_image.putpixel((1, 0), 1)
    palette_image.info["transparency"] = 0  # index 0 fully transparent
    buffer = io.BytesIO()
    palette_image.save(buffer, "PNG", transparency=0)
    image = decode_image(buffer.getvalue())
    assert image.shape == (2, 4, 3)
    np.testing.assert_array_equal(image[0, 1], [200, 100, 50])
    np.testing.assert_array_equal(image[0, 0], [255, 255, 255])


def test_decode_image_16_bit_grayscale_is_scaled():
    values = np.array([[0, 257, 65535], [25700, 1000, 40000]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    image = decode_image(buffer.getvalue())
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(image[:, :, 0], expected)
    np.testing.assert_array_equal(image[:, :, 2], expected)


def test_decode_image_applies_exif_orientation():
    pixels = solid_rgb((200, 30, 30), height=6, width=10)
    pixels[:, :5] = (30, 30, 200)  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    shown = decode_image(buffer.getvalue())
    raw = decode_image(buffer.getvalue(), apply_exif_orientation=False)
    assert raw.shape == (6, 10, 3)
    assert shown.shape == (10, 6, 3)
    # Rotating 90 degrees clockwise puts the left (blue) half on top.
    assert shown[1, 3, 2] > 150 and shown[8, 3, 0] > 150


def test_decode_image_rejects_truncated_jpeg_with_path(tmp_path):
    path = write_truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(BadImageError) as raised:
        decode_image(path)
    assert raised.value.path == str(path)
    assert "truncated" in raised.value.reason
    with pytest.raises(BadImageError):
        decode_image(truncated_jpeg_bytes())


def test_decode_image_refuses_when_truncated_loading_was_enabled(tmp_path, monkeypatch):
    path = write_rgb_jpeg(tmp_path / "a.jpg", color_for(0))
    monkeypatch.setattr(decode.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(path)


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "file not found"),
        (b"", r"empty file \(0 bytes\)"),
        (b"hello, not an image", "not a recognised image format"),
    ],
)
def test_decode_image_bad_files(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as raised:
        decode_image(path)
    assert raised.value.path == str(path)
    restored = pickle.loads(pickle.dumps(raised.value))  # crosses grain worker processes
    assert (restored.path, restored.reason) == (raised.value.path, raised.value.reason)


# ---------------------------------------------------------------------------- folder source


def write_class_folders(images_dir: Path, kinds_per_class: dict[str, list[str]]) -> dict:
    """Writes `images_dir/<class>/<k>.<ext>`; returns {path: expected RGB or None}."""
    expected = {}
    for class_index, (class_name, kinds) in enumerate(sorted(kinds_per_class.items())):
        for k, kind in enumerate(kinds):
            extension = ".png" if kind == "rgba" else ".jpg"
            path = images_dir / class_name / f"{k:02d}{extension}"
            expected[str(path)] = write_image_kind(path, kind, class_index)
    return expected


def test_folder_seeded_split_is_deterministic_and_keeps_a_train_image(tmp_path):
    counts = {"b_class": 5, "a_class": 4, "c_class": 1}
    write_class_folders(tmp_path, {c: ["rgb"] * n for c, n in counts.items()})
    (tmp_path / "a_class" / "notes.txt").write_text("not an image")
    (tmp_path / "a_class" / ".hidden.jpg").write_bytes(b"")
    train = FolderSource(tmp_path, "train", seed=3, test_fraction=0.5)
    test = FolderSource(tmp_path, "test", seed=3, test_fraction=0.5)
    assert train.class_names == ["a_class", "b_class", "c_class"]
    assert train.num_classes == test.num_classes == 3
    # round(0.5 * n) test images, at most n - 1: a 2/2, b 2/3 (round half to even), c 1/0.
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=3), [2, 2, 0])
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=3), [2, 3, 1])
    assert not set(train.paths) & set(test.paths)
    assert len(train.paths) + len(test.paths) == sum(counts.values())
    again = FolderSource(tmp_path, "test", seed=3, test_fraction=0.5)
    assert again.paths == test.paths
    other_seeds = {tuple(FolderSource(tmp_path, "test", seed=s).paths) for s in range(8)}
    assert len(other_seeds) > 1  # the seed matters
    for source in (train, test):
        for i in range(len(source)):
            item = source[i]
            class_name = Path(item["path"]).parent.name
            assert item["label"] == source.class_names.index(class_name)
            assert_solid(item["image"], color_for(source.class_names.index(class_name)))


def test_folder_split_of_a_class_does_not_depend_on_other_classes(tmp_path):
    write_class_folders(tmp_path / "one", {"x": ["rgb"] * 6})
    write_class_folders(tmp_path / "two", {"x": ["rgb"] * 6, "y": ["rgb"] * 3})
    names = [
        [Path(p).name for p in FolderSource(tmp_path / d, "test", seed=1).paths if "/x/" in p]
        for d in ("one", "two")
    ]
    assert names[0] == names[1]


def test_folder_images_subfolder_and_extensions(tmp_path):
    images = tmp_path / "images"
    write_rgb_jpeg(images / "cat" / "A.JPG", (200, 30, 30))
    Image.fromarray(solid_rgb((30, 200, 30))).save(images / "cat" / "b.bmp")
    (images / "dog").mkdir()
    Image.fromarray(solid_rgb((30, 30, 200))).save(images / "dog" / "c.PNG")
    Image.fromarray(solid_rgb((30, 30, 200))).save(images / "dog" / "d.webp", lossless=True)
    Image.fromarray(solid_rgb((30, 30, 200))).convert("P").save(images / "dog" / "e.gif")
    (images / "dog" / "f.tiff").write_bytes(b"ignored extension")
    source = make_source("folder", tmp_path, "train", test_fraction=0.25)
    everything = source.paths + make_source("folder", tmp_path, "test", test_fraction=0.25).paths
    assert sorted(Path(p).name for p in everything) == [
        "A.JPG",
        "b.bmp",
        "c.PNG",
        "d.webp",
        "e.gif",
    ]
    assert all(Path(p).parent.parent == images for p in everything)


def test_folder_split_csv_with_bad_images_and_policy(tmp_path, capsys):
    expected = write_class_folders(
        tmp_path / "images",
        {
            "Gull": ["rgb", "gray", "rgb"],
            "Albatross": ["cmyk", "rgba", "truncated", "rgb"],
        },
    )
    (tmp_path / "images" / "Gull" / "unlisted.jpg").write_bytes(b"not listed: never read")
    rows = ["path,split"]
    for path in sorted(expected):
        relative = Path(path).relative_to(tmp_path).as_posix()
        rows.append(f"{relative},{'test' if relative.endswith('00.jpg') else 'train'}")
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")

    train = make_source("folder", str(tmp_path), "train")
    test = make_source("folder", str(tmp_path), "test")
    assert train.class_names == test.class_names == ["Albatross", "Gull"]
    assert sorted(Path(p).name for p in test.paths) == ["00.jpg", "00.jpg"]
    assert len(train) == 5
    assert train.labels.dtype == np.int32
    for source in (train, test):
        for i, path in enumerate(source.paths):
            assert source.labels[i] == source.class_names.index(Path(path).parent.name)
            if expected[path] is None:
                continue
            item = source[i]
            assert item["path"] == path and item["label"] == source.labels[i]
            assert_solid(item["image"], expected[path], tolerance=JPEG_TOLERANCE)

    truncated_path = str(tmp_path / "images" / "Albatross" / "02.jpg")
    bad = find_bad_images(train, max_workers=2, progress=None)
    assert [b.path for b in bad] == [truncated_path]
    assert "truncated" in bad[0].reason
    assert find_bad_images(test, max_workers=2, progress=None) == []

    def apply(source, policy):
        return scan_splits({"train": source}, policy, use_cache=False, progress=None)["train"]

    with pytest.raises(BadImagesFoundError) as raised:
        apply(train, "error")
    assert "1 unreadable image(s) in folder (train: 1)" in str(raised.value)
    assert truncated_path in str(raised.value)
    kept = apply(train, "skip")
    assert "skipping 1 unreadable image(s)" in capsys.readouterr().err
    assert len(kept) == 4 and truncated_path not in kept.paths
    assert kept.labels.tolist() == [
        train.labels[i] for i in range(5) if train.paths[i] in kept.paths
    ]
    assert find_bad_images(kept, progress=None) == []
    assert kept.num_classes == 2 and kept.split == "train"
    assert apply(test, "error") is test
    with pytest.raises(ValueError, match="bad_images"):
        apply(test, "ignore")


def test_find_bad_images_reports_progress_and_index_order(tmp_path):
    paths = []
    for i in range(6):
        if i in (1, 4):
            paths.append(write_truncated_jpeg(tmp_path / "x" / f"{i}.jpg"))
        else:
            paths.append(write_rgb_jpeg(tmp_path / "x" / f"{i}.jpg", color_for(i)))
    source = FolderSource(tmp_path, "train", test_fraction=0.01)  # 6 * 0.01 rounds to 0 test
    calls = []
    bad = find_bad_images(
        source, max_workers=3, progress=lambda *a: calls.append(a), progress_every_s=0.0
    )
    assert bad == [BadImage(str(paths[1]), bad[0].reason), BadImage(str(paths[4]), bad[1].reason)]
    assert calls and calls[-1][:3] == (6, 6, 2)
    assert without_images(source, []) is source
    assert len(without_images(source, [str(paths[1])])) == 5


def test_folder_split_csv_errors(tmp_path):
    write_rgb_jpeg(tmp_path / "images" / "a" / "1.jpg", (200, 30, 30))
    write_rgb_jpeg(tmp_path / "images" / "a" / "2.jpg", (200, 30, 30))
    split_file = tmp_path / "split.csv"
    split_file.write_text("path,split\nimages/a/1.jpg,train\nimages/a/2.jpg,validation\n")
    with pytest.raises(ValueError, match=r"split.csv:3: split must be train or test"):
        make_source("folder", tmp_path, "train")
    split_file.write_text("path,split\nimages/a/1.jpg,train\nimages/a/1.jpg,test\n")
    with pytest.raises(ValueError, match="listed twice"):
        make_source("folder", tmp_path, "train")
    split_file.write_text("path,split\nimages/a/1.jpg,train\nimages/a/9.jpg,test\n")
    with pytest.raises(DatasetNotFoundError, match=r"images/a/9.jpg"):
        make_source("folder", tmp_path, "test")
    split_file.write_text("file,set\nimages/a/1.jpg,train\n")
    with pytest.raises(ValueError, match="header"):
        make_source("folder", tmp_path, "train")


def test_folder_missing_root_and_empty_root(tmp_path):
    with pytest.raises(DatasetNotFoundError) as raised:
        make_source("folder", tmp_path / "nowhere", "train")
    message = str(raised.value)
    assert str(tmp_path / "nowhere") in message and "DIR/images/<class>/<image file>" in message
    assert isinstance(raised.value, FileNotFoundError)
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="<class>"):
        make_source("folder", tmp_path / "empty", "train")


def test_make_source_rejects_unknown_names_and_splits(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*folder"):
        make_source("imagenet", tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        make_source("folder", tmp_path, "validation")


def test_errors_survive_pickling():
    not_found = DatasetNotFoundError("cub", "/x/images.txt", "layout", "from somewhere")
    restored = pickle.loads(pickle.dumps(not_found))
    assert str(restored) == str(not_found) and restored.missing_path == "/x/images.txt"
    mismatch = SplitSizeMismatchError("cub", "test", 3, 5794)
    assert str(pickle.loads(pickle.dumps(mismatch))) == str(mismatch)


# ---------------------------------------------------------------------------- dataset layouts


@pytest.fixture(params=sorted(DATASET_WRITERS))
def fixture_dataset(request, tmp_path):
    return request.param, DATASET_WRITERS[request.param](tmp_path)


def test_layout_labels_splits_and_decoding(fixture_dataset):
    name, dataset = fixture_dataset
    for split, images in dataset.splits.items():
        source = make_source(name, dataset.root, split, check_counts=False)
        assert (source.name, source.split) == (name, split)
        assert source.class_names == dataset.class_names
        assert source.num_classes == NUM_FIXTURE_CLASSES
        assert source.paths == [image.path for image in images]
        assert source.labels.dtype == np.int32
        assert source.labels.tolist() == [image.label for image in images]
        for i, image in enumerate(images):
            if image.color is None:
                continue
            item = source[i]
            assert item["image"].shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3)
            assert (item["label"], item["path"]) == (image.label, image.path)
            assert_solid(item["image"], image.color, tolerance=JPEG_TOLERANCE)


def test_layout_bad_image_detection(fixture_dataset):
    name, dataset = fixture_dataset
    train = make_source(name, dataset.root, "train", check_counts=False)
    truncated = [image.path for image in dataset.splits["train"] if image.color is None]
    bad = find_bad_images(train, max_workers=2, progress=None)
    assert [b.path for b in bad] == truncated and len(truncated) == 1
    with pytest.raises(BadImageError, match="truncated"):
        train[train.paths.index(truncated[0])]
    kept = without_images(train, bad)
    assert len(kept) == len(train) - 1 and truncated[0] not in kept.paths


def test_layout_count_check(fixture_dataset, monkeypatch):
    name, dataset = fixture_dataset
    sizes = {split: len(images) for split, images in dataset.splits.items()}
    with pytest.raises(SplitSizeMismatchError) as raised:  # the published (real) sizes
        make_source(name, dataset.root, "train")
    published = PUBLISHED_SPLIT_SIZES[name]["train"]
    assert (raised.value.actual, raised.value.expected) == (sizes["train"], published)
    assert f"{name} split 'train' has {sizes['train']} images" in str(raised.value)
    assert f"{published}" in str(raised.value)
    monkeypatch.setitem(PUBLISHED_SPLIT_SIZES, name, dict(sizes))
    for split in ("train", "test"):
        assert len(make_source(name, dataset.root, split)) == sizes[split]
    monkeypatch.setitem(PUBLISHED_SPLIT_SIZES, name, {"train": 5, "test": sizes["test"] + 1})
    assert len(make_source(name, dataset.root, "train", check_counts=False)) == sizes["train"]
    with pytest.raises(SplitSizeMismatchError, match=rf"{name} split 'test' has {sizes['test']}"):
        make_source(name, dataset.root, "test")


def test_layout_missing_root_and_list_file(fixture_dataset, tmp_path):
    name, dataset = fixture_dataset
    nowhere = tmp_path / "not_here"
    with pytest.raises(DatasetNotFoundError) as raised:
        make_source(name, nowhere, "train", check_counts=False)
    message = str(raised.value)
    assert str(nowhere) in message
    assert "Expected layout:" in message and "How to get it:" in message
    assert isinstance(raised.value, FileNotFoundError)
    dataset.missing_list_file.unlink()
    with pytest.raises(DatasetNotFoundError) as raised:
        make_source(name, dataset.root, dataset.missing_list_split, check_counts=False)
    assert str(dataset.missing_list_file) in str(raised.value)


def test_aircraft_crops_the_copyright_banner(tmp_path):
    dataset = DATASET_WRITERS["aircraft"](tmp_path)
    source = make_source("aircraft", dataset.root, "test", check_counts=False)
    raw = decode_image(source.paths[0])
    assert raw.shape == (IMAGE_HEIGHT + 20, IMAGE_WIDTH, 3) and raw[-1].max() < 10
    cropped = source[0]["image"]
    np.testing.assert_array_equal(cropped, raw[:-20])


def test_nabirds_uses_leaf_classes_in_numeric_id_order(tmp_path):
    dataset = DATASET_WRITERS["nabirds"](tmp_path)
    source = make_source("nabirds", dataset.root, "train", check_counts=False)
    assert source.class_ids == [295, 313, 1000]
    assert source.class_names == ["Mallard (Male)", "Wood Duck", "Common Raven"]
    labels_file = dataset.root / "image_class_labels.txt"
    first_id = labels_file.read_text().split()[0]
    labels_file.write_text(labels_file.read_text().replace(f"{first_id} 295", f"{first_id} 2"))
    with pytest.raises(ValueError, match="inner taxonomy nodes"):
        make_source("nabirds", dataset.root, "train", check_counts=False)


def test_tfds_root_without_a_built_copy_fails_fast(tmp_path):
    (tmp_path / "caltech_birds2011" / "3.1.0").mkdir(parents=True)  # no dataset_info.json
    (tmp_path / "downloads").mkdir()
    with pytest.raises(DatasetNotFoundError) as raised:
        make_source("cub", tmp_path, "train")
    assert "images.txt" in str(raised.value) and "caltech_birds2011" in str(raised.value)
    info = tmp_path / "caltech_birds2011" / "3.1.0" / "dataset_info.json"
    info.write_text("{}")
    assert tfds_source.find_prepared_tfds(tmp_path, "caltech_birds2011") is None  # no shards
    (info.parent / "caltech_birds2011-train.array_record-00000-of-00001").write_bytes(b"")
    assert tfds_source.find_prepared_tfds(tmp_path, "caltech_birds2011") == info.parent
    with pytest.raises(DatasetNotFoundError, match="tfds build food101"):
        tfds_source.TfdsSource(
            name="food101",
            tfds_name="food101",
            data_dir=tmp_path,
            split="test",
            tfds_split="validation",
        )


def test_tfds_source_reads_labels_and_decodes_record_bytes(tmp_path, monkeypatch):
    """The adapter over `tfds.data_source`, with a fake record sequence standing in for a build."""
    tfds = pytest.importorskip("tensorflow_datasets")
    built = tmp_path / "food101" / "2.0.0"
    built.mkdir(parents=True)
    (built / "dataset_info.json").write_text("{}")
    (built / "food101-validation.array_record-00000-of-00001").write_bytes(b"")
    encoded = []
    for label in (2, 0):
        buffer = io.BytesIO()
        Image.fromarray(solid_rgb(color_for(label))).save(buffer, "JPEG", quality=95)
        encoded.append({"image": buffer.getvalue(), "label": np.int64(label)})
    encoded.append({"image": truncated_jpeg_bytes(), "label": np.int64(1)})

    class FakeLabel:
        names = ["apple_pie", "baby_back_ribs", "caesar_salad"]

    class FakeRecords(list):
        features = {"image": tfds.features.Image(), "label": FakeLabel()}
        dataset_info = type("Info", (), {"features": features})()

    calls = []

    def fake_data_source(name, **kwargs):
        calls.append((name, kwargs))
        return FakeRecords(encoded)

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    source = make_source("food101", tmp_path, "test", check_counts=False)
    ((name, kwargs),) = calls
    assert name == "food101" and kwargs["split"] == "validation"
    assert kwargs["download"] is False and kwargs["data_dir"] == str(tmp_path)
    assert isinstance(kwargs["decoders"]["image"], tfds.decode.SkipDecoding)
    assert source.labels.tolist() == [2, 0, 1] and source.labels.dtype == np.int32
    assert source.paths == ["food101/validation/0", "food101/validation/1", "food101/validation/2"]
    assert source.class_names == FakeLabel.names and source.num_classes == 3
    item = source[0]
    assert item["label"] == 2 and item["path"] == "food101/validation/0"
    assert_solid(item["image"], color_for(2))
    bad = find_bad_images(source, progress=None)
    assert [b.path for b in bad] == ["food101/validation/2"]
    with pytest.raises(SplitSizeMismatchError, match="food101 split 'test' has 3"):
        make_source("food101", tmp_path, "test")


# ---------------------------------------------------------------------------- real data


def shared_data_dir() -> Path:
    if os.environ.get("FDH_SHARED"):
        return Path(os.environ["FDH_SHARED"]) / "data"
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def test_real_cub100_folder_with_split_csv():
    root = shared_data_dir() / "cub100"
    if not (root / "split.csv").is_file():
        pytest.skip(f"real CUB subset not found at {root} (set FDH_SHARED to the shared folder)")
    train = make_source("folder", root, "train")
    test = make_source("folder", root, "test")
    assert (len(train), len(test)) == (2944, 2958)
    assert train.num_classes == test.num_classes == 100
    assert train.class_names == test.class_names
    assert train.class_names == sorted(p.name for p in (root / "images").iterdir())
    assert not set(train.paths) & set(test.paths)
    # Labels agree with the independently made labels.csv (class_index = sorted folder order).
    label_of = {}
    for line in (root / "labels.csv").read_text().splitlines()[1:]:
        relative, class_index, _ = line.split(",")
        label_of[str(root / relative)] = int(class_index)
    for source in (train, test):
        assert [label_of[p] for p in source.paths] == source.labels.tolist()
        assert np.bincount(source.labels, minlength=100).min() >= 1
    for i in (0, 1234, len(test) - 1):
        item = test[i]
        assert item["image"].shape == (227, 227, 3) and item["image"].dtype == np.uint8
        assert item["image"].std() > 5  # a photo, not a blank fill
        assert item["label"] == label_of[item["path"]]
    assert train[17]["image"].shape == (227, 227, 3)
