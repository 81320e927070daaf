"""Image transforms of the retrieval protocol, on uint8 NumPy images (docs/design.md,
"Evaluation protocol").

Train: random-resized crop + horizontal flip. Test: resize the shorter side, centre crop. Both
end with ImageNet normalisation to float32. Randomness comes from an explicit
`np.random.Generator`, so every augmentation is reproducible from (seed, step, slot).
"""

import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _resize(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]):
    """Bilinear resize of the region `box = (left, top, right, bottom)` to `size = (w, h)`."""
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, box=box))


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop (torchvision `RandomResizedCrop` rule): `[H, W, 3] -> [S, S, 3]`."""
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return _resize(image, (left, top, left + w, top + h), (size, size))
    # Fallback: the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return _resize(image, (left, top, left + w, top + h), (size, size))


def train_transform(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    *,
    crop_scale: tuple[float, float] = (0.35, 1.0),
    horizontal_flip: bool = True,
) -> np.ndarray:
    """Random-resized crop, flip, normalise: uint8 `[H, W, 3]` -> float32 `[size, size, 3]`."""
    image = random_resized_crop(image, size, rng, scale=tuple(crop_scale))
    if horizontal_flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return normalize(image)


def eval_transform(image: np.ndarray, size: int, resize: int) -> np.ndarray:
    """Resize the shorter side to `resize`, centre-crop `size`, normalise -> float32."""
    return normalize(eval_crop(image, size, resize))


def eval_crop(image: np.ndarray, size: int, resize: int) -> np.ndarray:
    """`eval_transform` before the normalisation: uint8 `[size, size, 3]`."""
    height, width = image.shape[:2]
    if (height, width) != (size, size):
        factor = resize / min(height, width)
        new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
        image = _resize(image, (0, 0, width, height), (new_w, new_h))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        image = image[top : top + size, left : left + size]
    return image


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 `[..., 3]` -> float32 ImageNet-normalised."""
    return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


# `normalize` of every uint8 value in every channel: `NORMALIZED[v, c]`. A lookup in it gives
# `normalize`'s float32 values bit for bit inside a compiled program (the same arithmetic
# compiled by XLA may round differently).
NORMALIZED = normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))
