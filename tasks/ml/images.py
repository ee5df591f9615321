"""Image files to arrays, the way prediction and the evaluation figures read them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode one image file to uint8 RGB of ``size`` = (height, width), bilinear resize."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
