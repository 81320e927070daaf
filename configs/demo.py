"""The built-in demo: FDH-MFE on the synthetic fine-grained set, a few minutes on a laptop CPU.

`python -m fdh_jax.main --config=configs/demo.py --workdir=/tmp/fdh-demo`
"""

from pathlib import Path

import ml_collections

from fdh_jax.config_files import load_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = load_config(Path(__file__).with_name("default.py"))
    config.data.name = "synthetic"
    config.data.synthetic.num_classes = 16
    config.data.synthetic.train_per_class = 48
    config.data.synthetic.test_per_class = 24
    config.data.synthetic.image_size = 64
    config.data.image_size = 64
    config.data.eval_resize = 64
    config.data.crop_scale = (0.7, 1.0)
    config.data.num_threads = 2

    config.model.backbone = "resnet_narrow"
    config.model.width = 32
    config.model.node_dim = 128
    config.model.gnn_heads = 4

    config.train.batch_size = 64
    config.train.classes_per_batch = 16
    config.train.images_per_class = 4
    config.train.num_steps = 400
    config.train.optimizer = "adamw"
    config.train.learning_rate = 2e-3
    config.train.weight_decay = 1e-4
    config.train.warmup_steps = 40
    config.train.log_every = 50
    config.train.checkpoint_every = 100
    config.eval.batch_size = 128
    return config
