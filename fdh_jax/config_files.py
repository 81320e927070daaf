"""Loading `configs/*.py` files outside the command line (notebooks, tests, scripts)."""

import importlib.util
from pathlib import Path

import ml_collections


def load_config(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns `get_config(arg)` of the config file at `path` (e.g. `configs/demo.py`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path.resolve()}")
    spec = importlib.util.spec_from_file_location(f"fdh_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


# ImageNet ResNet-50 (torchvision's V1 weights, as timm republishes them in safetensors): what the
# published fine-grained hashing results start from.
PAPER_BACKBONE_WEIGHTS = "hf://timm/resnet50.tv_in1k"


def paper_protocol(
    config: ml_collections.ConfigDict, dataset: str, root: str
) -> ml_collections.ConfigDict:
    """Sets the published-dataset protocol on `config` and returns it (docs/design.md,
    "Evaluation protocol").

    ResNet-50 from ImageNet weights (`PAPER_BACKBONE_WEIGHTS`, fetched from the Hugging Face Hub
    on first use; `--config.model.pretrained=FILE` gives a local file, `''` random
    initialisation), fine-tuned at a tenth of the head's learning rate; random-resized crop 224
    + flip for training, resize 256 + centre crop 224 for evaluation; database = the official
    train split, query = the official test split. The schedule is `configs/default.py`'s: SGD
    with momentum, 90 epochs, warm-up then cosine decay.
    """
    config.data.name = dataset
    config.data.root = root
    config.data.image_size = 224
    config.data.eval_resize = 256
    config.model.backbone = "resnet50"
    config.model.width = 64
    config.model.pretrained = PAPER_BACKBONE_WEIGHTS
    config.train.backbone_lr_multiplier = 0.1
    return config
