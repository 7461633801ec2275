"""tagger.preprocess on real files: fast decode, conversions to RGB, bad input, and equivalence with
torchvision's reference transforms."""

from __future__ import annotations

import os
import struct
import subprocess
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagger.backbones import get_backbone
from tagger.preprocess import (
    ImageError,
    load_image,
    max_pixels,
    preprocess,
    reference_load,
    reference_transform,
)

PHOTOS = Path(__file__).parent / "fixtures" / "photos"
CAT = PHOTOS / "cat.jpg"


@pytest.fixture(scope="module")
def resnet():
    return get_backbone("resnet18")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(pixels(a) - pixels(b)).mean())


def cat() -> Image.Image:
    with Image.open(CAT) as im:
        return im.convert("RGB")


def upscaled_cat(tmp_path: Path, width: int = 2400, **save) -> Path:
    """A larger JPEG, so that draft mode has something to scale down."""
    image = cat()
    path = tmp_path / "big-cat.jpg"
    image.resize((width, round(width * image.height / image.width)), Image.Resampling.BICUBIC).save(
        path, quality=90, **save)
    return path


# --- equivalence with the reference --------------------------------------------------------------


def test_preprocess_matches_torchvision_on_a_lossless_image(tmp_path, resnet):
    path = tmp_path / "cat.png"
    cat().save(path)
    image, size = load_image(path, resnet.resize)
    assert size == (400, 266)
    fast = preprocess(image, resnet)
    reference = reference_transform(resnet)(reference_load(path))
    assert fast.shape == reference.shape == (3, 224, 224)
    assert fast.dtype == torch.float32
    # Same sampling positions; only float rounding differs (at most one 8-bit level).
    one_level = 1 / 255 / min(resnet.std)
    assert (fast - reference).abs().max().item() <= one_level + 1e-6
    differing = ((fast - reference).abs() > 1e-5).float().mean().item()
    assert differing < 0.05


@pytest.mark.parametrize("width,height", [(300, 500), (257, 256), (224, 900)])
def test_preprocess_matches_torchvision_for_any_aspect(width, height, resnet):
    image = cat().resize((width, height))
    fast = preprocess(image, resnet)
    reference = reference_transform(resnet)(image)
    assert (fast - reference).abs().max().item() <= 1 / 255 / min(resnet.std) + 1e-6


def test_jpeg_is_decoded_in_draft_mode_to_the_smallest_scale_still_large_enough(tmp_path, resnet):
    path = upscaled_cat(tmp_path, width=2400)  # 2400x1596
    image, size = load_image(path, resnet.resize)
    assert size == (2400, 1596)
    # 1596 / 4 = 399 >= 256 but 1596 / 8 < 256: decoded at a quarter of the size.
    assert image.size == (600, 399)
    assert image.mode == "RGB"
    fast = preprocess(image, resnet)
    reference = reference_transform(resnet)(reference_load(path))
    # DCT-domain downscaling differs slightly from a full decode, but not in substance.
    assert (fast - reference).abs().mean().item() < 0.05


def test_a_small_jpeg_is_decoded_in_full(resnet):
    image, size = load_image(CAT, resnet.resize)
    assert image.size == size == (400, 266)


# --- conversions -----------------------------------------------------------------------------------


def test_exif_rotated_photo_is_loaded_upright():
    upright, size = load_image(CAT, 256)
    rotated, rotated_size = load_image(PHOTOS / "cat-rotated.jpg", 256)
    assert rotated_size == size == (400, 266)
    assert mean_difference(rotated, upright) < 3
    # exiftool, as an independent reader, confirms the fixture really is stored sideways.
    out = subprocess.run(["exiftool", "-s3", "-Orientation#", "-ImageWidth", str(PHOTOS / "cat-rotated.jpg")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["6", "266"]


def test_exif_rotation_is_applied_after_draft_decoding(tmp_path):
    big = upscaled_cat(tmp_path, width=2400)
    with Image.open(big) as im:
        exif = Image.Exif()
        exif[0x0112] = 8  # stored turned right; viewers turn it left
        path = tmp_path / "big-rotated.jpg"
        im.transpose(Image.Transpose.ROTATE_270).save(path, quality=90, exif=exif)
    rotated, size = load_image(path, 256)
    upright, upright_size = load_image(big, 256)
    assert size == upright_size == (2400, 1596)
    assert rotated.size == upright.size == (600, 399)
    assert mean_difference(rotated, upright) < 3


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    cat().convert("CMYK").save(path, quality=95)  # libjpeg writes Adobe's inverted CMYK
    assert b"Adobe" in path.read_bytes()[:64]
    image, _ = load_image(path, 256)
    assert image.mode == "RGB"
    assert mean_difference(image, cat()) < 4


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    grey = np.asarray(cat().convert("L"), dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey * 257).save(path)  # full 16-bit range
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    image, _ = load_image(path, 256)
    assert image.mode == "RGB"
    assert mean_difference(image, cat().convert("L")) < 1


def test_greyscale_jpeg_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.jpg"
    cat().convert("L").save(path, quality=95)
    image, _ = load_image(path, 256)
    channels = np.asarray(image)
    assert image.mode == "RGB"
    assert (channels[..., 0] == channels[..., 1]).all() and (channels[..., 1] == channels[..., 2]).all()


def test_animated_gif_uses_the_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (300, 300), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 2
    image, size = load_image(path, 256)
    assert size == (300, 300)
    r, g, b = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    assert r > 150 and b < 50


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (300, 300), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0, 0, 0] * 254)  # 0: black (transparent), 1: red
    image.paste(1, (100, 100, 200, 200))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    loaded, _ = load_image(path, 256)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((10, 10)) == (255, 255, 255)  # transparent black shows as white
    assert loaded.getpixel((150, 150)) == (200, 0, 0)


def test_rgba_png_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    image.paste((0, 0, 200, 128), (100, 100, 200, 200))
    path = tmp_path / "alpha.png"
    image.save(path)
    loaded, _ = load_image(path, 256)
    assert loaded.getpixel((10, 10)) == (255, 255, 255)
    r, g, b = loaded.getpixel((150, 150))
    assert abs(r - 127) <= 1 and abs(b - 227) <= 1  # half-transparent blue over white


def test_heic_is_read_through_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    path = tmp_path / "cat.heic"
    pillow_heif.from_pillow(cat()).save(path, quality=90)
    image, size = load_image(path, 256)
    assert size == (400, 266)
    assert mean_difference(image, cat()) < 6


def test_heic_without_pillow_heif_gives_a_clear_error(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")  # needed to write the file
    path = tmp_path / "cat.heic"
    pillow_heif.from_pillow(cat()).save(path, quality=90)
    # A fresh interpreter in which pillow-heif cannot be imported.
    code = ("import sys; sys.modules['pillow_heif'] = None\n"
            "from tagger.preprocess import load_image, ImageError\n"
            "try:\n    load_image(sys.argv[1], 256)\nexcept ImageError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "HEIC/HEIF image, but pillow-heif is not installed (pip install phototag[heif])"


# --- bad input -------------------------------------------------------------------------------------


def expect_error(path: Path, message: str) -> None:
    before = path.read_bytes() if path.is_file() and os.access(path, os.R_OK) else None
    with pytest.raises(ImageError) as caught:
        load_image(path, 256)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    if before is not None:
        assert path.read_bytes() == before  # never touched


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    expect_error(path, "empty file (0 bytes)")


def test_truncated_jpeg(tmp_path):
    data = upscaled_cat(tmp_path, width=1200).read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "truncated JPEG file")


def test_truncated_progressive_jpeg(tmp_path):
    data = upscaled_cat(tmp_path, width=1200, progressive=True).read_bytes()
    path = tmp_path / "truncated-progressive.jpg"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "truncated JPEG file")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: milk, eggs\n")
    expect_error(path, "not an image (cannot identify format)")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_png_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(50000, 50000))
    expect_error(path, f"image too large: 2500000000 pixels (limit {max_pixels()})")


def test_pixel_limit_follows_pillows_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert max_pixels() == 20_000
    expect_error(CAT, "image too large: 106400 pixels (limit 20000)")


def test_directory(tmp_path):
    expect_error(tmp_path, "is a directory")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "gone.jpg", "file not found")


def without_file_access_override() -> list[str]:
    """A command prefix under which chmod 000 really makes a file unreadable.

    Root reads any file (CAP_DAC_OVERRIDE), so as root the child runs with that capability
    dropped; any other user needs no prefix.
    """
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is not installed")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(CAT.read_bytes())
    path.chmod(0)
    code = ("import sys\nfrom tagger.preprocess import load_image, ImageError\n"
            "try:\n    load_image(sys.argv[1], 256)\nexcept ImageError as e:\n    print(e)\n")
    out = subprocess.run([*without_file_access_override(), sys.executable, "-c", code, str(path)],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "permission denied", out.stderr
