"""Any folder of class sub-folders (docs/design.md, "Contracts"); `data.root` must be given.

`python -m fdh_jax.main --config=configs/folder.py --workdir=WORKDIR --config.data.root=DIR`
or `--config=configs/folder.py:DIR` (DIR after ":"; no default).

Layout: `DIR/images/<class>/<file>` or `DIR/<class>/<file>`; `DIR/split.csv` (`path,split`)
if present, else a per-class split seeded by `config.seed` holding out `data.test_fraction`;
see `fdh_jax/data/sources/folder.py`.

Protocol (docs/design.md, "Evaluation protocol"): ResNet-50 from ImageNet weights
(`hf://timm/resnet50.tv_in1k`, or `--config.model.pretrained=FILE`) at 0.1x the learning rate,
random-resized crop 224 + flip for training, resize 256 + centre crop 224 for evaluation;
database = the train split, query = the test split.
"""

from pathlib import Path

import ml_collections

from fdh_jax.config_files import load_config, paper_protocol

DEFAULT_ROOT = ""  # no default: an empty root is rejected when the source opens


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default config with this dataset and the paper protocol; `arg` = dataset root."""
    config = load_config(Path(__file__).with_name("default.py"))
    return paper_protocol(config, "folder", arg or DEFAULT_ROOT)
