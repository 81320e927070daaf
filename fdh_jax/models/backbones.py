"""Backbones that return their stage maps by name.

The ResNets follow torchvision's layout exactly ("v1.5": the stride sits on the 3x3 conv of a
bottleneck; explicit paddings (3, 3) on the stem, (1, 1) on the max-pool and every 3x3 conv), so
torchvision and timm weights load without shifted activations. Module names mirror torchvision's
state-dict keys (`layer1_0.conv1` for `layer1.0.conv1`).

Every backbone maps `images: [B, H, W, 3]` to a dict of stage maps `C2..C5` with strides 4, 8, 16
and 32, plus `logits: [B, num_classes]` when built with `num_classes > 0`.
"""

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from fdh_jax.models.mobilenet import MobileNetV2

# torchvision BatchNorm: eps 1e-5, running-average momentum 0.1 == Flax decay 0.9.
BatchNorm = partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
STAGE_NAMES = ("C2", "C3", "C4", "C5")


def _conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        out = _conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
        out = nn.relu(norm(name="bn1")(out))
        out = _conv(self.features, 3, 1, "conv2", self.dtype)(out)
        out = norm(name="bn2")(out)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, "downsample_conv", self.dtype)(x)
            x = norm(name="downsample_bn")(x)
        return nn.relu(out + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet-50/101, torchvision v1.5)."""

    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        norm = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        out_features = self.features * self.expansion
        out = _conv(self.features, 1, 1, "conv1", self.dtype)(x)
        out = nn.relu(norm(name="bn1")(out))
        out = _conv(self.features, 3, self.stride, "conv2", self.dtype)(out)
        out = nn.relu(norm(name="bn2")(out))
        out = _conv(out_features, 1, 1, "conv3", self.dtype)(out)
        out = norm(name="bn3")(out)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = _conv(out_features, 1, self.stride, "downsample_conv", self.dtype)(x)
            x = norm(name="downsample_bn")(x)
        return nn.relu(out + x)


class ResNet(nn.Module):
    """torchvision-layout ResNet returning `{"C2": ..., "C5": ..., ["logits"]}`."""

    stage_sizes: Sequence[int]
    block: Callable[..., nn.Module]
    width: int = 64
    num_classes: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False) -> dict[str, jnp.ndarray]:
        x = images.astype(self.dtype)
        x = _conv(self.width, 7, 2, "conv1", self.dtype)(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = {}
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = self.block(
                    features=self.width * 2**i,
                    stride=stride,
                    dtype=self.dtype,
                    name=f"layer{i + 1}_{j}",
                )(x, train)
            stages[STAGE_NAMES[i]] = x
        if self.num_classes:
            pooled = jnp.mean(x, axis=(1, 2))
            stages["logits"] = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled)
        return stages


_RESNETS = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
    # One basic block per stage: for tests and the CPU demo (set `width`, e.g. 16).
    "resnet_narrow": ((1, 1, 1, 1), BasicBlock),
}

BACKBONES = (*_RESNETS, "mobilenet_v2")


def get_backbone(
    name: str, *, width: int = 64, num_classes: int = 0, dtype=jnp.float32
) -> nn.Module:
    """Returns the backbone module `name` (one of `BACKBONES`).

    `width` sets the ResNets' stem width; MobileNetV2 is always the 1.0 model and ignores it.
    """
    if name == "mobilenet_v2":
        return MobileNetV2(num_classes=num_classes, dtype=dtype)
    if name not in _RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    stage_sizes, block = _RESNETS[name]
    return ResNet(stage_sizes, block, width=width, num_classes=num_classes, dtype=dtype)
