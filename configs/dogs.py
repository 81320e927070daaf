"""Stanford Dogs, 120 breeds: 12,000 database / 8,580 query images.

`python -m fdh_jax.main --config=configs/dogs.py --workdir=WORKDIR [--config.data.root=ROOT]`
or `--config=configs/dogs.py:ROOT` (ROOT after ":").
Default ROOT: `~/data/stanford_dogs`.

Root: the folder holding `Images/` and the `*_list.mat` files (in `lists/` or beside
`Images/`), or a TFDS data dir with a built `stanford_dogs`; see `fdh_jax/data/sources/dogs.py`.

Protocol (docs/design.md, "Evaluation protocol"): ResNet-50 from ImageNet weights
(`hf://timm/resnet50.tv_in1k`, or `--config.model.pretrained=FILE`) at 0.1x the learning rate,
random-resized crop 224 + flip for training, resize 256 + centre crop 224 for evaluation;
database = the official train split, query = the official test split.
"""

from pathlib import Path

import ml_collections

from fdh_jax.config_files import load_config, paper_protocol

DEFAULT_ROOT = "~/data/stanford_dogs"  # `~` is expanded when the source opens it


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default config with this dataset and the paper protocol; `arg` = dataset root."""
    config = load_config(Path(__file__).with_name("default.py"))
    return paper_protocol(config, "dogs", arg or DEFAULT_ROOT)
