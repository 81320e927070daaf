"""MobileNetV2 1.0 in the layout of TensorFlow's reference model (slim / Keras applications).

The layer sequence, channel counts, ReLU6 activations, BatchNorm epsilon (1e-3) and TF 'SAME'
padding follow the released ImageNet model (`mobilenet_v2_1.0_224`), so its weights load exactly
(`fdh_jax.models.pretrained.load_pretrained("mobilenet_v2", path, variables)`). JAX's 'SAME' is
TensorFlow's rule: a stride-2 3x3 conv on an even-sized input pads (0, 1), i.e. more at the end.

Module names follow the TF graph: `conv_0` (stem), `expanded_conv_1` ... `expanded_conv_17`
(inverted residual blocks, each with `expand`, `depthwise`, `project` convs and `*_bn` norms;
block 1 has no `expand`), `conv_18` (the final 1x1 conv to 1280 channels) and `classifier`
(1001 ImageNet outputs in the released model, output 0 = "background").

`images: [B, H, W, 3]` normalised with ImageNet mean/std (what the data pipeline produces for
every backbone) -> `{"C2": [B, H/4, W/4, 24], "C3": [B, H/8, W/8, 32], "C4": [B, H/16, W/16, 96],
"C5": [B, H/32, W/32, 1280], ["logits": [B, num_classes]]}`. The network itself was trained on
inputs in [-1, 1]; the module converts (set `input_range="minus_one_to_one"` to feed such inputs).

`start="C4"` (a call argument) runs only the layers after that stage: the input is the C4 map and
the result holds the stages after it (`{"C5": ...}`), computed by the same parameters. That is how
a frozen backbone's last layers train on cached stage maps (`model.trainable_after`;
`layers_after` names the layers it runs).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from fdh_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# TF/Keras MobileNetV2 BatchNorm epsilon. The running-average decay is the project's fine-tuning
# choice (as the ResNets: Flax 0.9 == PyTorch momentum 0.1), not Keras' 0.999.
BATCH_NORM_EPSILON = 1e-3
BatchNorm = partial(nn.BatchNorm, momentum=0.9, epsilon=BATCH_NORM_EPSILON)


# (expansion t, output channels c, repeats n, first stride s) of the inverted residual groups,
# after the stem conv (32 channels, stride 2). Table 2 of Sandler et al. 2018.
INVERTED_RESIDUAL_GROUPS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_FEATURES = 32
HEAD_FEATURES = 1280
# Stage map name -> index of the block (1-based, as `expanded_conv_<i>`) whose output it is.
# C5 is the output of `conv_18` (after the last block).
STAGE_BLOCKS = {"C2": 3, "C3": 6, "C4": 13}


def layers_after(stage: str) -> tuple[str, ...]:
    """Names of the top-level modules that compute what follows stage `stage` ("C2", "C3" or
    "C4"): the later inverted residual blocks and the final conv with its norm."""
    if stage not in STAGE_BLOCKS:
        raise ValueError(f"MobileNetV2 runs from stage {', '.join(STAGE_BLOCKS)}; got {stage!r}")
    last = max(index for index, *_ in block_specs())
    blocks = range(STAGE_BLOCKS[stage] + 1, last + 1)
    return (*(f"expanded_conv_{index}" for index in blocks), "conv_18", "conv_18_bn")


def stages_after(stage: str) -> tuple[str, ...]:
    """The stage maps that a run from `stage` computes (e.g. "C3" -> ("C4", "C5"))."""
    layers_after(stage)  # checks the name
    later = [s for s, index in STAGE_BLOCKS.items() if index > STAGE_BLOCKS[stage]]
    return (*later, "C5")


@dataclass(frozen=True)
class ConvLayer:
    """One conv of MobileNetV2 in forward order, as the TFLite graph lists them.

    `path` is the Flax module path of the conv (its norm is at the same path + "_bn", except the
    classifier, which has a bias and no norm).
    """

    path: tuple[str, ...]
    depthwise: bool
    kernel_size: int
    stride: int
    in_features: int
    out_features: int
    relu6: bool


def block_specs() -> Iterator[tuple[int, int, int, int, int]]:
    """Yields `(block_index, in_features, expanded_features, out_features, stride)` per block."""
    in_features = STEM_FEATURES
    block_index = 1
    for expansion, out_features, repeats, first_stride in INVERTED_RESIDUAL_GROUPS:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            yield block_index, in_features, in_features * expansion, out_features, stride
            in_features = out_features
            block_index += 1


def conv_layers(num_classes: int = 1001) -> list[ConvLayer]:
    """The convs of MobileNetV2 in forward (= TFLite graph) order, classifier last if any."""
    layers = [ConvLayer(("conv_0",), False, 3, 2, 3, STEM_FEATURES, True)]
    for index, in_features, expanded, out_features, stride in block_specs():
        block = f"expanded_conv_{index}"
        if expanded != in_features:
            layers.append(ConvLayer((block, "expand"), False, 1, 1, in_features, expanded, True))
        layers.append(ConvLayer((block, "depthwise"), True, 3, stride, expanded, expanded, True))
        layers.append(ConvLayer((block, "project"), False, 1, 1, expanded, out_features, False))
        last_features = out_features
    layers.append(ConvLayer(("conv_18",), False, 1, 1, last_features, HEAD_FEATURES, True))
    if num_classes:
        layers.append(ConvLayer(("classifier",), False, 1, 1, HEAD_FEATURES, num_classes, False))
    return layers


def _conv(features: int, kernel: int, stride: int, groups: int, name: str, dtype) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",  # TensorFlow's rule, as the released model (see module docstring)
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


def _same_padding(size: int, stride: int, kernel: int) -> tuple[int, int, int]:
    """TensorFlow 'SAME' (as JAX's): `(pad_before, pad_after, output_size)` of one axis."""
    output = -(-size // stride)
    total = max((output - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, output


def depthwise_conv_shifted(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
    """Depthwise conv, 'SAME' padding, as a sum of `kh * kw` shifted, scaled copies of `x`.

    `x: [B, H, W, C]`, `kernel: [kh, kw, 1, C]` (the layout of `nn.Conv` with
    `feature_group_count=C`) -> `[B, ceil(H / stride), ceil(W / stride), C]`. The same function
    as `lax.conv_general_dilated(..., feature_group_count=C)`; on XLA:CPU the grouped conv is
    2-6x slower forward and 8-13x slower backward than these fused elementwise ops (measured at
    MobileNetV2 shapes, batch 64), so the CPU uses this form.
    """
    kh, kw = kernel.shape[:2]
    top, bottom, out_h = _same_padding(x.shape[1], stride, kh)
    left, right, out_w = _same_padding(x.shape[2], stride, kw)
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    total = None
    for i in range(kh):
        for j in range(kw):
            window = padded[
                :,
                i : i + (out_h - 1) * stride + 1 : stride,
                j : j + (out_w - 1) * stride + 1 : stride,
            ]
            term = window * kernel[i, j, 0]
            total = term if total is None else total + term
    return total


class DepthwiseConv(nn.Module):
    """3x3 depthwise conv with the parameters of `nn.Conv(feature_group_count=C)`.

    Same variable (`kernel: [3, 3, 1, C]`), initialiser and 'SAME' padding as the grouped conv,
    so weights and checkpoints are interchangeable. On CPU it computes with
    `depthwise_conv_shifted` (much faster there); elsewhere with XLA's grouped convolution.
    """

    features: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (3, 3, 1, self.features),
            jnp.float32,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        # Chosen when lowering, per platform: an exported encoder (`jax.export` for several
        # platforms at once) keeps the fast form for each.
        return lax.platform_dependent(
            x,
            kernel,
            cpu=partial(depthwise_conv_shifted, stride=self.stride),
            default=partial(_grouped_depthwise, stride=self.stride),
        )


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6, strided) -> 1x1 linear project [+ input]."""

    in_features: int
    expanded_features: int
    out_features: int
    stride: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        out = x
        if self.expanded_features != self.in_features:
            out = _conv(self.expanded_features, 1, 1, 1, "expand", self.dtype)(out)
            out = nn.relu6(norm(name="expand_bn")(out))
        out = DepthwiseConv(self.expanded_features, self.stride, self.dtype, name="depthwise")(out)
        out = nn.relu6(norm(name="depthwise_bn")(out))
        out = _conv(self.out_features, 1, 1, 1, "project", self.dtype)(out)
        out = norm(name="project_bn")(out)
        if self.stride == 1 and self.in_features == self.out_features:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 returning `{"C2": ..., "C5": ..., ["logits"]}` (see module docstring).

    `num_classes=1001` keeps the released ImageNet classifier (output 0 = background).
    """

    num_classes: int = 0
    input_range: str = "imagenet"  # "imagenet" (mean/std-normalised) | "minus_one_to_one"
    dtype: jnp.dtype = jnp.float32
    # Eval mode computes with each BatchNorm folded into its conv (see `_folded_forward`).
    fold_batch_norm: bool = True

    @nn.compact
    def __call__(
        self, images, train: bool = False, start: str | None = None
    ) -> dict[str, jnp.ndarray]:
        if start is not None:  # `images` is the map of stage `start` (module docstring)
            layers_after(start)  # checks the name
            first_block = STAGE_BLOCKS[start] + 1
            x = images.astype(self.dtype)
            if not train and self.fold_batch_norm and not self.is_initializing():
                return _folded_forward(self.variables, x, self.num_classes, self.dtype, first_block)
            return self._layers(x, train, first_block)
        x = images.astype(jnp.float32)
        if self.input_range == "imagenet":
            pixels = x * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)  # [0, 1]
            x = pixels * 2.0 - 1.0
        elif self.input_range != "minus_one_to_one":
            raise ValueError(
                f"input_range must be 'imagenet' or 'minus_one_to_one', got {self.input_range!r}"
            )
        x = x.astype(self.dtype)
        if not train and self.fold_batch_norm and not self.is_initializing():
            return _folded_forward(self.variables, x, self.num_classes, self.dtype)
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        x = _conv(STEM_FEATURES, 3, 2, 1, "conv_0", self.dtype)(x)
        x = nn.relu6(norm(name="conv_0_bn")(x))
        return self._layers(x, train, 1)

    def _layers(self, x, train: bool, first_block: int) -> dict[str, jnp.ndarray]:
        """Blocks `first_block`.. and the final conv (and classifier) on `x`."""
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        stages = {}
        block_to_stage = {index: name for name, index in STAGE_BLOCKS.items()}
        for index, in_features, expanded, out_features, stride in block_specs():
            if index < first_block:
                continue
            x = InvertedResidual(
                in_features,
                expanded,
                out_features,
                stride,
                self.dtype,
                name=f"expanded_conv_{index}",
            )(x, train)
            if index in block_to_stage:
                stages[block_to_stage[index]] = x
        x = _conv(HEAD_FEATURES, 1, 1, 1, "conv_18", self.dtype)(x)
        stages["C5"] = nn.relu6(norm(name="conv_18_bn")(x))
        if self.num_classes:
            pooled = jnp.mean(stages["C5"], axis=(1, 2))
            stages["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(
                pooled
            )
        return stages


def _fold(variables: dict, path: tuple[str, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The conv at `path` with its eval-mode BatchNorm (`path` + "_bn") folded in:
    `(kernel * scale, bias - mean * scale)`, `scale = gamma / sqrt(var + eps)` per output."""
    params, stats = variables["params"], variables["batch_stats"]
    *parents, name = path
    for parent in parents:
        params, stats = params[parent], stats[parent]
    norm, moments = params[name + "_bn"], stats[name + "_bn"]
    scale = norm["scale"] * lax.rsqrt(moments["var"] + BATCH_NORM_EPSILON)
    return params[name]["kernel"] * scale, norm["bias"] - moments["mean"] * scale


def _pointwise(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """A 1x1 conv with bias as one matrix product over the channels."""
    return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0].astype(x.dtype)) + bias.astype(x.dtype)


def _folded_forward(
    variables: dict, x: jnp.ndarray, num_classes: int, dtype, first_block: int = 0
) -> dict:
    """Eval-mode MobileNetV2 with every BatchNorm folded into its conv and the 1x1 convs as
    matrix products: the same function as the module's layers (to float rounding: tested), in
    one pass over each activation instead of three. XLA:CPU runs it about 1.8x faster (2-core
    Xeon, chunks of 4-8 images; BENCHMARKS.md "Encoding"). `x`: the [-1, 1] input, or with
    `first_block > 0` the input of that block (the stem is skipped). Differentiable in the
    variables: the folded form is also what trains a frozen backbone's last layers."""

    def relu6(v):
        return jnp.clip(v, 0.0, 6.0)

    if not first_block:
        kernel, bias = _fold(variables, ("conv_0",))
        x = lax.conv_general_dilated(
            x, kernel.astype(dtype), (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = relu6(x + bias.astype(dtype))
    stages = {}
    block_to_stage = {index: name for name, index in STAGE_BLOCKS.items()}
    for index, in_features, expanded, out_features, stride in block_specs():
        if index < first_block:
            continue
        block = f"expanded_conv_{index}"
        out = x
        if expanded != in_features:
            out = relu6(_pointwise(out, *_fold(variables, (block, "expand"))))
        kernel, bias = _fold(variables, (block, "depthwise"))
        out = lax.platform_dependent(
            out,
            kernel.astype(dtype),
            cpu=partial(depthwise_conv_shifted, stride=stride),
            default=partial(_grouped_depthwise, stride=stride),
        )
        out = relu6(out + bias.astype(dtype))
        out = _pointwise(out, *_fold(variables, (block, "project")))
        x = out + x if stride == 1 and in_features == out_features else out
        if index in block_to_stage:
            stages[block_to_stage[index]] = x
    stages["C5"] = relu6(_pointwise(x, *_fold(variables, ("conv_18",))))
    if num_classes:
        classifier = variables["params"]["classifier"]
        pooled = jnp.mean(stages["C5"], axis=(1, 2))
        stages["logits"] = pooled @ classifier["kernel"].astype(dtype) + classifier["bias"]
    return stages


def _grouped_depthwise(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
    """XLA's grouped convolution as a depthwise conv ('SAME'): the form off CPU."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )
