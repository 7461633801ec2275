"""Image file -> normalised input tensor, fast, and equivalent to torchvision's reference transforms.

Speed comes from Pillow's JPEG draft mode: libjpeg scales the image down by 1/2, 1/4 or 1/8 while
decoding (in the DCT domain), so a 12 MP photo is decoded at about 504x378 instead of 4032x3024. We
pick the smallest scale whose shorter side is still >= the resize target, so the final (antialiased)
resize always shrinks and the result stays close to resizing the full decode.

Conversions to RGB, decided here once for every caller:

* EXIF orientation is applied (``ImageOps.exif_transpose`` semantics), so a photo classifies upright.
* Transparent images (RGBA, LA, palette with a transparent colour) are composited on **white**: that is
  how viewers show logos, stickers and screenshots, and the RGB values under transparent pixels are
  arbitrary (often black), which would otherwise dominate the picture.
* CMYK JPEGs (including Adobe's inverted CMYK, which Pillow's decoder undoes) use Pillow's plain
  CMYK -> RGB conversion; embedded ICC profiles are ignored.
* 16-bit greyscale is scaled to 8 bits (Pillow's ``convert`` would clip it to white).
* Animations (GIF, WebP, APNG) use their first frame.
* HEIC/HEIF is read through pillow-heif when it is installed (an optional extra).
* A decompression-bomb limit: images over ``max_pixels()`` are refused before decoding.

Every failure is an ``ImageError`` with a one-line reason; callers add the file name.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

    from tagger.backbones import Backbone

try:  # optional extra: phototag[heif]
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORT = True
except ImportError:
    HEIF_SUPPORT = False

# We enforce our own limit (below) with a clear error; Pillow's warning between 1x and 2x its limit
# would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif"}


class ImageError(Exception):
    """A file that cannot be turned into an image; the message is a one-line reason."""


def max_pixels() -> int:
    """The decompression-bomb limit: Pillow's hard limit (2x ``Image.MAX_IMAGE_PIXELS``, ~179 MP).

    It covers 108 MP phone photos; raise ``Image.MAX_IMAGE_PIXELS`` to allow larger images.
    """
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0


def load_image(path: str | os.PathLike, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``path`` to an upright RGB image whose shorter side is >= ``size`` where possible.

    JPEGs are decoded in draft mode at the smallest DCT scale that keeps the shorter side >= ``size``
    (other formats are decoded in full). Returns the image and the original ``(width, height)``
    after EXIF orientation. Raises ``ImageError``.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageError("is a directory")
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        im = Image.open(path)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(_too_large(str(e))) from None
    except UnidentifiedImageError:
        raise ImageError(_unidentified_reason(path)) from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    with im:
        width, height = im.size
        limit = max_pixels()
        if limit and width * height > limit:
            raise ImageError(f"image too large: {width}x{height} pixels (limit {limit})")
        orientation = _orientation(im)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if im.format == "JPEG":
            im.draft(None, (size, size))  # no-op if the image is already small
        try:
            im.load()
            image = ImageOps.exif_transpose(im) if orientation not in (None, 1) else im
            image = to_rgb(image)
        except ImageError:
            raise
        except OSError as e:
            raise ImageError(_decode_reason(im.format, e)) from None
        except (ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
            raise ImageError(f"cannot decode {im.format or 'image'}: {e}") from None
    return image, (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a viewer shows it (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.int64)  # keeps the byte order of I;16B right
        grey = (np.clip(values, 0, 65535) // 257).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"unsupported image mode {mode}: {e}") from None


def _orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return None


def _too_large(message: str) -> str:
    match = re.search(r"\((\d+) pixels\)", message)
    pixels = f"{int(match.group(1))} pixels" if match else "too many pixels"
    return f"image too large: {pixels} (limit {max_pixels()})"


def _unidentified_reason(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        head = b""
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS and not HEIF_SUPPORT:
        return "HEIC/HEIF image, but pillow-heif is not installed (pip install phototag[heif])"
    return "not an image (cannot identify format)"


def _decode_reason(fmt: str | None, error: OSError) -> str:
    text = str(error)
    if "truncated" in text:
        return f"truncated {fmt or 'image'} file"
    return f"cannot decode {fmt or 'image'}: {text}"


# --- to tensor -------------------------------------------------------------------------------


def _resample(backbone: Backbone) -> Image.Resampling:
    return Image.Resampling[backbone.interpolation.upper()]


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """The size torchvision's ``Resize(resize)`` gives: shorter side ``resize``, the other truncated."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def preprocess(image: Image.Image, backbone: Backbone) -> torch.Tensor:
    """RGB image -> normalised float tensor (3, crop, crop), as ``reference_transform`` computes it."""
    import torch

    return torch.from_numpy(normalize(to_uint8_array(resize_crop(image, backbone)), backbone))


def resize_crop(image: Image.Image, backbone: Backbone) -> Image.Image:
    """Resize the shorter side to ``backbone.resize`` and center-crop ``backbone.crop``.

    Antialiased like torchvision's ``Resize`` on PIL images (which calls Pillow's resize), and in
    one Pillow call: resizing only the source box that the crop keeps samples the same source
    positions as resizing everything and then cropping, for less work.
    """
    crop = backbone.crop
    new_w, new_h = resized_size(image.width, image.height, backbone.resize)
    # torchvision's center_crop offsets
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    sx, sy = image.width / new_w, image.height / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return image.resize((crop, crop), _resample(backbone), box=box)


def to_uint8_array(image: Image.Image) -> np.ndarray:
    """RGB image -> (3, H, W) uint8 array (a channels-first view); Pillow and numpy only."""
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)


def normalize(pixels: np.ndarray, backbone: Backbone) -> np.ndarray:
    """uint8 (..., 3, H, W) -> float32 scaled to [0, 1] and normalised with the backbone's mean/std.

    The same operations in the same order as torchvision's ``ToTensor`` + ``Normalize``, for one
    image or a batch; in numpy, so that every runtime (ONNX Runtime without torch too) shares it.
    """
    mean = np.asarray(backbone.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(backbone.std, dtype=np.float32).reshape(3, 1, 1)
    out = pixels.astype(np.float32)
    out /= np.float32(255)
    out -= mean
    out /= std
    return out


def reference_transform(backbone: Backbone):
    """torchvision's own pipeline for ``backbone``: the reference in tests and the benchmark."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(backbone.resize,
                          interpolation=transforms.InterpolationMode(backbone.interpolation),
                          antialias=True),
        transforms.CenterCrop(backbone.crop),
        transforms.ToTensor(),
        transforms.Normalize(backbone.mean, backbone.std),
    ])


def reference_load(path: str | os.PathLike) -> Image.Image:
    """The naive decode: full size, EXIF orientation applied, converted to RGB."""
    with Image.open(path) as im:
        return to_rgb(ImageOps.exif_transpose(im))
