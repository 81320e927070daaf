"""FGVC-Aircraft 2013b, 100 variants: 6,667 database / 3,333 query images.

`python -m fdh_jax.main --config=configs/aircraft.py --workdir=WORKDIR [--config.data.root=ROOT]`
or `--config=configs/aircraft.py:ROOT` (ROOT after ":").
Default ROOT: `~/data/fgvc-aircraft-2013b`.

Root: `fgvc-aircraft-2013b/` (or its `data/`); the 20-pixel copyright banner is cropped; see
`fdh_jax/data/sources/aircraft.py`.

Protocol (docs/design.md, "Evaluation protocol"): ResNet-50 from ImageNet weights
(`hf://timm/resnet50.tv_in1k`, or `--config.model.pretrained=FILE`) at 0.1x the learning rate,
random-resized crop 224 + flip for training, resize 256 + centre crop 224 for evaluation;
database = the official trainval split, query = the official test split.
"""

from pathlib import Path

import ml_collections

from fdh_jax.config_files import load_config, paper_protocol

DEFAULT_ROOT = "~/data/fgvc-aircraft-2013b"  # `~` is expanded when the source opens it


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default config with this dataset and the paper protocol; `arg` = dataset root."""
    config = load_config(Path(__file__).with_name("default.py"))
    return paper_protocol(config, "aircraft", arg or DEFAULT_ROOT)
