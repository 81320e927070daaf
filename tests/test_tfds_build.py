"""A real (tiny) TFDS build on disk, read back through `TfdsSource` and the CUB config path.

`tests/test_sources.py` fakes `tfds.data_source`; here `GeneratorBasedBuilder`s defined below
write genuine array_record shards (+ `dataset_info.json`, `features.json`) from PNG files into
`tmp_path`, without TensorFlow and without any download, and the project's readers open them:

* a test-only dataset (not in the TFDS registry, so `tfds.data_source` rebuilds it from the
  files on disk) read with `TfdsSource` directly, "test" mapped to a "validation" TFDS split as
  Food-101 does;
* a copy of the layout of TFDS `caltech_birds2011` 0.2.0 (same name, version and features, so
  `tfds.data_source` opens it with TFDS's registered `CaltechBirds2011` class, as on a real
  build) reached from `configs/cub.py` through `load_split` -> `make_source("cub")`.

Both builder classes use `skip_registration=True`, so nothing is added to the TFDS registry.
Sockets are refused and a SIGALRM deadline bounds each test: TFDS retries downloads forever
when offline, so an accidental download must fail, not hang.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdh_jax.config_files import load_config
from fdh_jax.data import load_split
from fdh_jax.data.sources import PUBLISHED_SPLIT_SIZES, make_source
from fdh_jax.data.sources.base import SplitSizeMismatchError
from fdh_jax.data.sources.tfds_source import TfdsSource, find_prepared_tfds

tfds = pytest.importorskip(
    "tensorflow_datasets",
    reason="tensorflow_datasets is not importable (a dependency of fdh_jax: pip install -e .)",
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 120  # the whole file runs in a few seconds; this only stops a hang
CUB_VERSION = "0.2.0"  # tensorflow_datasets.image_classification.caltech_birds.CaltechBirds2011


@pytest.fixture(autouse=True)
def offline_with_deadline(monkeypatch, tmp_path):
    """No network (connect raises at once), TFDS_DATA_DIR in tmp_path, and a hard deadline."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline TFDS test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_default"))

    def expire(signum, frame):
        raise TimeoutError(f"TFDS build/read took over {DEADLINE_S} s (network retry?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(DEADLINE_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _ExampleBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the `examples` given at construction ({split: [(key, example dict)]})."""

    def __init__(self, *, examples: dict[str, list[tuple[str, dict]]] | None = None, **kwargs):
        self._examples = examples or {}
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # never used: nothing is downloaded
        return {split: self._generate_examples(rows) for split, rows in self._examples.items()}

    def _generate_examples(self, rows):
        yield from rows

    def _features(self) -> dict:
        raise NotImplementedError

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(self._features()),
            supervised_keys=("image", "label"),
        )


class FdhTinyTfdsTest(_ExampleBuilder, skip_registration=True):
    """A test-only dataset: PNG image, its file name, 3 named classes."""

    VERSION = tfds.core.Version("1.0.0")
    CLASS_NAMES = ["albatross", "bunting", "cormorant"]

    def _features(self) -> dict:
        return {
            "image": tfds.features.Image(),
            "image/filename": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=self.CLASS_NAMES),
        }


class CaltechBirds2011(_ExampleBuilder, skip_registration=True):
    """Name, version and features of TFDS `caltech_birds2011` (CUB-200-2011)."""

    name = "caltech_birds2011"
    VERSION = tfds.core.Version(CUB_VERSION)

    def _features(self) -> dict:
        return {
            "image": tfds.features.Image(),
            "image/filename": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=200),
            "label_name": tfds.features.Text(),
            "bbox": tfds.features.BBoxFeature(),
            "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
        }


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "PNG")
    return path


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def build(builder_class, data_dir: Path, examples) -> Path:
    """Builds `builder_class` into `data_dir` (array_record) and returns the version folder."""
    tensorflow_before = "tensorflow" in sys.modules
    builder = builder_class(examples=examples, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    assert tensorflow_before or "tensorflow" not in sys.modules, "the build imported TensorFlow"
    return Path(builder.data_dir)


def assert_matches(source, expected: dict[str, tuple[int, np.ndarray]]) -> None:
    """`source` holds exactly the `expected` {path: (label, RGB pixels)}, pixel for pixel."""
    assert len(source) == len(expected)
    assert sorted(source.paths) == sorted(expected)
    assert source.labels.dtype == np.int32
    for index, path in enumerate(source.paths):
        label, pixels = expected[path]
        assert source.labels[index] == label, path
        item = source[index]
        assert item["path"] == path and item["label"] == label
        assert item["image"].dtype == np.uint8 and item["image"].shape == pixels.shape, path
        np.testing.assert_array_equal(item["image"], pixels, err_msg=path)


def test_tfds_source_reads_a_real_array_record_build(tmp_path):
    tensorflow_before = "tensorflow" in sys.modules
    data_dir = tmp_path / "tfds"
    rng = np.random.default_rng(0)
    examples: dict[str, list] = {"train": [], "validation": []}
    expected: dict[str, dict[str, tuple[int, np.ndarray]]] = {"train": {}, "validation": {}}
    for index, (split, label) in enumerate(
        [
            ("train", 0),
            ("train", 2),
            ("train", 1),
            ("train", 2),
            ("validation", 1),
            ("validation", 0),
        ]
    ):
        pixels = random_rgb(rng, 5 + index, 7 + 2 * index)  # a different size for each image
        name = f"{FdhTinyTfdsTest.CLASS_NAMES[label]}/{split}_{index}.png"
        file = write_png(tmp_path / "images" / name, pixels)
        example = {"image": str(file), "image/filename": name, "label": label}
        examples[split].append((name, example))
        expected[split][name] = (label, pixels)
    built = build(FdhTinyTfdsTest, data_dir, examples)

    assert built == data_dir / "fdh_tiny_tfds_test" / "1.0.0"
    assert find_prepared_tfds(data_dir, "fdh_tiny_tfds_test") == built
    assert sorted(p.name for p in built.glob("*.array_record*")) == [
        "fdh_tiny_tfds_test-train.array_record-00000-of-00001",
        "fdh_tiny_tfds_test-validation.array_record-00000-of-00001",
    ]
    for split, tfds_split in [("train", "train"), ("test", "validation")]:
        source = TfdsSource(
            name="tiny",
            tfds_name="fdh_tiny_tfds_test",
            data_dir=data_dir,
            split=split,
            tfds_split=tfds_split,
            expected_size=len(expected[tfds_split]),
        )
        assert source.split == split and source.tfds_split == tfds_split
        assert source.class_names == FdhTinyTfdsTest.CLASS_NAMES and source.num_classes == 3
        assert_matches(source, expected[tfds_split])
    assert tensorflow_before or "tensorflow" not in sys.modules, "reading imported TensorFlow"


def test_cub_config_reads_a_built_caltech_birds2011(tmp_path, monkeypatch):
    """configs/cub.py with ROOT = a TFDS data dir -> load_split -> make_source -> TfdsSource."""
    data_dir = tmp_path / "tfds"
    rng = np.random.default_rng(1)
    examples: dict[str, list] = {"train": [], "test": []}
    expected: dict[str, dict[str, tuple[int, np.ndarray]]] = {"train": {}, "test": {}}
    rows = [("train", 0), ("train", 199), ("train", 57), ("test", 199), ("test", 0)]
    for index, (split, label) in enumerate(rows):
        folder = f"{label + 1:03d}.Bird_{label + 1}"
        name = f"{folder}/Bird_{label + 1}_{index:04d}.png"
        pixels = random_rgb(rng, 6 + index, 9)
        if index == 2:  # CUB holds a few grayscale photos; TFDS keeps their bytes as they are
            gray = pixels[:, :, 0]
            file = write_png(tmp_path / "images" / name, gray)
            pixels = np.repeat(gray[:, :, None], 3, axis=2)
        else:
            file = write_png(tmp_path / "images" / name, pixels)
        mask = write_png(tmp_path / "masks" / name, (pixels[:, :, 0] > 127).astype(np.uint8) * 255)
        example = {
            "image": str(file),
            "image/filename": name,
            "label": label,
            "label_name": folder,
            "bbox": tfds.features.BBox(ymin=0.1, xmin=0.2, ymax=0.8, xmax=0.9),
            "segmentation_mask": str(mask),
        }
        examples[split].append((name, example))
        expected[split][name] = (label, pixels)
    built = build(CaltechBirds2011, data_dir, examples)
    assert built == data_dir / "caltech_birds2011" / CUB_VERSION

    config = load_config(REPO_ROOT / "configs" / "cub.py", str(data_dir))
    assert config.data.name == "cub" and config.data.root == str(data_dir)
    with monkeypatch.context() as sizes:
        sizes.setitem(PUBLISHED_SPLIT_SIZES, "cub", {"train": 3, "test": 2})
        for split in ("train", "test"):
            source = load_split(config, split)  # scans every image (data.bad_images) first
            assert isinstance(source, TfdsSource), type(source)
            assert source.name == "cub" and source.split == split
            assert source.num_classes == 200 and source.class_names[:2] == ["0", "1"]
            assert_matches(source, expected[split])
            # Only "image" is decoded, by us; the masks stay PNG bytes (no PIL decode per read).
            assert isinstance(source._records[0]["segmentation_mask"], bytes)
    # With the published CUB sizes the tiny copy is refused, as an incomplete download would be.
    with pytest.raises(
        SplitSizeMismatchError, match="has 3 images but the published split has 5994"
    ):
        make_source("cub", data_dir, "train")
