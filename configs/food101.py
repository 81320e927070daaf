"""Food-101: 75,750 database / 25,250 query images.

`python -m fdh_jax.main --config=configs/food101.py --workdir=WORKDIR [--config.data.root=ROOT]`
or `--config=configs/food101.py:ROOT` (ROOT after ":").
Default ROOT: `~/data/food-101`.

Root: the extracted `food-101/` (or its parent), or a TFDS data dir with a built `food101`;
see `fdh_jax/data/sources/food101.py`.

Protocol (docs/design.md, "Evaluation protocol"): ResNet-50 from ImageNet weights
(`hf://timm/resnet50.tv_in1k`, or `--config.model.pretrained=FILE`) at 0.1x the learning rate,
random-resized crop 224 + flip for training, resize 256 + centre crop 224 for evaluation;
database = the official train split, query = the official test split.
"""

from pathlib import Path

import ml_collections

from fdh_jax.config_files import load_config, paper_protocol

DEFAULT_ROOT = "~/data/food-101"  # `~` is expanded when the source opens it


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default config with this dataset and the paper protocol; `arg` = dataset root."""
    config = load_config(Path(__file__).with_name("default.py"))
    return paper_protocol(config, "food101", arg or DEFAULT_ROOT)
