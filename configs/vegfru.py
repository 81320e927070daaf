"""VegFru, 292 vegetable and fruit classes: the 29,200-image train list is the database.

`python -m fdh_jax.main --config=configs/vegfru.py --workdir=WORKDIR [--config.data.root=ROOT]`
or `--config=configs/vegfru.py:ROOT` (ROOT after ":").
Default ROOT: `~/data/vegfru`.

Root: the folder holding `vegfru_list/`, `veg200_images/` and `fru92_images/`; see
`fdh_jax/data/sources/vegfru.py`.

Protocol (docs/design.md, "Evaluation protocol"): ResNet-50 from ImageNet weights
(`hf://timm/resnet50.tv_in1k`, or `--config.model.pretrained=FILE`) at 0.1x the learning rate,
random-resized crop 224 + flip for training, resize 256 + centre crop 224 for evaluation;
database = `vegfru_train.txt`, query = `vegfru_test.txt`.
"""

from pathlib import Path

import ml_collections

from fdh_jax.config_files import load_config, paper_protocol

DEFAULT_ROOT = "~/data/vegfru"  # `~` is expanded when the source opens it


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default config with this dataset and the paper protocol; `arg` = dataset root."""
    config = load_config(Path(__file__).with_name("default.py"))
    return paper_protocol(config, "vegfru", arg or DEFAULT_ROOT)
