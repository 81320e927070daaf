"""Tiny on-disk dataset trees in the real formats, for tests/test_sources.py.

Images are small solid colours so decoded values can be checked against the colour written.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_HEIGHT, IMAGE_WIDTH = 12, 16  # non-square, so an [H, W] / [W, H] mix-up is visible


def color_for(index: int) -> tuple[int, int, int]:
    """A distinct saturated-enough RGB colour per index (JPEG keeps solid colours within ~3)."""
    palette = [
        (200, 30, 30),
        (30, 200, 30),
        (30, 30, 200),
        (200, 200, 30),
        (30, 200, 200),
        (200, 30, 200),
        (120, 60, 20),
        (20, 120, 60),
    ]
    return palette[index % len(palette)]


def solid_rgb(color: tuple[int, int, int], height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH):
    """`uint8 [height, width, 3]` filled with `color`."""
    return np.broadcast_to(np.asarray(color, np.uint8), (height, width, 3)).copy()


def write_rgb_jpeg(path: Path, color: tuple[int, int, int], **size) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(solid_rgb(color, **size)).save(path, "JPEG", quality=95)
    return path


def write_gray_jpeg(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (IMAGE_WIDTH, IMAGE_HEIGHT), value).save(path, "JPEG", quality=95)
    return path


def write_cmyk_jpeg(path: Path, cmyk: tuple[int, int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (IMAGE_WIDTH, IMAGE_HEIGHT), cmyk).save(path, "JPEG", quality=95)
    return path


def write_rgba_png(path: Path, rgba: tuple[int, int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (IMAGE_WIDTH, IMAGE_HEIGHT), rgba).save(path, "PNG")
    return path


def truncated_jpeg_bytes() -> bytes:
    """A valid JPEG of noise with its second half cut off (Pillow would grey-fill it if allowed)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def write_truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(truncated_jpeg_bytes())
    return path


def write_image_kind(path: Path, kind: str, index: int) -> tuple[int, int, int] | None:
    """Writes one image of `kind` and returns the RGB value a correct decoder yields (None: bad).

    kind: "rgb" (colour_for(index)), "gray" (value 90), "cmyk" (pure cyan-ish), "rgba" (half
    transparent red, composited on white), "truncated".
    """
    if kind == "rgb":
        color = color_for(index)
        write_rgb_jpeg(path, color)
        return color
    if kind == "gray":
        write_gray_jpeg(path, 90)
        return (90, 90, 90)
    if kind == "cmyk":
        write_cmyk_jpeg(path, (255, 0, 0, 0))  # full cyan -> RGB (0, 255, 255) in Pillow
        return (0, 255, 255)
    if kind == "rgba":
        write_rgba_png(path, (255, 0, 0, 128))  # 50 % red over white -> (255, 127, 127)
        return (255, 127, 127)
    if kind == "truncated":
        write_truncated_jpeg(path)
        return None
    raise ValueError(kind)
