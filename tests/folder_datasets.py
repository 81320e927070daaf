"""A small folder dataset of coloured noise and the pretrained-training config over it, shared by
the pretrained-training, feature-cache and serving tests."""

from pathlib import Path

import numpy as np
import pytest
from conftest import load_config, shrink
from PIL import Image
from safetensors.numpy import save_file
from torch_resnet import torch_resnet

NUM_CLASSES, PER_CLASS, IMAGE_SIZE, STEPS = 4, 4, 64, 2


def write_folder_dataset(root: Path) -> Path:
    """`root/<class>/<i>.png`: 4 classes x 4 noisy 48x40 images with a class colour."""
    rng = np.random.default_rng(0)
    for label in range(NUM_CLASSES):
        colour = np.array([60 * label, 255 - 50 * label, 40 + 30 * label])
        (root / f"class_{label}").mkdir(parents=True)
        for index in range(PER_CLASS):
            pixels = np.clip(colour + rng.normal(0, 40, (48, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{label}" / f"{index}.png")
    return root


def pretrained_config(root: Path, backbone: str, weights: Path, freeze: bool):
    config = load_config("folder")
    config.data.root = str(root)
    config.data.image_size = config.data.eval_resize = IMAGE_SIZE
    config.model.backbone = backbone
    config.model.pretrained = str(weights)
    config.model.freeze_backbone = freeze
    shrink(config, STEPS)
    config.train.optimizer = "adamw"
    config.train.learning_rate = 1e-2
    config.train.checkpoint_every = STEPS
    return config


def resnet18_file(tmp_path: Path) -> Path:
    """A resnet18 `.safetensors` of a seeded PyTorch model (skips without torch)."""
    pytest.importorskip("torch")
    path = tmp_path / "resnet18.safetensors"
    state = torch_resnet(18, 10).state_dict()
    save_file({key: value.numpy() for key, value in state.items()}, str(path))
    return path
