"""Where MobileNetV2's time goes on XLA:CPU, and what the folded eval form gains.

  python benchmarks/backbone_layers.py [--batch=8] [--repeats=20]

Prints, per image (batches of `--batch`, each op jitted alone at MobileNetV2's shapes, 224 px):
the 1x1 convs as matrix products (with their achieved GFLOP/s), the depthwise convs (shifted
multiply-adds, `depthwise_conv_shifted`) and the stem; then the whole backbone's images/s in
eval mode with each BatchNorm folded into its conv (`fold_batch_norm=True`, the default) and
layer by layer (`False`), at chunks of 1, 4 and 8 images per call; and the rate of float32,
bfloat16 and int8 matrix products at 1x1-conv shapes. Run `XLA_FLAGS=...` in front
to try XLA:CPU's library fusion flags. Check the load (printed) first.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fdh_jax.models import mobilenet


def timed(function, shapes: list[tuple[int, ...]], repeats: int) -> float:
    """Median seconds of one call of `jax.jit(function)` on random float32 inputs."""
    rng = np.random.default_rng(0)
    inputs = [jnp.asarray(rng.random(shape, np.float32)) for shape in shapes]
    run = jax.jit(function)
    jax.block_until_ready(run(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(*inputs))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def layer_report(batch: int, repeats: int) -> None:
    """Per-image time of the 1x1 convs, the depthwise convs and the stem."""

    def pointwise(x, w):
        return jnp.clip(jnp.einsum("bhwc,cd->bhwd", x, w), 0.0, 6.0)

    size, seconds, flops, depthwise = 112, 0.0, 0.0, 0.0
    for _, in_features, expanded, out_features, stride in mobilenet.block_specs():
        if expanded != in_features:
            seconds += timed(
                pointwise, [(batch, size, size, in_features), (in_features, expanded)], repeats
            )
            flops += 2 * batch * size * size * in_features * expanded
        depthwise += timed(
            lambda x, w, s=stride: mobilenet.depthwise_conv_shifted(x, w, s),
            [(batch, size, size, expanded), (3, 3, 1, expanded)],
            repeats,
        )
        size = -(-size // stride)
        seconds += timed(
            pointwise, [(batch, size, size, expanded), (expanded, out_features)], repeats
        )
        flops += 2 * batch * size * size * expanded * out_features
    seconds += timed(pointwise, [(batch, 7, 7, 320), (320, 1280)], repeats)
    flops += 2 * batch * 49 * 320 * 1280
    stem = timed(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        [(batch, 224, 224, 3), (3, 3, 3, 32)],
        repeats,
    )
    print(
        f"per image: 1x1 convs {1e3 * seconds / batch:.2f} ms ({flops / seconds / 1e9:.0f} "
        f"GFLOP/s), depthwise {1e3 * depthwise / batch:.2f} ms, stem {1e3 * stem / batch:.2f} ms"
    )


def backbone_report(repeats: int) -> None:
    """Whole-backbone images/s, folded and layer by layer, at a few images per call."""
    images = jnp.zeros((1, 224, 224, 3))
    variables = mobilenet.MobileNetV2().init(jax.random.key(0), images)
    for chunk in (1, 4, 8):
        rates = {}
        for fold in (True, False):
            model = mobilenet.MobileNetV2(fold_batch_norm=fold)
            seconds = timed(
                lambda x, m=model: m.apply(variables, x)["C5"], [(chunk, 224, 224, 3)], repeats
            )
            rates[fold] = chunk / seconds
        print(
            f"backbone, {chunk} per call: folded {rates[True]:.1f} images/s, layer by layer "
            f"{rates[False]:.1f} images/s"
        )


def dtype_report(repeats: int) -> None:
    """GFLOP/s (GOP/s) of float32, bfloat16 and int8 matrix products at 1x1-conv shapes of
    8 images at 56 px: what a lower-precision backbone would have to gain from."""
    rows = 8 * 56 * 56
    for inner, outer in ((24, 144), (144, 24), (576, 96), (320, 1280)):
        rates = []
        for dtype, accumulate in (
            (jnp.float32, jnp.float32),
            (jnp.bfloat16, jnp.float32),
            (jnp.int8, jnp.int32),
        ):
            seconds = timed(
                lambda a, b, d=dtype, acc=accumulate: jax.lax.dot(
                    a.astype(d), b.astype(d), preferred_element_type=acc
                ),
                [(rows, inner), (inner, outer)],
                repeats,
            )
            rates.append(2 * rows * inner * outer / seconds / 1e9)
        print(
            f"[{rows}, {inner}] x [{inner}, {outer}]: float32 {rates[0]:.0f}, bfloat16 "
            f"{rates[1]:.0f}, int8 {rates[2]:.0f} G(FL)OP/s (casts included)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    layer_report(args.batch, args.repeats)
    backbone_report(args.repeats)
    dtype_report(args.repeats)


if __name__ == "__main__":
    main()
