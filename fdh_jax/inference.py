"""A trained encoder on its own: restore it from a workdir or an export, hash new images.

    import fdh_jax
    encoder = fdh_jax.load_encoder("/tmp/fdh_cub100")      # a training workdir
    encoder = fdh_jax.load_encoder("/tmp/cub100_encoder")  # a `--mode=export` directory
    codes = encoder.encode_images(["a.jpg", "b.jpg"])      # {"48": int8 [2, 48] in {-1, +1}, ...}

**A workdir describes its model.** Training writes two files when it starts from step 0, and
nothing rewrites them: `config.json` (the complete training config) and `model.json` (what
encoding needs: class count and names, code lengths, backbone, the evaluation transform).
Restoring reads only the parameters (their moving average, for a run with `train.ema_decay > 0`)
and BatchNorm statistics of one checkpoint (an Orbax partial restore): no dataset, no
pretrained-weights file (a pretrained backbone is in the checkpoint), no optimiser state.

**An export directory** (`export_encoder`, `--mode=export`) holds `export.json` (preprocessing,
code lengths, identity, training config, file checksums), the encoder serialised with
`jax.export` (`encoder.jaxexport`: symbolic batch size, lowered for every platform in
`EXPORT_PLATFORMS` that lowers here) and its variables (`variables.npz`). The exported program
takes the variables and ImageNet-normalised float32 images `[b, S, S, 3]` (the evaluation
transform runs on the host in NumPy and Pillow, exactly as in evaluation) and returns
`{"K": int8 [b, K]}`. Loading an export imports only jax, numpy and Pillow: no Flax, no
`fdh_jax.models`, no grain or Orbax.

Both kinds encode in batches of the training config's `eval.batch_size`, so the same image gives
the same code through `load_encoder(workdir)`, `load_encoder(export)` and `--mode=encode`.

**Identity.** `encoder.identity` is the parameter fingerprint (SHA-256 over every variable's
name, dtype, shape and bytes), the checkpoint step, the code lengths and the preprocessing. Hash
indexes record it, and a search refuses codes from an encoder with another identity.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fdh_jax.atomic_files import replace_directory, write_text_atomically
from fdh_jax.checksums import arrays_sha256, file_sha256
from fdh_jax.data.decode import decode_image
from fdh_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
EXPORT_FILE = "export.json"
EXPORT_PROGRAM = "encoder.jaxexport"
EXPORT_VARIABLES = "variables.npz"
FORMAT_VERSION = 1
# Platforms an export is lowered for (jax.export lowers for each without its hardware).
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class NoCheckpointError(FileNotFoundError):
    """A workdir (or a requested step) without a checkpoint to restore."""


class ModelFileError(ValueError):
    """A workdir or export directory whose description files are missing, corrupt or foreign."""


class EncoderRequestError(ValueError):
    """A request the encoder cannot serve: a code length it was not trained for, bad input."""


# ----------------------------------------------------------------------------- the workdir record
def preprocessing(config: Any) -> dict:
    """The evaluation transform of a model trained with `config` (pure data, JSON-ready)."""
    return {
        "transform": "resize the shorter side to eval_resize, centre-crop image_size",
        "image_size": int(config.data.image_size),
        "eval_resize": int(config.data.eval_resize),
        "mean": [float(v) for v in IMAGENET_MEAN],
        "std": [float(v) for v in IMAGENET_STD],
        "colour": "RGB, alpha composited on white, EXIF orientation applied",
    }


def describe_model(config: Any, database: Any) -> dict:
    """`model.json`: what encoding needs of a model trained with `config` on `database`."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": str(config.data.name),
        "num_classes": int(database.num_classes),
        "class_names": [str(name) for name in getattr(database, "class_names", [])],
        "bits": [int(k) for k in config.bits],
        "backbone": str(config.model.backbone),
        "preprocessing": preprocessing(config),
    }


def config_differences(recorded: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    names = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            names += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


def record_training_run(workdir: Path, config: Any, database: Any, *, resuming: bool) -> None:
    """Writes `config.json` and `model.json` for a run starting at step 0 (atomically).

    A resumed run keeps the record of the run that started it; fields of the current config
    that differ from it are named once, since the resumed run then follows the current config.
    """
    config_dict = json.loads(config.to_json_best_effort())
    record = workdir / CONFIG_FILE
    if resuming and record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError):
            recorded = None
        if isinstance(recorded, dict):
            changed = config_differences(recorded, config_dict)
            if changed:
                print(
                    f"Resuming with config fields that differ from {record}: "
                    f"{', '.join(changed)} (the record keeps the values the run started with)",
                    flush=True,
                )
            if (workdir / MODEL_FILE).is_file():
                return
    if not (resuming and record.is_file()):
        write_text_atomically(record, json.dumps(config_dict, indent=2) + "\n")
    write_text_atomically(
        workdir / MODEL_FILE, json.dumps(describe_model(config, database), indent=2) + "\n"
    )


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelFileError(f"{path} is missing: {what}")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelFileError(f"{path} is unreadable or not JSON ({error})") from error
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} does not hold a JSON object")
    return value


def read_training_record(workdir: str | os.PathLike) -> tuple[Any, dict]:
    """`(config, model description)` of a training workdir: `config.json` as a ConfigDict and
    `model.json` as a dict. Raises `ModelFileError` naming the file if either is unusable."""
    import ml_collections  # noqa: PLC0415 - the export path must not need it

    workdir = Path(workdir)
    hint = (
        "not a training workdir, or one written by fdh_jax before workdirs described their "
        "model (rerun the training command once: it restores the final checkpoint and writes it)"
    )
    config = ml_collections.ConfigDict(_read_json(workdir / CONFIG_FILE, hint))
    description = _read_json(workdir / MODEL_FILE, hint)
    if description.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{workdir / MODEL_FILE}: format version {description.get('format_version')}, "
            f"this fdh_jax reads version {FORMAT_VERSION}"
        )
    return config, description


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in `workdir/checkpoints`, ascending.

    Orbax writes a step into a temporary directory and renames it to the bare step number when
    it is complete, so only bare numbers count.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        if entry.is_dir() and entry.name.isdigit() and (entry / "state").is_dir():
            steps.append(int(entry.name))
    return sorted(steps)


def _select_step(workdir: Path, step: int | None) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise NoCheckpointError(f"no checkpoint in {workdir / 'checkpoints'}: train first")
    if step is None:  # the model the workdir's results.json scored (eval.select), else the latest
        try:
            scored = int(json.loads((workdir / "results.json").read_text())["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            scored = None
        return scored if scored in steps else steps[-1]
    if step not in steps:
        raise NoCheckpointError(
            f"no checkpoint of step {step} in {workdir / 'checkpoints'} "
            f"(steps there: {', '.join(map(str, steps))})"
        )
    return step


def restore_variables(
    workdir: str | os.PathLike,
    abstract_variables: dict,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
    *,
    moving_average: bool = False,
) -> tuple[dict, int]:
    """`({"params", "batch_stats"}, step)` of checkpoint `step` (default: the latest).

    `abstract_variables` gives the tree and shapes (`jax.eval_shape` of the model's init); only
    those arrays are read from the checkpoint (no optimiser state), onto `sharding` (default:
    the first device). `moving_average`: `"params"` are the parameters' moving average that the
    run kept (`train.ema_decay > 0`), the variables its evaluation used.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415 - the export path must not need it

    workdir = Path(workdir)
    step = _select_step(workdir, step)
    params_key = "ema_params" if moving_average else "params"
    tree = {
        params_key: abstract_variables["params"],
        "batch_stats": abstract_variables.get("batch_stats", {}),
    }
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), tree)
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    try:
        variables = ocp.PyTreeCheckpointer().restore(
            path,
            args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True),
        )
    except (ValueError, KeyError) as error:
        raise ModelFileError(
            f"{path}: does not hold this model's variables ({str(error).splitlines()[0]})"
        ) from error
    return {"params": variables[params_key], "batch_stats": variables["batch_stats"]}, step


def checkpoint_progress(workdir: str | os.PathLike, step: int) -> dict:
    """The training progress saved with checkpoint `step` (`train_seconds`, data position)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = (Path(workdir) / "checkpoints" / str(step) / "progress").absolute()
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


# ----------------------------------------------------------------------------- identity
def flatten_variables(variables: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts of arrays -> `{"params/backbone/conv_init/kernel": array, ...}`."""
    flat = {}
    for key, value in variables.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten_variables(value, f"{name}/")
        else:
            flat[name] = value
    return flat


def unflatten_variables(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten_variables`."""
    nested: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def variables_fingerprint(variables: Mapping) -> str:
    """SHA-256 (hex) over every variable's name, dtype, shape and bytes, in name order."""
    flat = flatten_variables(variables)
    return arrays_sha256({name: np.asarray(jax.device_get(v)) for name, v in flat.items()})


# ----------------------------------------------------------------------------- encoders
class _ImageInput:
    """`encode_images`' input as a source: items `{"image": uint8 [H, W, 3], "label": -1}`."""

    def __init__(self, images: Any):
        if isinstance(images, (str, os.PathLike)):
            raise TypeError(
                "images must be a list of image paths or a uint8 array [N, H, W, 3], got one "
                f"path ({images!s}); wrap it in a list"
            )
        if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
            array = np.asarray(images)
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(
                    f"images as an array must be uint8 [N, H, W, 3], got {array.dtype} "
                    f"{array.shape}"
                )
            self._items = list(array)
        else:
            self._items = list(images)
            for item in self._items:
                if isinstance(item, np.ndarray):
                    if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
                        raise ValueError(
                            f"each image array must be uint8 [H, W, 3], got {item.dtype} "
                            f"{item.shape}"
                        )
                elif not isinstance(item, (str, os.PathLike)):
                    raise TypeError(
                        f"images must be image paths or uint8 [H, W, 3] arrays, got {type(item)}"
                    )
        self.paths = [str(i) if isinstance(i, (str, os.PathLike)) else "" for i in self._items]
        self.labels = np.full(len(self._items), -1, np.int32)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        item = self._items[index]
        image = item if isinstance(item, np.ndarray) else decode_image(os.fspath(item))
        return {"image": image, "label": -1}


class Encoder:
    """A trained FDH-MFE encoder: images -> binary codes of every trained length.

    Attributes: `bits` (the code lengths), `step` (the checkpoint), `fingerprint`,
    `preprocessing`, `class_names`, `training_config` (the training config as a dict).
    """

    def __init__(self, description: dict, training_config: dict, step: int, fingerprint: str):
        self.description = description
        self.training_config = training_config
        self.step = int(step)
        self.fingerprint = fingerprint
        self.preprocessing = description["preprocessing"]
        self.class_names = list(description.get("class_names", []))
        self.batch_size = int(training_config["eval"]["batch_size"])

    @property
    def bits(self) -> tuple[int, ...]:
        """The code lengths this encoder produces."""
        return tuple(int(k) for k in self.description["bits"])

    @property
    def identity(self) -> dict:
        """What makes two encoders' codes comparable: parameters, step, lengths, preprocessing."""
        return {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "bits": list(self.bits),
            "preprocessing": self.preprocessing,
            "backbone": self.description["backbone"],
        }

    def encode_images(self, images: Any, bits: int | None = None) -> dict[str, np.ndarray]:
        """Binary codes of images, through the evaluation transform, in batches.

        `images`: a list of image file paths (decoded with Pillow; an unreadable file raises
        `BadImageError` naming it), a list of uint8 `[H, W, 3]` arrays, or a uint8 array
        `[N, H, W, 3]`; any size. Returns `{"K": int8 [N, K] in {-1, +1}}` for every length, or
        for `bits` only.
        """
        if bits is not None and int(bits) not in self.bits:
            raise EncoderRequestError(f"bits={bits}: this encoder has code lengths {self.bits}")
        source = _ImageInput(images)
        if len(source) == 0:
            codes = {str(k): np.zeros((0, k), np.int8) for k in self.bits}
        else:
            codes = self.encode_source(source)
        return codes if bits is None else {str(bits): codes[str(bits)]}

    def encode_source(self, source: Any) -> dict[str, np.ndarray]:
        """Codes of every item of a source (items with a uint8 `"image"`), in source order."""
        raise NotImplementedError

    def build_index(
        self, paths: Any, bits: int | None = None, labels: Any = None, *, adapt: bool = False
    ):
        """A `fdh_jax.retrieval.HashIndex` of the images at `paths`, `bits`-bit codes (default:
        the longest), that remembers this encoder (see `identity`). `adapt`: codes fitted to
        these images without labels (`fdh_jax.adaptation`), for classes the model never trained
        on; needs a training workdir."""
        paths = [os.fspath(p) for p in paths]
        k = str(max(self.bits) if bits is None else bits)
        if adapt:
            return self.index_fitted(_ImageInput(paths), paths, int(k), labels)
        return self.index_codes(self.encode_images(paths, int(k))[k], paths, labels)

    def transfer_features(self, source: Any, descriptor_weight: float) -> np.ndarray:
        """`fdh_jax.adaptation.transfer_features` of every item of `source`: `[N, F]`."""
        raise EncoderRequestError(
            "codes fitted to a collection (--adapt) need the training workdir: an export holds "
            "only the hash heads' program"
        )

    def index_fitted(self, source: Any, paths: Sequence[str], bits: int, labels: Any = None):
        """A `HashIndex` of codes fitted to `source` (PCA-ITQ on its transfer features, no
        labels; `fdh_jax.adaptation`): the index keeps the fit, which its queries go through."""
        from fdh_jax import adaptation  # noqa: PLC0415

        if int(bits) not in self.bits:
            raise EncoderRequestError(f"bits={bits}: this encoder has code lengths {self.bits}")
        weight = adaptation.descriptor_weight(self.training_config)
        # An export refuses here, before any work; too few images, in the fit.
        features = self.transfer_features(source, weight)
        fitted = adaptation.fit_pca_itq(features, int(bits), seed=0)
        index = self.index_codes(fitted(features), paths, labels)
        identity = json.loads(index.encoder_json) | {
            "codes": "fitted to the collection (fdh_jax.adaptation)",
            "descriptor_weight": weight,
        }
        index.encoder_json = json.dumps(identity)
        index.code_mean, index.code_projection = fitted.mean, fitted.projection
        return index

    def index_query_codes(self, index: Any, source: Any) -> np.ndarray:
        """Codes of `source` comparable with `index`'s: the hash heads', or the index's own fit
        applied to the transfer features for an index made with `adapt`."""
        if index.code_projection is None:
            return self.encode_source(source)[str(index.bits)]
        from fdh_jax.adaptation import CollectionHash  # noqa: PLC0415

        weight = float(json.loads(index.encoder_json)["descriptor_weight"])
        fitted = CollectionHash(index.code_mean, index.code_projection)
        return fitted(self.transfer_features(source, weight))

    def index_codes(self, codes: np.ndarray, paths: Sequence[str], labels: Any = None):
        """A `HashIndex` of codes this encoder made (`[N, K]`), with their paths and labels."""
        from fdh_jax.retrieval import HashIndex  # noqa: PLC0415

        bits = int(np.shape(codes)[1])
        return HashIndex(
            codes=codes,
            labels=np.full(len(paths), -1) if labels is None else labels,
            paths=list(paths),
            checkpoint=f"step {self.step}",
            config_json=json.dumps(self.training_config),
            encoder_json=json.dumps(self.identity | {"bits": bits}),
        )

    def check_index(self, index: Any, name: str = "the index") -> None:
        """Raises `ModelFileError` (one line naming both sides) unless this encoder made the
        index's codes: the same parameters, one of its code lengths, the same preprocessing."""
        made_by = json.loads(index.encoder_json)
        if index.bits not in self.bits:
            raise ModelFileError(
                f"{name} holds {index.bits}-bit codes; this model makes "
                f"{', '.join(map(str, self.bits))}-bit codes"
            )
        if made_by.get("fingerprint") != self.fingerprint:
            raise ModelFileError(
                f"{name} was encoded by model {str(made_by.get('fingerprint'))[:12]} (step "
                f"{made_by.get('step')}), the queries by model {self.fingerprint[:12]} (step "
                f"{self.step}): re-encode the index with this model, or search with that one"
            )
        if made_by.get("preprocessing") != self.preprocessing:
            raise ModelFileError(
                f"{name} was encoded with preprocessing {made_by.get('preprocessing')}, the "
                f"queries with {self.preprocessing}"
            )

    def search(self, index: Any, queries: Any, k: int = 10) -> tuple[list[list[str]], np.ndarray]:
        """Encodes `queries` (as `encode_images` takes them) and searches `index`, which this
        encoder must have made (`check_index`). Returns (paths `Q x k`, distances `[Q, k]`),
        nearest first, ties by index order."""
        self.check_index(index)
        source = _ImageInput(queries)
        if len(source) == 0:
            return index.search(np.zeros((0, index.bits), np.int8), k)
        return index.search(self.index_query_codes(index, source), k)


class WorkdirEncoder(Encoder):
    """An encoder restored from a training workdir: the Flax model over a device mesh."""

    def __init__(self, config: Any, description: dict, model, variables, step: int, mesh):
        training_config = json.loads(config.to_json_best_effort())
        super().__init__(description, training_config, step, variables_fingerprint(variables))
        self.config, self.model, self.variables, self.mesh = config, model, variables, mesh

    def encode_source(self, source: Any) -> dict[str, np.ndarray]:
        from fdh_jax import evaluate  # noqa: PLC0415 - evaluate imports this module

        codes, _ = evaluate.encode_source(
            self.model, self.variables, source, self.config, self.mesh
        )
        return codes

    def transfer_features(self, source: Any, descriptor_weight: float) -> np.ndarray:
        from fdh_jax import adaptation, evaluate  # noqa: PLC0415

        outputs = evaluate.transfer_outputs(
            self.model, self.variables, source, self.config, self.mesh
        )
        return adaptation.transfer_features(*outputs, descriptor_weight)


def _encoding_mesh(batch_size: int):
    """All devices, or the most that divide the encoding batch (it is split over them)."""
    from fdh_jax import parallel  # noqa: PLC0415

    devices = jax.devices()
    if jax.process_count() == 1:
        usable = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
        devices = devices[:usable]
    return parallel.make_mesh(devices)


def restore_encoder(
    workdir: str | os.PathLike, step: int | None = None, config: Any | None = None
) -> WorkdirEncoder:
    """The encoder of checkpoint `step` (default: the latest) of a training workdir.

    `config` (default: the workdir's `config.json`) supplies everything but the model, which
    always comes from the workdir's record: e.g. another `eval.batch_size`, or `data.root` when
    evaluating on a dataset that moved.
    """
    import jax.numpy as jnp  # noqa: PLC0415

    from fdh_jax import parallel  # noqa: PLC0415
    from fdh_jax.models.fdh import build_model  # noqa: PLC0415

    workdir = Path(workdir)
    recorded, description = read_training_record(workdir)
    if config is None:
        config = recorded
    else:  # the model is the one that was trained, whatever `config` says
        config = config.copy_and_resolve_references()
        config.unlock()
        config.model = recorded.model
        config.bits = tuple(recorded.bits)
        config.seed = recorded.seed
        config.loss.use_proxy = recorded.loss.use_proxy
    model = build_model(config, description["num_classes"])
    size = description["preprocessing"]["image_size"]
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    mesh = _encoding_mesh(int(config.eval.batch_size))
    variables, step = restore_variables(
        workdir,
        abstract,
        step,
        parallel.replicated(mesh),
        moving_average=float(recorded.train.get("ema_decay", 0.0)) > 0,
    )
    return WorkdirEncoder(config, description, model, variables, step, mesh)


# ----------------------------------------------------------------------------- export
def _lower_for_platforms(function, *specs) -> tuple[Any, tuple[str, ...]]:
    """`jax.export` for every platform of `EXPORT_PLATFORMS` that lowers here (CPU at least)."""
    from jax import export  # noqa: PLC0415

    try:
        return export.export(function, platforms=EXPORT_PLATFORMS)(*specs), EXPORT_PLATFORMS
    except Exception:  # noqa: BLE001 - some platform failed to lower: find which ones work
        working = []
        for platform in EXPORT_PLATFORMS:
            try:
                export.export(function, platforms=(platform,))(*specs)
                working.append(platform)
            except Exception:  # noqa: BLE001, S112 - that platform is left out, and said so
                continue
        if "cpu" not in working:
            raise
        return export.export(function, platforms=tuple(working))(*specs), tuple(working)


def export_encoder(
    workdir: str | os.PathLike, export_dir: str | os.PathLike, step: int | None = None
) -> Path:
    """Serialises the encoder of a workdir's checkpoint into `export_dir` (see module docstring).

    The directory appears complete or not at all (written beside it, then renamed); an existing
    export there is replaced, anything else there is refused.
    """
    import functools  # noqa: PLC0415

    import jax.numpy as jnp  # noqa: PLC0415
    from jax import export  # noqa: PLC0415

    from fdh_jax.evaluate import encode  # noqa: PLC0415

    export_dir = Path(export_dir)
    if export_dir.exists() and not (export_dir / EXPORT_FILE).is_file():
        if not export_dir.is_dir() or any(export_dir.iterdir()):
            raise FileExistsError(
                f"{export_dir} exists and is not an fdh_jax export: choose a new directory"
            )
    encoder = restore_encoder(workdir, step)
    variables = jax.device_get(encoder.variables)
    size = encoder.preprocessing["image_size"]
    variable_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    image_spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {size}, {size}, 3"), jnp.float32)
    exported, platforms = _lower_for_platforms(
        jax.jit(functools.partial(encode, encoder.model)), variable_specs, image_spec
    )
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=export_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        (staging / EXPORT_PROGRAM).write_bytes(exported.serialize())
        np.savez(staging / EXPORT_VARIABLES, **flatten_variables(variables))
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "fdh_jax encoder export",
            "input": f"float32 [b, {size}, {size}, 3]: the evaluation transform, then ImageNet "
            "normalisation; b is symbolic",
            "output": {str(k): f"int8 [b, {k}] in {{-1, +1}}" for k in encoder.bits},
            "platforms": list(platforms),
            "batch_size": encoder.batch_size,
            "step": encoder.step,
            "fingerprint": encoder.fingerprint,
            "model": encoder.description,
            "training_config": encoder.training_config,
            "source_workdir": str(Path(workdir).absolute()),
            "sha256": {
                name: file_sha256(staging / name) for name in (EXPORT_PROGRAM, EXPORT_VARIABLES)
            },
        }
        (staging / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_directory(staging, export_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return export_dir


class ExportedEncoder(Encoder):
    """An encoder loaded from an export directory: `jax.export` program + variables."""

    def __init__(self, manifest: dict, exported, variables: dict):
        super().__init__(
            manifest["model"],
            manifest["training_config"],
            manifest["step"],
            manifest["fingerprint"],
        )
        self.platforms = tuple(manifest["platforms"])
        self._exported = exported
        self._variables = jax.device_put(variables)

    def encode_source(self, source: Any) -> dict[str, np.ndarray]:
        size = int(self.preprocessing["image_size"])
        resize = int(self.preprocessing["eval_resize"])
        chunks: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(source), self.batch_size):
            count = min(self.batch_size, len(source) - start)
            batch = np.zeros((self.batch_size, size, size, 3), np.float32)
            for row in range(count):
                batch[row] = eval_transform(source[start + row]["image"], size, resize)
            for k, codes in self._exported.call(self._variables, batch).items():
                chunks.setdefault(k, []).append(np.asarray(codes)[:count])
        return {k: np.concatenate(v) for k, v in chunks.items()}


def load_export(export_dir: str | os.PathLike) -> ExportedEncoder:
    """Loads `export_dir` (from `export_encoder`), checking every file against `export.json`."""
    from jax import export  # noqa: PLC0415

    export_dir = Path(export_dir)
    manifest = _read_json(export_dir / EXPORT_FILE, "not an fdh_jax export directory")
    if manifest.get("kind") != "fdh_jax encoder export":
        raise ModelFileError(f"{export_dir / EXPORT_FILE} is not an fdh_jax encoder export")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{export_dir / EXPORT_FILE}: format version {manifest.get('format_version')}, "
            f"this fdh_jax reads version {FORMAT_VERSION}"
        )
    for name, expected in manifest.get("sha256", {}).items():
        path = export_dir / name
        if not path.is_file():
            raise ModelFileError(f"{path} is missing: the export is incomplete")
        if file_sha256(path) != expected:
            raise ModelFileError(f"{path} does not match its checksum: the export is corrupted")
    platform = jax.default_backend()
    if platform not in manifest["platforms"]:
        raise ModelFileError(
            f"{export_dir} was exported for {', '.join(manifest['platforms'])}, not {platform}"
        )
    with np.load(export_dir / EXPORT_VARIABLES, allow_pickle=False) as archive:
        variables = unflatten_variables({name: archive[name] for name in archive.files})
    if variables_fingerprint(variables) != manifest["fingerprint"]:
        raise ModelFileError(f"{export_dir / EXPORT_VARIABLES}: variables differ from the export")
    exported = export.deserialize(bytearray((export_dir / EXPORT_PROGRAM).read_bytes()))
    return ExportedEncoder(manifest, exported, variables)


def load_encoder(path: str | os.PathLike, step: int | None = None) -> Encoder:
    """A trained encoder from a training workdir or an export directory.

    `step` picks a checkpoint of a workdir (default: the latest); an export holds one. Raises
    `ModelFileError` or `NoCheckpointError` with one line naming the file at fault.
    """
    path = Path(path)
    if (path / EXPORT_FILE).is_file():
        if step is not None:
            raise EncoderRequestError(f"{path} is an export: --step applies to workdirs only")
        return load_export(path)
    if (path / CONFIG_FILE).is_file() or (path / "checkpoints").is_dir():
        return restore_encoder(path, step)
    raise ModelFileError(
        f"{path}: neither a training workdir (config.json, model.json, checkpoints/) nor an "
        f"export directory ({EXPORT_FILE})"
    )


__all__ = [
    "CONFIG_FILE",
    "EXPORT_FILE",
    "MODEL_FILE",
    "Encoder",
    "EncoderRequestError",
    "ExportedEncoder",
    "ModelFileError",
    "NoCheckpointError",
    "WorkdirEncoder",
    "checkpoint_steps",
    "describe_model",
    "export_encoder",
    "load_encoder",
    "load_export",
    "read_training_record",
    "record_training_run",
    "restore_encoder",
    "restore_variables",
    "variables_fingerprint",
]
