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

Memory: formats other than JPEG cannot be decoded at a reduced size, so a large PNG, TIFF, WebP or
HEIC is decoded whole once, and then, band by band, converted to RGB and box-reduced (``Image.reduce``)
to at least ``REDUCING_GAP`` times the resize target, and resized to exactly torchvision's resize size.
Only one full-size image ever exists (a 169 MP RGBA PNG needs 0.7 GB, not 4 GB), and the few large
decodes run one at a time across threads. The 224x224 crop differs from that of the full image by a
third of an 8-bit level on average (2 at most), like Pillow's own ``reducing_gap``.

PNG text and ICC chunks may decompress to 16 MB each (Pillow's guard stops at 1 MB); larger ones are
refused with a clear reason, since they are decompression bombs rather than photos.

Every failure is an ``ImageError`` with a one-line reason; callers add the file name.
"""

from __future__ import annotations

import contextlib
import os
import stat
import re
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

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

# Pillow refuses a PNG whose zTXt/iTXt/iCCP chunk decompresses to over 1 MB (a decompression-bomb
# guard), which a large ICC profile or XMP packet can exceed; 16 MB still bounds the memory per chunk
# (and text chunks stay bounded by PngImagePlugin.MAX_TEXT_MEMORY, 64 MB, in total).
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, 16 * 1024 * 1024)

REDUCING_GAP = 3
"""A large decode is box-reduced to at least this many times the resize size before the final resize
(Pillow's ``reducing_gap``: 3 is indistinguishable from resizing the full image in most cases)."""

LARGE_DECODE_PIXELS = 64_000_000
"""Decodes over this many pixels (0.25 GB and up) run one at a time, whatever the thread count."""

_BAND_PIXELS = 1 << 20  # converted to RGB this many pixels at a time: a few MB of temporary copies
_large_decodes = threading.Lock()
_TRANSPOSE = {  # EXIF orientation -> the transposition that shows it upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif"}


class ImageError(Exception):
    """A file that cannot be turned into an image; the message is a one-line reason."""


def max_pixels() -> int:
    """The decompression-bomb limit: Pillow's hard limit (2x ``Image.MAX_IMAGE_PIXELS``, ~179 MP).

    It covers 108 MP phone photos; raise ``Image.MAX_IMAGE_PIXELS`` to allow larger images.
    """
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0


def load_image(path: str | os.PathLike, size: int,
               interpolation: str = "bilinear") -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``path`` to an upright RGB image whose shorter side is >= ``size`` where possible.

    JPEGs are decoded in draft mode at the smallest DCT scale that keeps the shorter side >= ``size``.
    An image still over ``REDUCING_GAP`` times that size after decoding is reduced to exactly the
    size ``Resize(size)`` gives, with ``interpolation`` (the backbone's) for the last step. Returns
    the image and the original ``(width, height)`` after EXIF orientation. Raises ``ImageError``.
    """
    path = Path(path)
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("is a directory")
        if not stat.S_ISREG(st.st_mode):  # a FIFO would wait for a writer, a device never end
            raise ImageError("not a regular file")
        if st.st_size == 0:
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
    except ValueError as e:
        raise ImageError(_png_chunk_reason(e) or f"cannot decode image: {e}") from None
    with im:
        width, height = im.size
        limit = max_pixels()
        if limit and width * height > limit:
            raise ImageError(f"image too large: {width}x{height} pixels (limit {limit})")
        if im.format == "JPEG":
            im.draft(None, (size, size))  # no-op if the image is already small
        large = im.width * im.height > LARGE_DECODE_PIXELS
        try:
            with _large_decodes if large else contextlib.nullcontext():
                orientation = _orientation(im)  # a PNG's EXIF may follow the pixels: this can decode
                im.load()
                image = reduced_rgb(im, size, interpolation)
                if image is not im:
                    im.close()  # free the full-size decode before the next large one starts
            if orientation in _TRANSPOSE:
                image = image.transpose(_TRANSPOSE[orientation])
            if orientation in (5, 6, 7, 8):
                width, height = height, width
        except ImageError:
            raise
        except OSError as e:
            raise ImageError(_decode_reason(im.format, e)) from None
        except ValueError as e:
            reason = _png_chunk_reason(e) or f"cannot decode {im.format or 'image'}: {e}"
            raise ImageError(reason) from None
        except (SyntaxError, EOFError, IndexError, TypeError) as e:
            raise ImageError(f"cannot decode {im.format or 'image'}: {e}") from None
    return image, (width, height)


def reduction_factor(width: int, height: int, size: int) -> tuple[int, int]:
    """The integer box reduction per axis that keeps the image ``REDUCING_GAP`` times its resize size."""
    target_w, target_h = resized_size(width, height, size)
    return max(1, width // (REDUCING_GAP * target_w)), max(1, height // (REDUCING_GAP * target_h))


def reduced_rgb(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """A loaded image -> RGB (as ``to_rgb``), reduced to ``Resize(size)``'s size if it is large.

    Converts and reduces a band of rows at a time, so the conversions' full-size copies never exist;
    converting before reducing keeps the result that of ``to_rgb`` on the whole image. The final
    resize maps the reduced image's exact extent (the last box may be partial), so sampling
    positions match a resize of the full image.
    """
    factor = reduction_factor(image.width, image.height, size)
    if factor == (1, 1) and (image.mode == "RGB" or image.width * image.height <= _BAND_PIXELS):
        return to_rgb(image)
    fx, fy = factor
    rows = max(fy, _BAND_PIXELS // image.width // fy * fy)  # a multiple of fy: bands reduce exactly
    out = Image.new("RGB", (-(-image.width // fx), -(-image.height // fy)))
    for top in range(0, image.height, rows):
        band = image.crop((0, top, image.width, min(top + rows, image.height)))
        out.paste(to_rgb(band).reduce(factor), (0, top // fy))
    if factor == (1, 1):
        return out
    return out.resize(resized_size(image.width, image.height, size),
                      Image.Resampling[interpolation.upper()],
                      box=(0, 0, image.width / fx, image.height / fy))


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


def _png_chunk_reason(error: ValueError) -> str | None:
    """Pillow's decompression-bomb guards on PNG text/ICC chunks, in plain words (else None)."""
    text = str(error)
    if "MAX_TEXT_CHUNK" in text:
        limit = PngImagePlugin.MAX_TEXT_CHUNK // (1024 * 1024)
        return f"PNG text or ICC profile chunk larger than {limit} MB when decompressed"
    if "MAX_TEXT_MEMORY" in text:
        limit = PngImagePlugin.MAX_TEXT_MEMORY // (1024 * 1024)
        return f"PNG text chunks larger than {limit} MB in total when decompressed"
    return None


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
