"""Train-step throughput: compile time and images/s of the jitted FDH-MFE update on this machine.

Builds the state exactly as `fdh_jax.training` does (`create_train_state`, `make_optimizer`,
`make_train_step`: one jit over the device mesh, state donated) for a config file plus overrides,
and times steps on a fixed random batch (no input pipeline: see `benchmarks/input_pipeline.py` for
that). Use it to size a run before launching it.

  python benchmarks/train_step.py --set model.backbone=mobilenet_v2 --set model.freeze_backbone=True
  python benchmarks/train_step.py --set model.backbone=mobilenet_v2 --set data.image_size=160 \
      --set model.pretrained=/path/mobilenet_v2_1.0_224_ptq.tflite

`--cached` times the step on precomputed float16 stage maps instead of images: what a frozen
backbone's run does with the feature cache (`fdh_jax/training/feature_cache.py`).

`--set FIELD=VALUE` takes any config field; VALUE is a Python literal (`True`, `256`, `(32,)`) or
else a string. Weights (`model.pretrained`) only change the numbers where they change the
program (a frozen or calibrated MobileNetV2 computes the same shapes either way).
"""

import argparse
import ast
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np

from fdh_jax import parallel
from fdh_jax.config_checks import validate_config
from fdh_jax.config_files import load_config
from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.fdh import build_model, precomputed_stages
from fdh_jax.training.optimizer import make_optimizer
from fdh_jax.training.step import create_train_state, make_train_step

REPO = Path(__file__).resolve().parents[1]


def parse_override(text: str) -> tuple[str, object]:
    field, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects FIELD=VALUE, got {text!r}")
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "folder.py"))
    parser.add_argument("--set", type=parse_override, action="append", default=[])
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    parser.add_argument("--cached", action="store_true", help="feed cached stage maps")
    args = parser.parse_args()

    config = load_config(args.config)
    config.model.pretrained = ""  # timing needs no weights (folder.py names ImageNet ResNet-50)
    for field, value in args.set:
        config.update_from_flattened_dict({field: value})
    config.data.root = config.data.root or "(not read: random batches)"
    validate_config(config, jax.device_count())
    size, batch = config.data.image_size, config.train.batch_size
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = np.repeat(
        np.arange(config.train.classes_per_batch, dtype=np.int32),
        config.train.images_per_class,
    )

    mesh = parallel.make_mesh()
    model = build_model(config, args.num_classes)
    tx = make_optimizer(config, total_steps=1000)
    start = time.perf_counter()
    state = create_train_state(config, model, tx, mesh, calibration_images=images[:16])
    init_seconds = time.perf_counter() - start
    step_fn = make_train_step(config, mesh, total_steps=1000)
    if args.cached:  # the stage maps a frozen backbone's feature cache stores, in float16
        stages = precomputed_stages(config.model.stages, config.model.trainable_after)
        backbone = get_backbone(config.model.backbone, width=config.model.width)
        shapes = jax.eval_shape(partial(backbone.init, train=False), jax.random.key(0), images[:1])
        shapes = jax.eval_shape(partial(backbone.apply, train=False), shapes, images[:1])
        inputs = {
            s: rng.standard_normal((batch, *shapes[s].shape[1:])).astype(np.float16) for s in stages
        }
    else:
        inputs = {"image": images}
    batch_arrays = parallel.global_batch(inputs | {"label": labels}, mesh)

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch_arrays).compile()
    compile_seconds = time.perf_counter() - start
    state, measurements = compiled(state, batch_arrays)  # warm-up: first execution
    jax.block_until_ready(measurements)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, measurements = compiled(state, batch_arrays)
        jax.block_until_ready(measurements)
        times.append(time.perf_counter() - start)
    loss = float(measurements["loss"])
    median = float(np.median(times))
    model_config = config.model
    print(
        f"{model_config.backbone} {size}px batch {batch} "
        f"freeze_backbone={model_config.freeze_backbone} node_dim={model_config.node_dim} "
        f"stages={','.join(model_config.stages)} pretrained={bool(model_config.pretrained)} "
        f"trainable_after={model_config.trainable_after or '-'} "
        f"cached_stage_maps={args.cached} "
        f"on {jax.device_count()} {jax.devices()[0].platform} device(s)"
    )
    print(
        f"  state init {init_seconds:.1f} s | compile {compile_seconds:.1f} s | step median "
        f"{median:.3f} s (min {min(times):.3f}, max {max(times):.3f}, {args.steps} steps) | "
        f"{batch / median:.1f} images/s | loss {loss:.3f}"
    )


if __name__ == "__main__":
    main()
