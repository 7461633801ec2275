"""Keyword writing on real camera JPEGs, read back with exiftool and exiv2 as independent readers."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import piexif
import pytest
from PIL import Image

from storage.keywords import (
    KeywordWriteError,
    read_keywords,
    sidecar_path,
    write_keywords,
)

CAMERA = Path(__file__).parent / "fixtures" / "camera"
SAMPLES = sorted(p.name for p in CAMERA.glob("*.jpg"))
TAGS = [("animal", "cat"), ("animal", "猫"), ("place", "beach"), "Café"]
LEAVES = ["cat", "猫", "beach", "Café"]
LR = ["phototag|animal|cat", "phototag|animal|猫", "phototag|place|beach", "phototag|Café"]
DK = [v.replace("|", "/") for v in LR]
# The only exiftool tags a write may add or change.
OURS = {
    ("IFD0", "XPKeywords"),
    ("XMP-x", "XMPToolkit"),
    ("XMP-dc", "Subject"),
    ("XMP-lr", "HierarchicalSubject"),
    ("XMP-digiKam", "TagsList"),
    ("File", "FileSize"),
}

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="needs exiftool")


def exiftool_json(path: Path, *args: str) -> dict:
    out = subprocess.run(
        ["exiftool", "-j", "-charset", "utf8", *args, str(path)],
        capture_output=True,
        check=True,
    ).stdout
    found = json.loads(out)[0]
    del found["SourceFile"]
    return found


def keywords_seen(path: Path) -> dict:
    return exiftool_json(
        path,
        "-XMP-dc:Subject",
        "-XMP-lr:HierarchicalSubject",
        "-XMP-digiKam:TagsList",
        "-XPKeywords",
    )


def as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _run_exiftool(path: Path, *args: str) -> str:
    out = subprocess.run(["exiftool", *args, str(path)], capture_output=True, check=True).stdout
    return out.decode("utf-8", errors="replace")


_run_exiftool_cached = functools.cache(_run_exiftool)


def _exiftool_text(path: Path, *args: str) -> str:
    """exiftool's output; asked once per session for the fixtures, which never change."""
    return (_run_exiftool_cached if path.parent == CAMERA else _run_exiftool)(path, *args)


def all_tags(path: Path) -> dict[tuple[str, str], list[str]]:
    """``exiftool -a -G1 -s -n`` as {(group, tag): [values]}, filesystem facts left out."""
    out = _exiftool_text(path, "-a", "-G1", "-s", "-n")
    tags: dict[tuple[str, str], list[str]] = {}
    for line in out.splitlines():
        head, _, value = line.partition(": ")
        group, _, name = head.strip().partition("]")
        key = (group.strip("[ "), name.strip())
        if key[0] in ("System", "ExifTool"):
            continue
        tags.setdefault(key, []).append(value)
    return tags


def changed_tags(before: Path, after: Path) -> set[tuple[str, str]]:
    a, b = all_tags(before), all_tags(after)
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def warnings(path: Path) -> set[str]:
    out = _exiftool_text(path, "-validate", "-warning", "-a")
    return {line for line in out.splitlines() if line.startswith("Warning")}


def image_data(path: Path) -> bytes:
    """Bytes from the SOS marker on (the compressed image), found by walking the segments."""
    data = path.read_bytes()
    pos = 2
    while data[pos + 1] != 0xDA:
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return data[pos:]


def pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.tobytes()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".phototag-tmp")]


@pytest.fixture
def photo(tmp_path, request) -> Path:
    name = getattr(request, "param", "r_sony.jpg")
    dest = tmp_path / "album" / name
    dest.parent.mkdir()
    shutil.copy2(CAMERA / name, dest)
    return dest


@pytest.mark.parametrize("photo", SAMPLES, indirect=True)
def test_embedded_write_changes_only_keywords(photo):
    original = CAMERA / photo.name
    st = photo.stat()
    os.chmod(photo, 0o640)
    os.utime(photo, ns=(st.st_atime_ns, 1_600_000_000_123_456_789))
    st = photo.stat()

    result = write_keywords(
        photo, TAGS, mode="embedded", expect_size=st.st_size, expect_mtime_ns=st.st_mtime_ns
    )

    seen = keywords_seen(photo)
    assert as_list(seen["Subject"]) == LEAVES
    assert as_list(seen["HierarchicalSubject"]) == LR
    assert as_list(seen["TagsList"]) == DK
    assert seen["XPKeywords"] == ";".join(LEAVES)
    assert result.mode == "embedded" and result.xpkeywords and result.keywords == LEAVES
    assert result.size == photo.stat().st_size != original.stat().st_size
    assert changed_tags(original, photo) <= OURS
    assert warnings(photo) <= warnings(original)
    assert image_data(photo) == image_data(original)
    assert pixels(photo) == pixels(original)
    after = photo.stat()
    assert after.st_mtime_ns == st.st_mtime_ns == result.mtime_ns
    assert after.st_mode == st.st_mode
    assert leftovers(photo.parent) == []
    assert not sidecar_path(photo).exists()


# Both byte orders and the MakerNote-heavy files; the layout exiftool leaves is the same for all.
@pytest.mark.parametrize("photo", ["r_casio.jpg", "r_olympus.jpg", "r_sony.jpg"], indirect=True)
def test_retag_replaces_only_phototag_keywords(photo):
    # The user's own keywords, set with exiftool (which rewrites EXIF in its own layout).
    subprocess.run(
        [
            "exiftool", "-q", "-overwrite_original", "-charset", "utf8",
            "-XMP-dc:Subject=Anna", "-XMP-dc:Subject=cat",
            "-XMP-lr:HierarchicalSubject=People|Anna",
            "-XMP-dc:Description=Summer at grandma's",
            "-XPKeywords=Holiday",
            str(photo),
        ],
        check=True,
    )
    reference = photo.with_name("reference.jpg")
    shutil.copy2(photo, reference)

    first = write_keywords(photo, TAGS, mode="embedded")
    assert first.keywords == ["猫", "beach", "Café"]  # "cat" was the user's already
    seen = keywords_seen(photo)
    assert as_list(seen["Subject"]) == ["Anna", "cat", "猫", "beach", "Café"]
    assert as_list(seen["HierarchicalSubject"]) == ["People|Anna", *LR]
    assert seen["XPKeywords"] == "Anna;cat;猫;beach;Café;Holiday"

    second = write_keywords(photo, [("animal", "dog")], mode="embedded", previous=first.keywords)
    assert second.keywords == ["dog"]
    seen = keywords_seen(photo)
    assert as_list(seen["Subject"]) == ["Anna", "cat", "dog"]
    assert as_list(seen["HierarchicalSubject"]) == ["People|Anna", "phototag|animal|dog"]
    assert as_list(seen["TagsList"]) == ["phototag/animal/dog"]
    assert seen["XPKeywords"] == "Anna;cat;dog;Holiday"
    assert changed_tags(reference, photo) <= OURS
    assert exiftool_json(photo, "-XMP-dc:Description")["Description"] == "Summer at grandma's"
    assert image_data(photo) == image_data(reference)

    # Writing the same again does not grow the file: the previous IFD0 copy is reclaimed.
    third = write_keywords(photo, [("animal", "dog")], mode="embedded", previous=second.keywords)
    assert third.size == second.size


def test_removing_all_our_tags_leaves_the_users(photo):
    first = write_keywords(photo, TAGS, mode="embedded")
    write_keywords(photo, [], mode="embedded", previous=first.keywords)
    seen = keywords_seen(photo)
    assert "Subject" not in seen and "HierarchicalSubject" not in seen
    assert "XPKeywords" not in seen
    assert changed_tags(CAMERA / photo.name, photo) <= OURS


@pytest.mark.parametrize("naming", ["append", "replace"])
def test_sidecar_created_and_readable(photo, naming):
    before = photo.read_bytes()
    result = write_keywords(photo, TAGS, mode="sidecar", sidecar_name=naming)

    expected_name = "r_sony.jpg.xmp" if naming == "append" else "r_sony.xmp"
    assert result.target == photo.parent / expected_name
    assert result.mode == "sidecar" and result.keywords == LEAVES
    assert photo.read_bytes() == before
    seen = keywords_seen(result.target)
    assert as_list(seen["Subject"]) == LEAVES
    assert as_list(seen["HierarchicalSubject"]) == LR
    assert as_list(seen["TagsList"]) == DK
    exiv2 = subprocess.run(
        ["exiv2", "-px", str(result.target)], capture_output=True, check=True
    )
    assert exiv2.stderr == b""
    out = exiv2.stdout.decode()
    assert "Xmp.dc.subject" in out and "猫" in out and "phototag|animal|cat" in out
    assert warnings(result.target) == set()
    assert leftovers(photo.parent) == []


USER_SIDECAR = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
    xmp:Rating="4"
    darktable:xmp_version="5">
   <dc:subject><rdf:Bag><rdf:li>Anna</rdf:li><rdf:li>{old}</rdf:li></rdf:Bag></dc:subject>
   <dc:title><rdf:Alt><rdf:li xml:lang="x-default">Beach day</rdf:li></rdf:Alt></dc:title>
   <lr:hierarchicalSubject><rdf:Bag><rdf:li>People|Anna</rdf:li>
     <rdf:li>phototag|animal|{old}</rdf:li></rdf:Bag></lr:hierarchicalSubject>
   <darktable:history><rdf:Seq><rdf:li darktable:operation="exposure"
     darktable:enabled="1"/></rdf:Seq></darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""


def test_existing_sidecar_is_merged(photo):
    side = sidecar_path(photo)
    side.write_text(USER_SIDECAR.format(old="horse"), encoding="utf-8")
    reference = photo.parent / "reference.xmp"
    reference.write_text(USER_SIDECAR.format(old="horse"), encoding="utf-8")

    result = write_keywords(photo, TAGS, mode="sidecar", previous=["horse"])

    seen = keywords_seen(side)
    assert as_list(seen["Subject"]) == ["Anna", *LEAVES]
    assert as_list(seen["HierarchicalSubject"]) == ["People|Anna", *LR]
    assert result.keywords == LEAVES
    theirs = ("-XMP-xmp:Rating", "-XMP-dc:Title", "-XMP-darktable:all")
    assert exiftool_json(side, *theirs) == exiftool_json(reference, *theirs)
    assert exiftool_json(side, "-XMP-dc:Title")["Title"] == "Beach day"
    text = side.read_text(encoding="utf-8")
    assert 'xmlns:darktable="http://darktable.sf.net/"' in text  # its own prefix kept
    assert 'darktable:operation="exposure"' in text


def test_read_keywords_finds_users_keywords(photo):
    subprocess.run(
        [
            "exiftool", "-q", "-overwrite_original", "-charset", "utf8",
            "-XMP-dc:Subject=Oma", "-XPKeywords=Urlaub;海滩", str(photo),
        ],
        check=True,
    )
    sidecar_path(photo, "replace").write_text(USER_SIDECAR.format(old="horse"), encoding="utf-8")
    users = {"Anna", "horse", "Oma", "Urlaub", "海滩"}
    found = read_keywords(photo)
    assert sorted(found) == sorted(users)  # each once, though XPKeywords repeats dc:subject
    ours = write_keywords(photo, ["cat"], mode="embedded").keywords
    assert set(read_keywords(photo, exclude=ours)) == users
    assert "cat" in read_keywords(photo)


def test_keywords_behind_a_header_longer_than_the_first_read(tmp_path):
    """Embedded keywords are read from the JPEG's header only; a header longer than the first
    read (here a 65 KB comment before the XMP packet) is read on until the image data."""
    from storage.keywords import jpeg

    photo = tmp_path / "big-header.jpg"
    shutil.copy(CAMERA / SAMPLES[0], photo)
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Subject=Oma", str(photo)],
                   check=True)
    parts = jpeg.split(photo.read_bytes())
    comment = jpeg.make_segment(0xFE, b"x" * 65_000)
    photo.write_bytes(jpeg.SOI + comment.raw + b"".join(s.raw for s in parts.segments) + parts.image)
    with open(photo, "rb") as f:  # the keyword sits beyond the first 64 KiB
        assert b"Oma" not in f.read(64 * 1024)
    assert as_list(exiftool_json(photo, "-XMP-dc:Subject").get("Subject")) == ["Oma"]
    assert read_keywords(photo) == ["Oma"]


def test_non_jpeg_in_embedded_mode_gets_a_sidecar(tmp_path):
    png = tmp_path / "scan.png"
    Image.new("RGB", (8, 8), "red").save(png)
    before = png.read_bytes()
    result = write_keywords(png, TAGS, mode="embedded")
    assert result.mode == "sidecar" and result.target == tmp_path / "scan.png.xmp"
    assert "not a JPEG" in result.notes[0]
    assert png.read_bytes() == before
    assert as_list(keywords_seen(result.target)["Subject"]) == LEAVES


def test_unicode_paths_and_tags(tmp_path):
    folder = tmp_path / "照片 2024"
    folder.mkdir()
    photo = folder / "猫 ü.jpg"
    shutil.copy2(CAMERA / "r_canon.jpg", photo)
    tags = [("动物", "猫"), ("Ελλάδα",), ("emoji", "🐈")]
    write_keywords(photo, tags, mode="embedded")
    write_keywords(photo, tags, mode="sidecar")
    for path in (photo, sidecar_path(photo)):
        seen = keywords_seen(path)
        assert as_list(seen["Subject"]) == ["猫", "Ελλάδα", "🐈"]
        assert as_list(seen["HierarchicalSubject"]) == [
            "phototag|动物|猫", "phototag|Ελλάδα", "phototag|emoji|🐈"
        ]
    # exiftool 12.x reads XPKeywords as UCS-2 (shows "??" for the emoji's surrogate pair);
    # the raw bytes are proper UTF-16LE as Windows expects.
    assert keywords_seen(photo)["XPKeywords"].startswith("猫;Ελλάδα;")
    raw = piexif.load(str(photo))["0th"][0x9C9E]
    assert bytes(raw) == "猫;Ελλάδα;🐈".encode("utf-16-le") + b"\0\0"


@pytest.mark.parametrize("bad", ["a|b", "a/b", "a;b", "", "tab\there"])
def test_bad_tag_is_refused(photo, bad):
    before = photo.read_bytes()
    with pytest.raises(KeywordWriteError, match=r"r_sony\.jpg: bad tag"):
        write_keywords(photo, [("animal", bad)], mode="embedded")
    assert photo.read_bytes() == before


def test_jfif_jpeg_without_exif_keeps_app0_and_skips_xpkeywords(tmp_path):
    photo = tmp_path / "pillow.jpg"
    Image.new("RGB", (32, 24), (10, 200, 30)).save(photo, quality=90)  # JFIF APP0, no EXIF
    reference = tmp_path / "reference.jpg"
    shutil.copy2(photo, reference)
    result = write_keywords(photo, TAGS, mode="embedded")
    assert not result.xpkeywords
    assert result.notes == ["XPKeywords skipped: the JPEG has no EXIF block"]
    assert as_list(keywords_seen(photo)["Subject"]) == LEAVES
    data = photo.read_bytes()
    assert data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\x00"  # APP0 stays first
    assert changed_tags(reference, photo) <= OURS
    assert warnings(photo) <= warnings(reference)
    assert pixels(photo) == pixels(reference)


def test_pillow_jpeg_with_jfif_and_exif(tmp_path):
    photo = tmp_path / "both.jpg"
    exif = Image.Exif()
    exif[0x010F] = "TestMake"  # Make
    exif[0x0112] = 6  # Orientation
    Image.new("RGB", (32, 24), "blue").save(photo, exif=exif.tobytes())
    reference = tmp_path / "reference.jpg"
    shutil.copy2(photo, reference)
    result = write_keywords(photo, TAGS, mode="embedded")
    assert result.xpkeywords
    assert keywords_seen(photo)["XPKeywords"] == ";".join(LEAVES)
    assert changed_tags(reference, photo) <= OURS
    assert warnings(photo) <= warnings(reference)
    assert photo.read_bytes()[6:11] == b"JFIF\x00"


def test_keywords_package_does_not_import_torch():
    code = "import sys, storage.keywords; sys.exit('torch' in sys.modules or 'tagger' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_photos_of_a_sidecar_by_either_naming(tmp_path):
    from storage.keywords import photos_of_sidecar

    for name in ("IMG_1.JPG", "IMG_1.cr2", "IMG_1.jpg.txt", "IMG_2.jpg", "IMG_10.jpg"):
        (tmp_path / name).write_bytes(b"x")
    extensions = {".jpg", ".cr2"}
    # Lightroom naming: every photo with that stem (a RAW+JPEG pair shares one sidecar)
    assert photos_of_sidecar(tmp_path / "IMG_1.xmp", extensions) == [
        tmp_path / "IMG_1.JPG", tmp_path / "IMG_1.cr2"]
    # digiKam naming: exactly the photo named in it, if it exists
    assert photos_of_sidecar(tmp_path / "IMG_2.jpg.xmp", extensions) == [tmp_path / "IMG_2.jpg"]
    assert photos_of_sidecar(tmp_path / "IMG_3.jpg.xmp", extensions) == []
    assert photos_of_sidecar(tmp_path / "gone" / "IMG_1.xmp", extensions) == []
