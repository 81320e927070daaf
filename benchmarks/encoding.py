"""Encoding throughput of a trained model: images/s through the workdir and through its export.

  python benchmarks/encoding.py --workdir=/tmp/fdh_cub100 --images=../shared/data/cub100/images

Loads `fdh_jax.load_encoder(workdir)` (Flax model over the device mesh) and an export of the
same checkpoint written to a temporary directory (`jax.export`, the loader needs only jax, numpy
and Pillow), then encodes the same image files with each, interleaved, `--repeats` times, and
prints the median images/s (decoding and the evaluation transform included: what a user of
`encode_images` gets). The codes of both must be identical; the script says so. It prints the
load average before timing: on a shared machine the numbers measure the contention too.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from fdh_jax.data.sources.image_files import ImageFilesSource
from fdh_jax.serving.export import export_encoder
from fdh_jax.serving.load import load_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained workdir")
    parser.add_argument("--images", required=True, help="a folder of images (any depth)")
    parser.add_argument("--limit", type=int, default=1024, help="encode at most this many")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    paths = ImageFilesSource(args.images).paths[: args.limit]
    load = os.getloadavg()
    print(
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; "
        f"{len(paths)} images; jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        workdir_encoder = load_encoder(args.workdir)
        print(f"load_encoder(workdir): {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        export_encoder(args.workdir, Path(tmp) / "export")
        print(f"export: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        exported_encoder = load_encoder(Path(tmp) / "export")
        print(f"load_encoder(export): {time.perf_counter() - start:.1f} s")
        encoders = {"workdir": workdir_encoder, "export": exported_encoder}
        for encoder in encoders.values():  # compile outside the timing
            encoder.encode_images(paths[: encoder.batch_size])
        times: dict[str, list[float]] = {name: [] for name in encoders}
        codes = {}
        for _ in range(args.repeats):
            for name, encoder in encoders.items():
                start = time.perf_counter()
                codes[name] = encoder.encode_images(paths)
                times[name].append(time.perf_counter() - start)
    workdir_codes, export_codes = codes["workdir"], codes["export"]
    identical = all(np.array_equal(workdir_codes[k], export_codes[k]) for k in workdir_codes)
    for name, seconds in times.items():
        median = float(np.median(seconds))
        print(
            f"{name:8s} median {median:.2f} s = {len(paths) / median:.1f} images/s "
            f"(runs: {', '.join(f'{s:.2f}' for s in seconds)})"
        )
    print(f"codes identical: {identical}")


if __name__ == "__main__":
    main()
