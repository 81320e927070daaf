"""Command line: `python -m fdh_jax.main --config=configs/demo.py --workdir=/tmp/fdh-demo`.

Modes:
  train   (default) train, resuming from the workdir, then evaluate; needs --config
  eval    evaluate the latest checkpoint (or --step) only; --eval_data=DIR scores a folder dataset,
          --adapt scores codes fitted to its database (classes never trained on)
  encode  hash an image folder (`--images`) or a split (`--split`) into `--index`; --adapt fits
          the codes to those images (new classes)
  search  rank `--index` for the image(s) at `--query`, print the top `--topk`
  export  serialise the encoder into `--export_dir` (jax.export; see fdh_jax/serving/export.py)
  add     add the photos at `--images` to `--collection` (created from `--workdir` if new),
          with `--ids` or their paths as ids; re-adding an id replaces it. Launched as several
          processes, each encodes a share (fdh_jax/serving/multiprocess_add.py)
  remove  remove the items `--ids` from `--collection`
  duplicates  print the groups of `--collection` items within `--max_distance` bits
  compact rewrite `--collection` without its removed items
  serve   a web page and JSON API over `--collection` on `--host:--port` (fdh_jax/serving/
          service.py; `pip install -e ".[serve]"`)
  search with `--collection`: rank its items for `--query` photos (or the items `--ids`)
Only training needs `--config`: the other modes read the model from the workdir (config.json,
model.json, checkpoints), which training writes and nothing else rewrites; encode and search
also take an export directory as `--workdir`. Given to another mode, `--config` supplies the data
and evaluation settings (e.g. a dataset that moved), never the model.
Any config field can be overridden: `--config.model.use_gnn=False`. Expected failures (an
invalid config, a missing dataset or checkpoint, unreadable images, a bad index or export file,
an index made by another model) end with one line on stderr and exit status 2.

Several processes (hosts) join with `jax.distributed.initialize`: automatically on Cloud TPU
and SLURM, else from `--coordinator_address/--num_processes/--process_id` or `JAX_*` variables
(see launch/). A preemption notice (SIGTERM) saves a checkpoint at the current step and exits
with status 143; the same command resumes.
"""

import difflib
import errno
import os
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    [
        "train",
        "eval",
        "encode",
        "search",
        "export",
        "add",
        "remove",
        "duplicates",
        "compact",
        "serve",
    ],
    "What to do.",
)
flags.DEFINE_enum("split", "train", ["train", "test"], "encode: the split to hash.")
flags.DEFINE_string(
    "images", None, "encode: a folder of images to hash instead of a split; add: files, folders."
)
flags.DEFINE_string("collection", None, "add/remove/search/duplicates/compact: its directory.")
flags.DEFINE_string(
    "ids", None, "add/remove/search: item ids, comma-separated (@FILE: one a line)."
)
flags.DEFINE_integer("max_distance", 0, "duplicates: the largest Hamming distance of a pair.")
flags.DEFINE_string("host", "127.0.0.1", "serve: the address to bind (other hosts need --token).")
flags.DEFINE_integer("port", 8080, "serve: the port.")
flags.DEFINE_string(
    "token", None, "serve: the token adding and removing need (else $FDH_JAX_TOKEN)."
)
flags.DEFINE_string("index", None, "encode: where to write the index; search: the index to use.")
flags.DEFINE_string("query", None, "search: an image file or a folder of images.")
flags.DEFINE_integer("topk", 10, "search: how many results per query.")
flags.DEFINE_integer("bits", None, "encode: code length (default: the longest trained).")
flags.DEFINE_integer("step", None, "eval/encode/search/export: checkpoint step (default: latest).")
flags.DEFINE_string("eval_data", None, "eval: a folder dataset to score instead of training's.")
flags.DEFINE_bool(
    "adapt",
    False,
    "eval: score codes fitted to the database without labels (PCA-ITQ, "
    "fdh_jax/search/adaptation.py) "
    "instead of the hash heads' codes; encode: fit the index's codes to its images (for classes "
    "the model never trained on; search then uses the fit). Needs a training workdir.",
)
flags.DEFINE_string("export_dir", None, "export: the directory to write the encoder into.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-process: host:port of process 0 (else JAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer(
    "num_processes", None, "Multi-process: process count (else JAX_NUM_PROCESSES)."
)
flags.DEFINE_integer("process_id", None, "Multi-process: this process's id (else JAX_PROCESS_ID).")
COLLECTION_MODES = ("add", "remove", "duplicates", "compact", "serve")


def _run_mode() -> None:
    """Runs `--mode`. Each mode's module is imported here, when chosen, not at the top of this
    file: `--help` and flag errors stay fast, and the serving modes never import the training
    loop."""
    mode, workdir, config, step = FLAGS.mode, FLAGS.workdir, FLAGS.config, FLAGS.step
    if mode in COLLECTION_MODES or (mode == "search" and FLAGS.collection):
        _run_collection_mode()
        return
    if workdir is None:
        raise app.UsageError(f"--mode={mode} needs --workdir=DIR")
    if FLAGS.adapt and mode not in ("eval", "encode"):
        # search takes the fit from the index; train and export have no collection to fit.
        raise app.UsageError(f"--adapt applies to --mode=eval and --mode=encode, not {mode}")
    if mode == "train":
        if config is None:
            raise app.UsageError("--mode=train needs --config=CONFIG_FILE")
        from fdh_jax.training import train  # noqa: PLC0415

        train.train_and_evaluate(config, workdir)
    elif mode == "eval":
        from fdh_jax.serving import evaluate_workdir  # noqa: PLC0415

        evaluate_workdir.evaluate_checkpoint(
            workdir, config, eval_data=FLAGS.eval_data, step=step, adapt=FLAGS.adapt
        )
    elif mode == "export":
        if not FLAGS.export_dir:
            raise app.UsageError("--mode=export needs --export_dir=DIR")
        from fdh_jax.serving import export  # noqa: PLC0415

        path = export.export_encoder(workdir, FLAGS.export_dir, step)
        print(f"Exported the encoder of {workdir} to {path}", flush=True)
    elif mode == "encode":
        if not FLAGS.index:
            raise app.UsageError("--mode=encode needs --index=FILE")
        from fdh_jax.serving import indexing  # noqa: PLC0415

        indexing.encode_to_index(
            workdir,
            FLAGS.index,
            split=FLAGS.split,
            images=FLAGS.images,
            bits=FLAGS.bits,
            step=step,
            config=config,
            adapt=FLAGS.adapt,
        )
    else:
        if not (FLAGS.index and FLAGS.query):
            raise app.UsageError("--mode=search needs --index=FILE and --query=IMAGE_OR_FOLDER")
        from fdh_jax.serving import indexing  # noqa: PLC0415

        hits = indexing.search_index(workdir, FLAGS.index, FLAGS.query, topk=FLAGS.topk, step=step)
        print(indexing.format_search(hits), flush=True)


def _run_collection_mode() -> None:
    """The collection modes (fdh_jax/serving/collection_modes.py); an add that left out
    unreadable photos exits with status 1. Their module is imported here, when chosen, like
    every mode's (see `_run_mode`)."""
    mode = FLAGS.mode
    if not FLAGS.collection:
        raise app.UsageError(f"--mode={mode} needs --collection=DIR")
    if mode == "add" and not FLAGS.images:
        raise app.UsageError("--mode=add needs --images=FILES_OR_FOLDERS")
    if mode == "remove" and not FLAGS.ids:
        raise app.UsageError("--mode=remove needs --ids=ID,ID,... (or @FILE)")
    from fdh_jax.serving import collection_modes as modes  # noqa: PLC0415

    if mode == "add" and _several_processes():
        from fdh_jax.serving import multiprocess_add  # noqa: PLC0415

        status = multiprocess_add.add_photos(
            FLAGS.collection, FLAGS.workdir, FLAGS.step, FLAGS.images, FLAGS.ids
        )
        if status:
            sys.exit(status)
        return
    token = FLAGS.token or os.environ.get("FDH_JAX_TOKEN") or None
    if mode == "serve":
        modes.check_start(FLAGS.host, token)  # before the model loads: a refusal is instant
    create = mode == "add" or (mode == "serve" and FLAGS.workdir is not None)
    need_encoder = mode in ("add", "search", "serve")
    collection = modes.open_for_cli(
        FLAGS.collection, FLAGS.workdir, FLAGS.step, create, need_encoder
    )
    if mode == "serve":
        modes.serve_collection(collection, FLAGS.host, FLAGS.port, token)
    elif mode == "add":
        status = modes.add_photos(collection, FLAGS.images, FLAGS.ids)
        if status:
            sys.exit(status)
    elif mode == "remove":
        modes.remove_items(collection, FLAGS.ids)
    elif mode == "search":
        modes.search_collection(collection, FLAGS.query, FLAGS.ids, FLAGS.topk, FLAGS.bits)
    elif mode == "duplicates":
        modes.print_duplicates(collection, FLAGS.max_distance, FLAGS.bits)
    else:
        collection.compact()
        print(f"Compacted {collection.directory} ({len(collection)} items)", flush=True)


def _several_processes() -> bool:
    """Whether this is one of several processes (`jax.distributed`); JAX is imported here, as
    in `main`, after the flags are parsed."""
    import jax  # noqa: PLC0415

    return jax.process_count() > 1


PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM: not finished, so schedulers and loops rerun it


def main(argv):
    """The command line after flag parsing. JAX (`parallel`) and the training errors are imported
    here, after the flags are parsed, to keep `--help` and flag errors fast."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if (
        FLAGS.workdir and "://" in FLAGS.workdir
    ):  # pathlib would silently turn gs://b/x into the local gs:/b/x
        print(
            f"fdh_jax: error: --workdir={FLAGS.workdir}: URLs are not supported; mount the bucket "
            "(e.g. gcsfuse, as launch/tpu_pod.sh does) and pass the mount path",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    from fdh_jax import parallel  # noqa: PLC0415

    # Before anything touches a device: the processes must join first.
    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    from fdh_jax.training.checkpointing import Preempted  # noqa: PLC0415

    # Progress is printed by fdh_jax itself; library INFO logs (Orbax, grain) are noise here.
    logging.set_verbosity(logging.WARNING)
    try:
        _run_mode()
    except _expected_errors() as error:
        print(f"fdh_jax: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as notice:
        print(f"fdh_jax: {notice}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_STATUS)
    except Exception as error:  # a full disk, possibly wrapped by Orbax's background save
        full = _disk_full(error)
        if full is None:
            raise
        print(
            f"fdh_jax: error: no space left on the device writing {full}: free some space and "
            "run the same command again (the checkpoints written before are intact)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)


def _expected_errors() -> tuple[type[Exception], ...]:
    """What a user can cause and fix (bad config, data, weights, files): one line, exit 2.

    The error classes are imported here, when an error is caught, not at the top: their modules
    import JAX, Orbax and the data sources, which `--help` need not wait for.
    """
    from fdh_jax.config_checks import ConfigError  # noqa: PLC0415
    from fdh_jax.data.decode import BadImageError, BadImagesFoundError  # noqa: PLC0415
    from fdh_jax.data.sources import DatasetNotFoundError, SplitSizeMismatchError  # noqa: PLC0415
    from fdh_jax.models.pretrained import PretrainedWeightsError  # noqa: PLC0415
    from fdh_jax.search.adaptation import CollectionTooSmallError  # noqa: PLC0415
    from fdh_jax.search.bits import IndexFileError  # noqa: PLC0415
    from fdh_jax.search.segments import CollectionError  # noqa: PLC0415
    from fdh_jax.serving.collection_modes import ServeError  # noqa: PLC0415
    from fdh_jax.serving.encoder import EncoderRequestError  # noqa: PLC0415
    from fdh_jax.training.checkpointing import (  # noqa: PLC0415
        DamagedCheckpointsError,
        NoCheckpointError,
    )
    from fdh_jax.training.workdir import ModelFileError  # noqa: PLC0415

    return (
        ConfigError,
        CollectionTooSmallError,
        DatasetNotFoundError,
        SplitSizeMismatchError,
        BadImagesFoundError,
        BadImageError,
        NoCheckpointError,
        DamagedCheckpointsError,
        ModelFileError,
        EncoderRequestError,
        IndexFileError,
        CollectionError,
        ServeError,
        PretrainedWeightsError,
        FileNotFoundError,
        FileExistsError,  # --export_dir holds something else
        FloatingPointError,  # a non-finite loss or gradient norm, with the step
    )


def _disk_full(error: BaseException) -> str | None:
    """The path (or "the workdir") if `error`, or an error it was raised from, is a full disk
    or quota (`ENOSPC`, `EDQUOT`), else None. Orbax's background saves re-raise it wrapped."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(error.filename) if error.filename else "the workdir"
        error = error.__cause__ or error.__context__
    return None


def _config_field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted field name of `config`, sections included (e.g. "train", "train.num_steps")."""
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(_config_field_names(value, f"{prefix}{key}."))
    return names


def _unknown_config_field(argv: list[str]) -> str | None:
    """One line naming the first `--config.` override that is no field, and the closest fields.

    None if the config file does not load or every override names a field: the error came from
    elsewhere and keeps its traceback.
    """
    config_argument, overrides = None, []
    arguments = iter(argv[1:])
    for argument in arguments:
        if re.match(r"-{1,2}config(=|$)", argument):
            config_argument = argument.partition("=")[2] or next(arguments, None)
        elif match := re.match(r"-{1,2}(?:no)?config\.([^=]+)", argument):
            overrides.append(match.group(1))
    if config_argument is None:
        return None
    try:  # the same parser as the flag's, so `configs/folder.py:DIR` works too
        config = FLAGS["config"].parser.parse(config_argument)
    except Exception:  # a broken config file: its own error is the one to see
        return None
    known = _config_field_names(config)
    for field in overrides:
        if field in known or "[" in field:  # `a[0]` indexes a list field: not ours to judge
            continue
        parent = field.rpartition(".")[0]
        while parent and parent not in known:
            parent = parent.rpartition(".")[0]
        depth = parent.count(".") + 1 if parent else 0
        siblings = [
            name.rpartition(".")[2]
            for name in known
            if name.startswith(f"{parent}." if parent else "") and name.count(".") == depth
        ]
        close = difflib.get_close_matches(field, known, n=3, cutoff=0.6)
        message = f"--config.{field}: no such config field"
        if close:
            message += f"; did you mean {', '.join(close)}?"
        if siblings:
            message += f" (fields of {parent or 'the config'}: {', '.join(sorted(siblings))})"
        else:
            message += f" ({parent} is a value, not a section)"
        return message
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """`FLAGS(argv)`, with a flag mistake ended like other expected failures: one line, exit 2.

    Left alone, absl ends a bad value (`--config.train.num_steps=abc`) with two lines and status 1,
    and ml_collections ends an unknown `--config.` field (a typo, or a field of a newer version)
    or a missing config file in a traceback of 30 to 55 lines.
    """
    try:
        return FLAGS(argv)
    except (flags.Error, OSError) as error:  # OSError: a --config file that does not load
        message = " ".join(str(error).split())
    except (AttributeError, KeyError, TypeError):  # TypeError: `--config.data.root.x`
        message = _unknown_config_field(argv)
        if message is None:
            raise
    print(f"fdh_jax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
