"""Encoding throughput against the reference TFLite runtime (LiteRT), on the same photos and cores.

  python benchmarks/encoding.py --workdir=W --images=../shared/data/cub100/images

Measures, in one run, on the first `--limit` photos of `--images` (images/s, median of
`--repeats` runs taken in rotation, see `_fair.py`):

- `litert`: the released MobileNetV2 (`--tflite`, int8 post-training quantised) in LiteRT's
  interpreter with XNNPACK, 2 threads, batch 1, on inputs already decoded and resized;
- `litert + decode`: the same with Pillow decoding each file, resizing the shorter side to 256
  and cropping the centre 224 (the evaluation transform, in uint8 as the model takes it);
- `backbone`: our MobileNetV2 (float32, the workdir's frozen backbone) on prepared float inputs,
  batches of 32, two calls at once (as `fdh_jax.encoding.map_source` runs them);
- `workdir` and `export`: `fdh_jax.load_encoder(...).encode_images(paths)`, end to end from the
  JPEG files (decoding, the evaluation transform, the model, binarisation), with the model's
  test-time flip averaging on (as trained) and off (one backbone pass per photo: the same
  model with `flip_average=False`, exported alongside for the `export` row).

and prints each row's ratio to `litert + decode`. The codes of workdir and export must be
identical (the script checks, with flip averaging on and off).
"""

import argparse
import concurrent.futures
import functools
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _fair import interleaved, machine_report
from jax import export
from PIL import Image

from fdh_jax import encoding, parallel
from fdh_jax.data.sources.image_files import ImageFilesSource
from fdh_jax.models.backbones import get_backbone
from fdh_jax.serving.export import export_encoder
from fdh_jax.serving.exported_encoder import EXPORT_FILE, ExportedEncoder, load_export
from fdh_jax.serving.load import load_encoder

REPO = Path(__file__).resolve().parents[1]
TFLITE = REPO.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_ptq.tflite"


def litert_inputs(path: str) -> np.ndarray:
    """Pillow decode, shorter side to 256, centre 224 crop: uint8 `[1, 224, 224, 3]`."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        factor = 256 / min(image.size)
        size = (max(224, round(image.width * factor)), max(224, round(image.height * factor)))
        image = image.resize(size, Image.BILINEAR)
        left, top = (size[0] - 224) // 2, (size[1] - 224) // 2
        return np.asarray(image.crop((left, top, left + 224, top + 224)))[None]


def litert_rows(tflite: str, paths: list[str]) -> dict:
    """The two LiteRT measurements as zero-argument callables."""
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 (the test extra)

    interpreter = Interpreter(model_path=tflite, num_threads=2)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    prepared = [litert_inputs(p) for p in paths]

    def run(inputs) -> None:
        for image in inputs:
            interpreter.set_tensor(index, image)
            interpreter.invoke()

    return {
        "litert": functools.partial(run, prepared),
        "litert + decode": lambda: run(litert_inputs(p) for p in paths),
    }


def backbone_row(encoder, count: int):
    """Our frozen backbone alone on prepared float inputs, batches of 32, two calls at once."""
    config = encoder.training_config["model"]
    backbone = get_backbone(config["backbone"], width=config["width"], dtype=jnp.float32)
    variables = {
        "params": encoder.variables["params"]["backbone"],
        "batch_stats": encoder.variables["batch_stats"]["backbone"],
    }

    def stage_maps(images):
        maps = backbone.apply(variables, images)
        return {name: maps[name] for name in ("C3", "C4", "C5")}

    run = jax.jit(lambda images: parallel.map_in_chunks_on_cpu(stage_maps, images))
    batch = jnp.asarray(np.random.default_rng(0).normal(size=(32, 224, 224, 3)), jnp.float32)
    jax.block_until_ready(run(batch))
    calls = -(-count // 32)

    def go() -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: jax.block_until_ready(run(batch)), range(calls)))

    return go, calls * 32


def without_flip_average(workdir_encoder, export_dir: Path):
    """The workdir's encoder, and an export of it, with test-time flip averaging off."""
    model = workdir_encoder.model.clone(flip_average=False)
    workdir_encoder.model = model
    variables = jax.device_get(workdir_encoder.variables)
    size = workdir_encoder.preprocessing["image_size"]
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    encode = jax.jit(functools.partial(encoding.encode, model))
    programs = [  # any batch, and a multiple of 4 (as `export_encoder` writes them)
        export.export(encode, platforms=("cpu",))(
            specs,
            jax.ShapeDtypeStruct(export.symbolic_shape(f"{b}, {size}, {size}, 3"), jnp.float32),
        )
        for b in ("b", f"{parallel.CPU_CHUNK}*b")
    ]
    manifest = json.loads((export_dir / EXPORT_FILE).read_text()) | {"platforms": ["cpu"]}
    return workdir_encoder, ExportedEncoder(manifest, programs[0], variables, programs[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained workdir (frozen MobileNetV2)")
    parser.add_argument("--images", required=True, help="a folder of JPEG photos (any depth)")
    parser.add_argument("--limit", type=int, default=1024, help="encode this many photos")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tflite", default=str(TFLITE), help="the released MobileNetV2 .tflite")
    args = parser.parse_args()

    paths = ImageFilesSource(args.images).paths[: args.limit]
    machine_report()
    print(f"{len(paths)} photos from {args.images}")
    with tempfile.TemporaryDirectory() as tmp:
        export_encoder(args.workdir, Path(tmp) / "export")
        encoders = {
            "workdir (flip on)": load_encoder(args.workdir),
            "export (flip on)": load_export(Path(tmp) / "export"),
        }
        off = without_flip_average(load_encoder(args.workdir), Path(tmp) / "export")
        encoders["workdir (flip off)"], encoders["export (flip off)"] = off
        backbone, backbone_images = backbone_row(encoders["workdir (flip on)"], len(paths))
        methods = litert_rows(args.tflite, paths) | {"backbone (prepared)": backbone}
        for name, encoder in encoders.items():  # compiled outside the timing
            encoder.encode_images(paths[: encoder.batch_size])
            methods[name] = functools.partial(encoder.encode_images, paths)
        times, results = interleaved(methods, args.repeats)

    rates = {
        name: (backbone_images if name.startswith("backbone") else len(paths))
        / float(np.median(seconds))
        for name, seconds in times.items()
    }
    bar = rates["litert + decode"]
    for name, rate in rates.items():
        runs = ", ".join(f"{s:.2f}" for s in times[name])
        print(f"{name:22s} {rate:7.1f} images/s  {rate / bar:5.2f}x litert + decode  ({runs} s)")
    for flip in ("on", "off"):
        workdir, exported = results[f"workdir (flip {flip})"], results[f"export (flip {flip})"]
        same = all(np.array_equal(workdir[k], exported[k]) for k in workdir)
        print(f"codes of workdir and export identical, flip averaging {flip}: {same}")


if __name__ == "__main__":
    main()
