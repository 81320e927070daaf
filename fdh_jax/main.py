"""Command line: `python -m fdh_jax.main --config=configs/demo.py --workdir=/tmp/fdh-demo`.

Modes: `train` (default: train, resuming from the workdir, then evaluate), `eval` (evaluate the
latest checkpoint only). Any config field can be overridden: `--config.model.use_gnn=False`.
Expected failures (an invalid config, a missing dataset, unreadable images) end with one line on
stderr and exit status 2, before any compilation.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate) | eval only.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Imported here so that `--help` and flag errors need no JAX start-up.
    from fdh_jax.data.decode import BadImagesFoundError  # noqa: PLC0415
    from fdh_jax.data.sources import DatasetNotFoundError, SplitSizeMismatchError  # noqa: PLC0415
    from fdh_jax.train import NoCheckpointError, evaluate_checkpoint, train_and_evaluate  # noqa
    from fdh_jax.validation import ConfigError  # noqa: PLC0415

    # Progress is printed by fdh_jax itself; library INFO logs (Orbax, grain) are noise here.
    logging.set_verbosity(logging.WARNING)
    try:
        if FLAGS.mode == "train":
            train_and_evaluate(FLAGS.config, FLAGS.workdir)
        else:
            evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    except (
        ConfigError,
        DatasetNotFoundError,
        SplitSizeMismatchError,
        BadImagesFoundError,
        NoCheckpointError,
    ) as error:
        print(f"fdh_jax: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
