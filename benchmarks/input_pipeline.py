"""Input-pipeline throughput: decoded + augmented training images per second on a folder dataset.

Runs `fdh_jax.data.pipeline.train_dataset` (the grain pipeline `train_and_evaluate` uses: class-
balanced P x Q batches, JPEG decode, random-resized crop, flip, ImageNet normalisation) over the
train split of a folder dataset, default the shared `cub100`, at `--image_size`, for several
settings of `data.num_workers` (grain worker processes; 0 = threads of the main process only)
and `data.num_threads`, and prints images/s once the prefetch buffers are drained. Nothing else
runs: this is the rate that bounds a train step's input.

  python benchmarks/input_pipeline.py                        # cub100, 224 px, workers 0 / 1 / 2
  python benchmarks/input_pipeline.py --root=/data/my_images --batches=20
"""

import argparse
import os
import time
from pathlib import Path

from absl import flags

from fdh_jax.config_files import load_config
from fdh_jax.data import load_split
from fdh_jax.data.pipeline import iterate, train_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FDH_SHARED", REPO.parent / "shared"))
# (num_workers, num_threads): threads only, then grain worker processes.
SETTINGS = ((0, 1), (0, 2), (0, 8), (1, 8), (2, 8))


def images_per_second(source, config, batches: int, skip: int) -> tuple[float, float]:
    """`(first-batch seconds, images/s over `batches` batches after the first `skip`)`.

    The first `skip` batches are not timed: they include start-up and whatever the read
    threads of each process prefetched meanwhile (up to `max(prefetch, num_threads)` batches
    per process), which would otherwise inflate the rate.
    """
    dataset = train_dataset(source, config, num_steps=skip + batches)
    iterator = iterate(dataset)
    start = time.perf_counter()
    next(iterator)  # worker start-up, first decodes
    first = time.perf_counter() - start
    for _ in range(skip - 1):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    assert batch["image"].shape == (config.train.batch_size, *(config.data.image_size,) * 2, 3)
    return first, batches * config.train.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(SHARED / "data" / "cub100"), help="folder dataset")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--batch_size", type=int, default=64, help="16 classes x (size / 16)")
    args = parser.parse_args()
    if not Path(args.root).is_dir():
        print(f"skipped: no dataset at {args.root} (pass --root=DIR, a folder of class folders)")
        return
    # grain's worker processes read absl flags, which must count as parsed outside `app.run`.
    flags.FLAGS.mark_as_parsed()

    config = load_config(REPO / "configs" / "folder.py", args.root)
    config.data.image_size = args.image_size
    config.data.eval_resize = max(config.data.eval_resize, args.image_size)
    config.train.batch_size = args.batch_size
    config.train.classes_per_batch = 16
    config.train.images_per_class = args.batch_size // 16
    source = load_split(config, "train", check_images=False)
    print(
        f"{args.root}: {len(source)} train images, {args.image_size} px, batch "
        f"{args.batch_size}, {args.batches} timed batches per setting (after the prefetched "
        f"ones), {os.cpu_count()} CPUs"
    )
    for workers, threads in SETTINGS:
        config.data.num_workers, config.data.num_threads = workers, threads
        # Untimed: more batches than all read-ahead buffers together hold.
        skip = max(workers, 1) * max(config.data.prefetch, threads) + 2
        first, rate = images_per_second(source, config, args.batches, skip)
        kind = f"{workers} worker process(es)" if workers else "main process only"
        print(
            f"  num_workers={workers} num_threads={threads} ({kind}): {rate:6.1f} images/s "
            f"(first batch {first:.1f} s, {skip} untimed)",
            flush=True,
        )


if __name__ == "__main__":
    main()
