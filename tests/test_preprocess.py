"""tagger.preprocess on real files: fast decode, conversions to RGB, bad input, and equivalence with
torchvision's reference transforms."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, PngImagePlugin

import tagger.preprocess
from tagger.backbones import get_backbone
from tagger.preprocess import (
    ImageError,
    load_image,
    max_pixels,
    preprocess,
    reference_load,
    reference_transform,
    resize_crop,
    to_uint8_array,
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


# --- large images that cannot be decoded at a reduced size (PNG, TIFF, WebP, HEIC) ----------------


def detailed(width: int, height: int) -> Image.Image:
    """The cat enlarged, plus seeded pixel noise: fine detail, so that any shift in sampling shows."""
    base = np.asarray(cat().resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    noise = np.random.default_rng(0).integers(-40, 41, size=(height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def large_png(folder: Path, mode: str, width: int = 3001, height: int = 2001, **save) -> Path:
    """A ``mode`` PNG of the detailed cat: RGBA with an alpha gradient, 16-bit grey, or a palette
    whose colour 0 is transparent."""
    rgb = detailed(width, height)
    if mode == "RGBA":
        image = rgb.copy()
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        image = rgb.quantize(64)
        save["transparency"] = 0
    else:
        image = rgb.convert(mode)
    path = folder / f"large-{mode.replace(';', '')}-{width}x{height}.png"
    image.save(path, compress_level=1, **save)
    with Image.open(path) as im:
        assert im.mode == mode and im.size == (width, height)
    return path


def eight_bit_difference(image: Image.Image, path: Path, backbone) -> np.ndarray:
    """|our 224x224 crop of ``image`` - that of the naive full-size decode of ``path``|, 8-bit levels."""
    fast = to_uint8_array(resize_crop(image, backbone)).astype(np.int16)
    full = to_uint8_array(resize_crop(reference_load(path), backbone)).astype(np.int16)
    return np.abs(fast - full)


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "P", "RGB"])
def test_large_png_is_reduced_to_the_resize_size_with_the_full_size_result(tmp_path, resnet, mode):
    path = large_png(tmp_path, mode)
    image, size = load_image(path, resnet.resize)
    assert size == (3001, 2001)
    assert image.mode == "RGB"
    # What torchvision's Resize(256) makes of 3001x2001 (box-reduced by 2 first, to 1501x1001 whose
    # last column and row are half boxes: the final resize must map that extent exactly).
    assert image.size == (383, 256)
    difference = eight_bit_difference(image, path, resnet)
    assert difference.mean() < 0.45  # resizing the full image gives (almost) the same pixels
    assert difference.max() <= 3
    # and torchvision's own pipeline on the full-size decode agrees within a few levels
    reference = reference_transform(resnet)(reference_load(path))
    level = 1 / 255 / min(resnet.std)
    assert (preprocess(image, resnet) - reference).abs().mean().item() < 0.6 * level


def test_reduction_keeps_the_backbones_interpolation(tmp_path):
    bicubic = get_backbone("efficientnet_b0")
    assert bicubic.interpolation == "bicubic"
    path = large_png(tmp_path, "RGB")
    right, _ = load_image(path, bicubic.resize, bicubic.interpolation)
    wrong, _ = load_image(path, bicubic.resize)  # bilinear
    right_difference = eight_bit_difference(right, path, bicubic).mean()
    assert right_difference < 0.45
    assert eight_bit_difference(wrong, path, bicubic).mean() > 2 * right_difference  # it tells


def test_a_png_below_the_reduction_threshold_is_decoded_as_before(tmp_path, resnet):
    # Resize(256) makes 1500x1200 320x256: less than twice 3x that on either side, so no reduction;
    # at 1.8 MP it is still converted band by band, with exactly the pixels of the whole conversion.
    path = large_png(tmp_path, "RGBA", width=1500, height=1200)
    image, size = load_image(path, resnet.resize)
    assert image.size == size == (1500, 1200)
    assert np.array_equal(np.asarray(image), np.asarray(reference_load(path)))


def test_large_png_with_exif_rotation_is_reduced_and_upright(tmp_path, resnet):
    upright = large_png(tmp_path, "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned left; viewers turn it right
    with Image.open(upright) as im:
        path = tmp_path / "large-rotated.png"
        im.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, compress_level=1)
    out = subprocess.run(["exiftool", "-s3", "-Orientation#", "-ImageWidth", str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["6", "2001"]
    image, size = load_image(path, resnet.resize)
    assert size == (3001, 2001)
    assert image.size == (383, 256)
    assert eight_bit_difference(image, upright, resnet).mean() < 0.45


def test_large_decodes_run_one_at_a_time(tmp_path, monkeypatch):
    """Decode threads must not hold several full-size decodes at once (a NAS has 2-4 GB)."""
    first = large_png(tmp_path, "RGBA", width=1800, height=1600)
    paths = [first] + [tmp_path / f"copy-{i}.png" for i in range(5)]
    for copy in paths[1:]:
        copy.write_bytes(first.read_bytes())
    monkeypatch.setattr(tagger.preprocess, "LARGE_DECODE_PIXELS", 2_000_000)  # these are 2.9 MP
    inside, most, lock = 0, 0, threading.Lock()
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            return real_load(self)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    with ThreadPoolExecutor(3) as pool:
        sizes = [image.size for image, _ in pool.map(lambda p: load_image(p, 256), paths)]
    assert most == 1
    assert len(sizes) == 6


ADDRESS_SPACE_PROBE = """
import resource, sys
from tagger.preprocess import load_image

def address_space() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

budget = address_space() + int(sys.argv[2]) * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
try:
    image, size = load_image(sys.argv[1], 256)
    print("decoded", size, "to", image.size)
except MemoryError:
    print("out of memory")
"""


@pytest.mark.parametrize("mode", ["RGBA", "I;16"])
def test_a_large_png_decodes_in_little_more_memory_than_its_pixels(tmp_path, mode):
    """A 24 MP PNG (96 MB as RGBA) with the address space capped at 240 MB more than after import.

    Converting the whole image (alpha composite, 16 bits through int64) took over 400 MB here; a
    169 MP PNG took 4 GB in ``phototag classify``. Converted band by band, this one needs ~120 MB.
    """
    width, height = 6000, 4000
    rgb = cat().resize((width, height), Image.Resampling.BILINEAR)
    if mode == "RGBA":
        image = rgb.copy()
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    else:
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    path = tmp_path / "large.png"
    image.save(path, compress_level=1)
    del rgb, image
    out = subprocess.run([sys.executable, "-c", ADDRESS_SPACE_PROBE, str(path), "240"],
                         capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "decoded (6000, 4000) to (384, 256)", out.stderr


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


def png_with_text(path: Path, text_bytes: int) -> Path:
    """The cat as a PNG with a compressed text chunk (zTXt) of ``text_bytes`` bytes."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * text_bytes, zip=True)
    cat().save(path, pnginfo=info)
    return path


def test_png_with_a_large_text_chunk_or_icc_profile_is_decoded(tmp_path):
    """Pillow's own guard refuses over 1 MB; a big XMP packet or ICC profile can exceed that."""
    text = png_with_text(tmp_path / "text.png", 3 * 1024 * 1024)
    icc = tmp_path / "icc.png"
    cat().save(icc, icc_profile=b"\0" * (3 * 1024 * 1024))  # not a valid profile: it is ignored
    for path in (text, icc):
        chunks = subprocess.run(["exiftool", "-s", "-G1", "-Comment", "-ICC_Profile", "-b", str(path)],
                                capture_output=True, check=True).stdout
        assert len(chunks) >= 3 * 1024 * 1024  # exiftool, independently, sees the 3 MB chunk
        image, size = load_image(path, 256)
        assert size == (400, 266)
        assert mean_difference(image, cat()) == 0


def test_png_text_chunk_bomb_is_refused_in_plain_words(tmp_path):
    path = png_with_text(tmp_path / "text-bomb.png", 40 * 1024 * 1024)
    assert path.stat().st_size < 200_000  # 40 MB of text, compressed
    expect_error(path, "PNG text or ICC profile chunk larger than 16 MB when decompressed")


def test_pixel_limit_follows_pillows_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert max_pixels() == 20_000
    expect_error(CAT, "image too large: 106400 pixels (limit 20000)")


def test_directory(tmp_path):
    expect_error(tmp_path, "is a directory")


def test_fifo_and_device_are_not_regular_files(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    expect_error(fifo, "not a regular file")  # at once: no open() waiting for a writer
    device = tmp_path / "zero.jpg"
    device.symlink_to("/dev/zero")
    expect_error(device, "not a regular file")


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
