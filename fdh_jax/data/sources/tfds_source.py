"""Sources over TFDS datasets that are already built locally (array_record), via
`tfds.data_source`; no TensorFlow at run time.

TFDS retries downloads forever when offline, so this module never builds anything: it first
looks for a prepared copy (`DATA_DIR/<tfds name>/[<config>/]<version>/dataset_info.json` next to
`*.array_record*` shards) and otherwise raises `DatasetNotFoundError` with the command to build
it elsewhere. Images are kept encoded by TFDS (`SkipDecoding`) and decoded by
`fdh_jax.data.decode.decode_image`, so TFDS and extracted copies decode identically.

Labels: TFDS stores them inside the records, so a source reads every record once at construction
(seconds for CUB or Dogs, about a minute for Food-101 on a local disk).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fdh_jax.data.decode import decode_image
from fdh_jax.data.sources.base import DatasetNotFoundError, check_split, check_split_size


def find_prepared_tfds(data_dir: Path, tfds_name: str) -> Path | None:
    """The folder of a locally built array_record copy of `tfds_name`, or None.

    Looks at `data_dir/tfds_name/<version>/` and `data_dir/tfds_name/<config>/<version>/`.
    """
    dataset_dir = data_dir / tfds_name
    if not dataset_dir.is_dir():
        return None
    for info_file in sorted(dataset_dir.glob("*/dataset_info.json")) + sorted(
        dataset_dir.glob("*/*/dataset_info.json")
    ):
        if any(info_file.parent.glob("*.array_record*")):
            return info_file.parent
    return None


def tfds_not_prepared_error(dataset: str, tfds_name: str, data_dir: Path) -> DatasetNotFoundError:
    """The error for a TFDS data dir without a prepared array_record copy of `tfds_name`."""
    return DatasetNotFoundError(
        dataset,
        data_dir / tfds_name / "<version>" / "dataset_info.json (+ *.array_record shards)",
        f"  DATA_DIR/{tfds_name}/<version>/  built by TFDS with file_format=array_record",
        "on a machine with internet access run `tfds build "
        f"{tfds_name} --data_dir=DATA_DIR --file_format=array_record` (TFDS build tools; "
        "manual-download datasets need their archives in DATA_DIR/downloads/manual) and copy "
        "DATA_DIR here",
    )


def _scalar(value: Any) -> Any:
    """A record field as a Python scalar (TFDS may hand back 0-d NumPy arrays)."""
    return value.item() if isinstance(value, np.ndarray) else value


class TfdsSource:
    """A locally built TFDS dataset as a source (contract of `fdh_jax.data.sources.base`).

    Attributes:
      labels: `int32 [N]`, from the records' `label` feature.
      paths: the records' `image/filename` when the dataset has it, else
        "<tfds name>/<tfds split>/<index>".
      class_names: the `label` feature's names.
    """

    def __init__(
        self,
        *,
        name: str,
        tfds_name: str,
        data_dir: Path,
        split: str,
        tfds_split: str,
        expected_size: int | None = None,
    ):
        """Opens the TFDS build of `tfds_name` in `data_dir` (never downloads). TFDS is imported
        here, only when a TFDS copy is used: it is a heavy import that no other layout needs."""
        self.name = name
        self.split = check_split(split)
        self.tfds_name = tfds_name
        self.tfds_split = tfds_split
        self.data_dir = Path(data_dir)
        if find_prepared_tfds(self.data_dir, tfds_name) is None:
            raise tfds_not_prepared_error(name, tfds_name, self.data_dir)
        import tensorflow_datasets as tfds  # noqa: PLC0415

        def open_records(encoded: list[str]):
            return tfds.data_source(
                tfds_name,
                split=tfds_split,
                data_dir=str(self.data_dir),
                download=False,
                decoders={name: tfds.decode.SkipDecoding() for name in encoded},
            )

        self._records = open_records(["image"])
        # Leave every image-type field encoded (CUB's segmentation masks, for one): only "image"
        # is ever decoded, by us, and decoding the others would cost a PIL decode per read.
        encoded = [
            name
            for name, feature in self._records.dataset_info.features.items()
            if isinstance(feature, tfds.features.Image)
        ]
        if encoded != ["image"]:
            self._records = open_records(encoded)
        self.class_names = list(self._records.dataset_info.features["label"].names)
        self.num_classes = len(self.class_names)
        labels, paths = [], []
        for index in range(len(self._records)):
            record = self._records[index]
            labels.append(int(record["label"]))
            paths.append(self._record_path(record, index))
        self.labels = np.asarray(labels, dtype=np.int32)
        self.paths = paths
        check_split_size(name, split, len(self.paths), expected_size)

    def _record_path(self, record: dict[str, Any], index: int) -> str:
        filename = _scalar(record.get("image/filename"))
        if filename is None:
            return f"{self.tfds_name}/{self.tfds_split}/{index}"
        return filename.decode("utf-8") if isinstance(filename, bytes) else str(filename)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._records[index]
        path = self.paths[index]
        image = decode_image(_scalar(record["image"]), name=path)
        return {"image": image, "label": int(record["label"]), "path": path}

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self.name!r}, tfds={self.tfds_name}:{self.tfds_split}, "
            f"{len(self)} images, {self.num_classes} classes)"
        )
