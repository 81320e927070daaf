"""A built-in synthetic *fine-grained* dataset: no files, deterministic by seed.

Every image shows one "bird" (an elliptic body with a head, a tail and a wing) at a random
position, scale and rotation, with a random body shade, over a cluttered background of random
shapes whose colours include the very colours that tell classes apart. Classes differ only in
two small parts: the colour of the head and the pattern of the wing (solid dark, stripes, spots,
solid light). So a model has to find the object and read local detail; global colour statistics
and the background carry no class information. This is what FDH-MFE is about, in miniature.

Class `c` has head colour `c % 4` and wing pattern `(c // 4) % 4` (and, beyond 16 classes, a tail
colour `c // 16`), so up to 64 classes are available.
"""

import numpy as np

HEAD_COLOURS = np.array(
    [[0.86, 0.10, 0.10], [0.95, 0.85, 0.10], [0.10, 0.30, 0.90], [0.10, 0.70, 0.20]], np.float32
)
TAIL_COLOURS = np.array(
    [[0.45, 0.35, 0.25], [0.95, 0.55, 0.10], [0.60, 0.10, 0.60], [0.15, 0.15, 0.15]], np.float32
)
WING_PATTERNS = ("solid_dark", "stripes", "spots", "solid_light")
MAX_CLASSES = len(HEAD_COLOURS) * len(WING_PATTERNS) * len(TAIL_COLOURS)
_DARK = np.array([0.12, 0.12, 0.14], np.float32)
_LIGHT = np.array([0.92, 0.92, 0.86], np.float32)
# Clutter reuses the class colours, so a red blob in the background is not evidence of a red head.
_CLUTTER_PALETTE = np.concatenate(
    [HEAD_COLOURS, TAIL_COLOURS, [_DARK, _LIGHT, [0.5, 0.5, 0.5], [0.3, 0.6, 0.8]]]
).astype(np.float32)


def class_background(label: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The typical background of class `label` in a `class_backgrounds` database split: the
    two gradient colours and the gradient's angle, fixed by `(seed, label)`."""
    rng = np.random.default_rng([seed, 7, label])
    c0, c1 = rng.uniform(0.15, 0.85, size=(2, 3)).astype(np.float32)
    return c0, c1, float(rng.uniform(0, 2 * np.pi))


def render_bird(
    label: int,
    size: int,
    rng: np.random.Generator,
    background: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> np.ndarray:
    """One `[size, size, 3]` uint8 image of class `label`, randomised by `rng`.

    `background`: the gradient's two colours and angle (`class_background`), jittered slightly
    per image; None draws them at random, so they say nothing about the class.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # Background: a two-colour gradient, then clutter.
    c0, c1 = rng.uniform(0.15, 0.85, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    if background is not None:  # the class's colours (the draws above keep the stream aligned)
        jitter = rng.uniform(-0.05, 0.05, size=(2, 3)).astype(np.float32)
        c0, c1 = background[0] + jitter[0], background[1] + jitter[1]
        angle = background[2] + rng.uniform(-0.3, 0.3)
    ramp = ((xx * np.cos(angle) + yy * np.sin(angle)) / size + 1.0) / 2.0
    image = c0 + (c1 - c0) * np.clip(ramp, 0, 1)[..., None]
    for _ in range(rng.integers(6, 12)):
        colour = _CLUTTER_PALETTE[rng.integers(len(_CLUTTER_PALETTE))]
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.03, 0.09) * size
        if rng.random() < 0.5:
            shape = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        else:
            shape = (np.abs(xx - cx) <= r * rng.uniform(0.5, 2.0)) & (np.abs(yy - cy) <= r)
        image[shape] = colour

    # The object, in its own rotated frame (u along the body axis, head at +u).
    scale = rng.uniform(0.85, 1.15)
    a, b = 0.24 * size * scale, 0.14 * size * scale
    cx, cy = rng.uniform(0.32, 0.68, 2) * size
    theta = rng.uniform(0, 2 * np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    body_colour = np.array([0.62, 0.50, 0.38], np.float32) + rng.uniform(-0.08, 0.08, 3)

    head_colour = HEAD_COLOURS[label % 4]
    pattern = WING_PATTERNS[(label // 4) % 4]
    tail_colour = TAIL_COLOURS[(label // 16) % 4] if label >= 16 else body_colour

    tail = (u < -0.8 * a) & (u > -1.5 * a) & (np.abs(v) < (-0.8 * a - u) * 0.7 + 0.15 * b)
    image[tail] = tail_colour
    image[(u / a) ** 2 + (v / b) ** 2 <= 1.0] = body_colour
    image[(u - 1.05 * a) ** 2 + v**2 <= (0.62 * b) ** 2] = head_colour
    wu, wv = u + 0.15 * a, v
    wing = (wu / (0.6 * a)) ** 2 + (wv / (0.72 * b)) ** 2 <= 1.0
    period = 0.42 * a
    if pattern == "solid_dark":
        wing_colour = np.broadcast_to(_DARK, image.shape)
    elif pattern == "solid_light":
        wing_colour = np.broadcast_to(_LIGHT, image.shape)
    elif pattern == "stripes":
        stripe = np.sin(2 * np.pi * wu / period) > 0
        wing_colour = np.where(stripe[..., None], _DARK, _LIGHT)
    else:  # spots: light dots on dark
        du = np.mod(wu, period) - period / 2
        dv = np.mod(wv, period) - period / 2
        spot = du**2 + dv**2 <= (0.28 * period) ** 2
        wing_colour = np.where(spot[..., None], _LIGHT, _DARK)
    image[wing] = wing_colour[wing]

    image = image + rng.normal(0, 0.03, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


class SyntheticFineGrained:
    """The synthetic set as a data source (`len`, indexing, `labels`, `paths`, ...).

    With `class_backgrounds` the train (database) split shows each class over its own typical
    background (`class_background`), while the test (query) split keeps random backgrounds: a
    spurious correlation that a model reading the background learns and queries then break.
    Images are rendered once, at construction, into memory. Image `i` of split `split` is
    rendered from the random stream `(seed, split id, i)`, so the set is the same on every
    machine and in every process.
    """

    def __init__(
        self,
        split: str,
        *,
        num_classes: int = 16,
        train_per_class: int = 48,
        test_per_class: int = 24,
        image_size: int = 64,
        seed: int = 0,
        class_backgrounds: bool = False,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(
                f"synthetic num_classes must be in [1, {MAX_CLASSES}], got {num_classes}"
            )
        per_class = train_per_class if split == "train" else test_per_class
        self.name = "synthetic"
        self.split = split
        self.num_classes = num_classes
        self.class_names = [
            f"head{c % 4}_{WING_PATTERNS[(c // 4) % 4]}_tail{c // 16}" for c in range(num_classes)
        ]
        self.labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
        self.paths = [f"synthetic/{split}/{i:05d}" for i in range(len(self.labels))]
        split_id = 0 if split == "train" else 1
        # With class backgrounds only the database split (train) carries the spurious cue.
        typical = class_backgrounds and split == "train"
        self.images = np.stack(
            [
                render_bird(
                    int(label),
                    image_size,
                    np.random.default_rng([seed, split_id, i]),
                    class_background(int(label), seed) if typical else None,
                )
                for i, label in enumerate(self.labels)
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "label": int(self.labels[index]),
            "path": self.paths[index],
        }
