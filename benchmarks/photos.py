"""Deterministic 12-megapixel test JPEGs for benchmarks, made from scikit-image's sample photos.

Each file is a seeded crop of a sample photo (cat, coffee, astronaut, rocket), mirrored or not,
enlarged to 4032x3024 (a 12 MP phone photo) with photographic noise (luminance and chroma grain)
so that its entropy, file size (~3 MB) and decode cost resemble a real photo's, and saved at
quality 90. The same arguments always give the same bytes, so runs are comparable.

Use from another script in ``benchmarks/`` (the script's folder is on ``sys.path``)::

    from photos import benchmark_photos
    paths = benchmark_photos(folder=None, count=48)   # generated once into the cache, then reused

or ``python benchmarks/photos.py [--count N] [--dest DIR]`` to just generate them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from tagger import sample_photos
from tagger.sample_photos import QUALITY, SIZE, grainy_jpeg

SOURCES = ("chelsea", "coffee", "astronaut", "rocket")
VERSION = 1  # bump when the recipe changes, so that cached files are regenerated
PHOTO_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".tif", ".tiff", ".bmp", ".gif"}


def default_cache_dir() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("phototag") / "bench-photos"


def photo_name(index: int, size: tuple[int, int] = SIZE, quality: int = QUALITY) -> str:
    return f"synthetic-v{VERSION}-{size[0]}x{size[1]}-q{quality}-{index:04d}.jpg"


def make_photo(index: int, size: tuple[int, int] = SIZE, quality: int = QUALITY) -> bytes:
    """The JPEG bytes of photo number ``index`` (deterministic)."""
    import skimage.data

    rng = np.random.default_rng(1000 + index)
    source = Image.fromarray(getattr(skimage.data, SOURCES[index % len(SOURCES)])()).convert("RGB")
    # A random crop with the target's aspect ratio, 70-100% of the largest one that fits.
    aspect = size[0] / size[1]
    full_w = min(source.width, source.height * aspect)
    scale = rng.uniform(0.7, 1.0)
    w, h = full_w * scale, full_w * scale / aspect
    left = rng.uniform(0, source.width - w)
    top = rng.uniform(0, source.height - h)
    image = source.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return grainy_jpeg(image, rng, quality)


def generate_photos(count: int, dest: Path | None = None, *, size: tuple[int, int] = SIZE,
                    quality: int = QUALITY, progress: bool = True) -> list[Path]:
    """Photos 0..count-1 in ``dest`` (default: the cache dir); existing files are reused."""
    def announce(path: Path) -> None:
        print(f"generating {path}", flush=True)

    return sample_photos.generate_photos(count, Path(dest) if dest else default_cache_dir(),
                                         size=size, quality=quality, make=make_photo,
                                         name=photo_name, on_new=announce if progress else None)


def folder_photos(folder: Path, count: int | None = None) -> list[Path]:
    """The image files directly in ``folder``, sorted by name, at most ``count``."""
    paths = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS)
    return paths[:count] if count else paths


def benchmark_photos(folder: Path | None, count: int) -> list[Path]:
    """``count`` photos from ``folder`` if given, else the generated 12 MP JPEGs."""
    return folder_photos(folder, count) if folder else generate_photos(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--dest", type=Path, default=None, help=f"default: {default_cache_dir()}")
    args = parser.parse_args()
    for path in generate_photos(args.count, args.dest):
        print(path)


if __name__ == "__main__":
    main()
