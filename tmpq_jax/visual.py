"""PNG sample grids and plots."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """(n, H, W, C) in [0, 1] -> one uint8 (rows*H, cols*W, C) mosaic."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = im
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def save_grid(path: str | os.PathLike, images: np.ndarray, ncols: int | None = None, scale: int = 2) -> None:
    from PIL import Image

    g = image_grid(images, ncols)
    im = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
