"""Deterministic photo-like 12 MP JPEGs for ``phototag bench`` when the user names no folder.

The images are procedural (numpy and Pillow only, no data files): smooth colour fields and soft
shapes at several scales, enlarged to 4032x3024 with luminance and chroma grain, saved at quality
90. That gives a file size (~3 MB) and decode cost like a phone photo's, which is what a benchmark
of the decode/inference pipeline needs. Their content means nothing to a classifier, so top-1
agreement measured on them is only a sanity check: measure it on real photos (``bench FOLDER``).

The same arguments always give the same bytes, so runs on different machines are comparable.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = (4032, 3024)
QUALITY = 90
NOISE_SIGMA = 5.0  # luminance grain in 8-bit levels; chroma grain is half of it
VERSION = 1  # part of the file names: bump when the recipe changes so cached files are remade


def photo_name(index: int, size: tuple[int, int] = SIZE, quality: int = QUALITY) -> str:
    return f"phototag-sample-v{VERSION}-{size[0]}x{size[1]}-q{quality}-{index:04d}.jpg"


def make_photo(index: int, size: tuple[int, int] = SIZE, quality: int = QUALITY) -> bytes:
    """The JPEG bytes of sample photo number ``index``."""
    rng = np.random.default_rng(20_000 + index)
    width, height = size
    # A low-resolution scene: a smooth colour field plus soft-edged ellipses and bars, drawn at
    # 1/8 size and enlarged, so the photo has large smooth areas and some edges, like most photos.
    small = (max(1, width // 8), max(1, height // 8))
    field = rng.uniform(0, 255, (4, 3, 3)).astype(np.uint8)
    scene = Image.fromarray(field).resize(small, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(scene)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(-0.2, 1.0) * small[0], rng.uniform(-0.2, 1.0) * small[1]
        w, h = rng.uniform(0.05, 0.5) * small[0], rng.uniform(0.05, 0.5) * small[1]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (x0, y0, x0 + w, y0 + h)
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=colour)
    scene = scene.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 3.0))))
    return grainy_jpeg(scene.resize(size, Image.Resampling.BICUBIC), rng, quality)


def grainy_jpeg(image: Image.Image, rng: np.random.Generator, quality: int = QUALITY) -> bytes:
    """``image`` with photographic grain (luminance, and chroma at half of it), as JPEG bytes.

    The grain gives a photo's entropy, file size and decode cost to a smooth synthetic image.
    """
    width, height = image.size
    pixels = np.asarray(image, dtype=np.float32)
    grain = rng.standard_normal((height, width, 1), dtype=np.float32) * NOISE_SIGMA
    grain = grain + rng.standard_normal((height, width, 3), dtype=np.float32) * (NOISE_SIGMA / 2)
    pixels = np.clip(pixels + grain + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def generate_photos(count: int, dest: Path, *, size: tuple[int, int] = SIZE,
                    quality: int = QUALITY, make: Callable[..., bytes] = make_photo,
                    name: Callable[..., str] = photo_name,
                    on_new: Callable[[Path], None] | None = None) -> list[Path]:
    """Photos 0..count-1 in ``dest``; files already there are reused (they never change).

    ``make(index, size, quality)`` and ``name(index, size, quality)`` give another recipe its own
    photos (``benchmarks/photos.py`` makes them from real sample photos); ``on_new`` is called
    with each file before it is generated.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = dest / name(index, size, quality)
        if not path.exists():
            if on_new is not None:
                on_new(path)
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temp.write_bytes(make(index, size, quality))
            os.replace(temp, path)  # never leave half a file under the final name
        paths.append(path)
    return paths
