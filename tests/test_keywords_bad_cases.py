"""Keyword writes that must fail cleanly: one-line error, original byte-identical, no temp file."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from storage.keywords import (
    KeywordWriteError,
    exif,
    jpeg,
    read_keywords,
    sidecar_path,
    write_keywords,
)
from test_keywords import CAMERA, as_list, exiftool_json, keywords_seen, leftovers

TAGS = [("animal", "cat"), ("animal", "猫")]


@pytest.fixture
def photo(tmp_path) -> Path:
    dest = tmp_path / "album" / "r_pana.jpg"
    dest.parent.mkdir()
    shutil.copy2(CAMERA / "r_pana.jpg", dest)
    return dest


def assert_refused(photo: Path, match: str, **kwargs) -> KeywordWriteError:
    before = photo.read_bytes() if photo.exists() else None
    with pytest.raises(KeywordWriteError, match=match) as info:
        write_keywords(photo, TAGS, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(info.value.path) + ": ")
    if before is not None:
        assert photo.read_bytes() == before
    assert leftovers(photo.parent) == []
    return info.value


def test_read_only_photo(photo):
    os.chmod(photo, 0o444)
    assert_refused(photo, r"r_pana\.jpg: photo is read-only", mode="embedded")


@pytest.mark.parametrize("mode", ["embedded", "sidecar"])
def test_read_only_folder(photo, mode):
    os.chmod(photo.parent, 0o555)
    try:
        assert_refused(photo, "folder is read-only", mode=mode)
        assert not sidecar_path(photo).exists()
    finally:
        os.chmod(photo.parent, 0o755)


def test_read_only_sidecar(photo):
    side = sidecar_path(photo)
    side.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>'
    )
    os.chmod(side, 0o444)
    before = side.read_bytes()
    assert_refused(photo, r"r_pana\.jpg\.xmp: sidecar is read-only", mode="sidecar")
    assert side.read_bytes() == before


@pytest.mark.parametrize("mode", ["embedded", "sidecar"])
def test_photo_deleted_since_tagging(photo, mode):
    photo.unlink()
    assert_refused(photo, "photo no longer exists", mode=mode)
    assert not sidecar_path(photo).exists()


@pytest.mark.parametrize("mode", ["embedded", "sidecar"])
def test_photo_replaced_since_tagging(photo, mode):
    st = photo.stat()
    shutil.copyfile(CAMERA / "r_sony.jpg", photo)  # another photo under the same name
    assert_refused(
        photo,
        "changed since it was tagged",
        mode=mode,
        expect_size=st.st_size,
        expect_mtime_ns=st.st_mtime_ns,
    )
    assert photo.read_bytes() == (CAMERA / "r_sony.jpg").read_bytes()
    assert not sidecar_path(photo).exists()


def test_photo_edited_same_size_since_tagging(photo):
    st = photo.stat()
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert_refused(
        photo, "changed since it was tagged", mode="embedded",
        expect_size=st.st_size, expect_mtime_ns=st.st_mtime_ns,
    )


@pytest.mark.parametrize("mode", ["embedded", "sidecar"])
def test_photo_changed_while_writing(photo, monkeypatch, mode):
    """Another program rewrites the photo after we read it, before our rename."""
    other = (CAMERA / "r_sony.jpg").read_bytes()
    real_fsync = os.fsync

    def fsync_and_meanwhile_edit(fd):
        real_fsync(fd)
        photo.write_bytes(other)

    monkeypatch.setattr(os, "fsync", fsync_and_meanwhile_edit)
    with pytest.raises(KeywordWriteError, match="photo changed while writing"):
        write_keywords(photo, TAGS, mode=mode)
    assert photo.read_bytes() == other
    assert leftovers(photo.parent) == []
    assert not sidecar_path(photo).exists()


CORRUPT_SIDECARS = {
    "truncated": b'<?xpacket begin=""?><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF',
    "not_xmp": b"<html><body>hello</body></html>",
    "binary": bytes(range(256)),
    "entity_bomb": (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&b;</x:xmpmeta>'
    ),
    "subject_not_a_list": (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject>cat, dog</dc:subject>'
        b"</rdf:Description></rdf:RDF></x:xmpmeta>"
    ),
}


@pytest.mark.parametrize("content", CORRUPT_SIDECARS.values(), ids=CORRUPT_SIDECARS.keys())
def test_corrupt_sidecar_is_left_untouched(photo, content):
    side = sidecar_path(photo)
    side.write_bytes(content)
    err = assert_refused(photo, r"r_pana\.jpg\.xmp: existing sidecar", mode="sidecar")
    assert err.path == side
    assert side.read_bytes() == content
    assert read_keywords(photo) == []  # indexing skips it (logged), does not crash


def insert_xmp(photo: Path, packet: bytes) -> None:
    """Put a standard XMP APP1 segment right after the EXIF APP1 (built by hand, not by us)."""
    data = photo.read_bytes()
    exif_len = struct.unpack(">H", data[4:6])[0]
    assert data[2:4] == b"\xff\xe1"
    payload = b"http://ns.adobe.com/xap/1.0/\x00" + packet
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    at = 4 + exif_len
    photo.write_bytes(data[:at] + segment + data[at:])


def big_packet(description_chars: int) -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
        '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
        + "x" * description_chars
        + "</rdf:li></rdf:Alt></dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def test_huge_xmp_packet_that_still_fits(photo):
    insert_xmp(photo, big_packet(63_000))
    result = write_keywords(photo, TAGS, mode="embedded")
    assert as_list(keywords_seen(photo)["Subject"]) == ["cat", "猫"]
    assert exiftool_json(photo, "-XMP-dc:Description")["Description"] == "x" * 63_000
    assert result.size < (CAMERA / "r_pana.jpg").stat().st_size + 63_000 + 2_000  # no padding


def test_huge_xmp_packet_that_would_overflow(photo):
    insert_xmp(photo, big_packet(64_800))
    assert_refused(photo, r"XMP packet would be \d+ bytes, over the 65504-byte limit", mode="embedded")


def test_corrupt_embedded_xmp(photo):
    insert_xmp(photo, b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF")
    assert_refused(photo, "embedded XMP is not valid", mode="embedded")


def test_truncated_jpeg(photo):
    photo.write_bytes(photo.read_bytes()[:3000])
    assert_refused(photo, "runs past the end of file", mode="embedded")


def enospc_after(limit: int):
    """An os.write that writes at most ``limit`` bytes in all, then fails: a disk filling up."""
    real_write, written = os.write, [0]

    def write(fd, data):
        room = limit - written[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[:room]))
        written[0] += n
        return n

    return write


@pytest.mark.parametrize("mode", ["embedded", "sidecar"])
def test_disk_full_mid_write(photo, monkeypatch, mode):
    side = sidecar_path(photo)
    side.write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>'
    )
    side_before = side.read_bytes()
    monkeypatch.setattr(os, "write", enospc_after(500))
    assert_refused(photo, "No space left on device", mode=mode)
    assert side.read_bytes() == side_before


def test_disk_full_at_fsync(photo, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    assert_refused(photo, "No space left on device", mode="embedded")


def test_symlink_is_not_replaced(photo):
    link = photo.with_name("link.jpg")
    link.symlink_to(photo.name)
    assert_refused(link, "symbolic link", mode="embedded")
    assert link.is_symlink()


def test_hard_linked_photo(photo):
    os.link(photo, photo.with_name("other.jpg"))
    assert_refused(photo, "has 2 hard links", mode="embedded")


# --- files that would hang or swallow the process: FIFOs, endless or huge files, EXIF bombs ---
#
# Each read or write runs in a child Python limited to 1 GB of address space and a minute,
# so that a regression (an open() that waits on a FIFO, a read of /dev/zero, piexif allocating
# what an EXIF count claims) fails the test instead of hanging the suite or eating the memory.

ISOLATED = """
import json, logging, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
from storage.keywords import KeywordWriteError, read_keywords, write_keywords
action, path = sys.argv[1], sys.argv[2]
if action == "read":
    unread = []
    keywords = read_keywords(path, unread_sidecars=unread)
    out = {"keywords": keywords, "unread": [str(p) for p in unread]}
else:
    try:
        done = write_keywords(path, ["cat", "dog"], mode=action)
        out = {"written": str(done.target), "notes": done.notes}
    except KeywordWriteError as exc:
        out = {"refused": str(exc)}
print(json.dumps(out))
"""


def isolated(action: str, photo: Path) -> tuple[dict, list[str]]:
    """``read_keywords`` (action "read") or ``write_keywords`` in mode ``action``, in a child
    process: (its result, the lines it logged)."""
    proc = subprocess.run(
        [sys.executable, "-c", ISOLATED, action, str(photo)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr.splitlines()


USER_SIDECAR_BEACH = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag><rdf:li>beach</rdf:li>'
    "</rdf:Bag></dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>"
)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def endless(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def huge(path: Path) -> Path:
    """A sparse 3 GB sidecar whose first bytes are valid XMP (the rest NULs, which the XMP
    parser would strip): taken whole, it would import ``beach``."""
    path.write_text(USER_SIDECAR_BEACH)
    os.truncate(path, 3 * 2**30)
    return path


BAD_SIDECARS = {
    "fifo": (fifo, "not a regular file"),
    "link_to_dev_zero": (endless, "not a regular file"),
    "sparse_3_GB": (huge, "larger than 16 MiB, the limit for a sidecar"),
}


@pytest.mark.parametrize("kind", BAD_SIDECARS)
def test_bad_sidecar_is_skipped_when_reading(photo, kind):
    make, reason = BAD_SIDECARS[kind]
    bad = make(sidecar_path(photo, "append"))
    sidecar_path(photo, "replace").write_text(USER_SIDECAR_BEACH.replace("beach", "dune"))
    result, logged = isolated("read", photo)
    assert result == {"keywords": ["dune"], "unread": [str(bad)]}  # the good sidecar still read
    assert logged == [f"{bad}: sidecar keywords not read ({reason})"]


@pytest.mark.parametrize("kind", BAD_SIDECARS)
def test_bad_sidecar_is_refused_when_writing(photo, kind):
    make, reason = BAD_SIDECARS[kind]
    bad = make(sidecar_path(photo))
    before = os.lstat(bad)
    photo_before = photo.read_bytes()
    result, logged = isolated("sidecar", photo)
    assert result == {"refused": f"{bad}: existing sidecar not read ({reason}); left untouched"}
    after = os.lstat(bad)
    assert (after.st_ino, after.st_mode, after.st_size) == (before.st_ino, before.st_mode,
                                                            before.st_size)
    assert photo.read_bytes() == photo_before
    assert leftovers(photo.parent) == []


def test_jpeg_header_of_a_fifo_is_not_read(tmp_path):
    """A photo swapped for a FIFO after the scan saw a file: refused, not waited on."""
    code = ("import sys\nfrom storage.keywords import jpeg\n"
            "try:\n    jpeg.read_header(sys.argv[1])\n"
            "except OSError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(fifo(tmp_path / "p.jpg"))],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "not a regular file\n", "")


def test_keywords_of_a_photo_swapped_for_a_fifo_are_not_waited_for(tmp_path):
    """Reading a photo's keywords, or writing them in, on a FIFO: refused at once."""
    code = ("import sys\nfrom storage.keywords import read_keywords, write_keywords\n"
            "from storage.keywords.result import KeywordWriteError\n"
            "print(read_keywords(sys.argv[1]))\n"
            "try:\n    write_keywords(sys.argv[1], ['cat'], mode='embedded')\n"
            "except KeywordWriteError as exc:\n    print(exc)\n")
    path = fifo(tmp_path / "p.jpg")
    proc = subprocess.run([sys.executable, "-c", code, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "[]"
    assert "not a regular file" in proc.stdout.splitlines()[1]


def test_damaged_jpeg_header_is_not_read_to_the_end(photo):
    """A marker missing in the header: refused where it is found, not after reading the rest of
    a (here 3 GB, sparse) file in search of more header."""
    data = bytearray(photo.read_bytes()[:70_000])
    data[2] = 0x00  # the EXIF APP1 marker's 0xFF
    photo.write_bytes(bytes(data))
    os.truncate(photo, 3 * 2**30)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from storage.keywords import jpeg\n"
            "try:\n    jpeg.read_header(sys.argv[1])\n"
            "except jpeg.JpegError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(photo)],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, "no marker at byte 2 (corrupt header)\n", "")


# EXIF blocks that piexif must never see: a count claiming more values than the block holds
# makes it allocate count x size (30 s and 4 GB for one 0x7fffffff count).


def exif_entry(photo: Path, ifd: str, tag: int) -> tuple[int, str]:
    """File offset of the 12-byte entry ``tag`` in IFD0 or the Exif IFD of the photo's EXIF
    APP1 (which the camera samples have right after SOI), and the TIFF byte order."""
    data = photo.read_bytes()
    assert data[2:4] == b"\xff\xe1" and data[6:12] == b"Exif\x00\x00"
    tiff = 12
    e = "<" if data[tiff : tiff + 2] == b"II" else ">"

    def entries(at: int):
        (n,) = struct.unpack_from(e + "H", data, tiff + at)
        for i in range(n):
            pos = tiff + at + 2 + 12 * i
            yield pos, struct.unpack_from(e + "HHII", data, pos)

    (ifd0,) = struct.unpack_from(e + "I", data, tiff + 4)
    where = ifd0
    if ifd == "Exif":
        where = next(v for _, (t, _, _, v) in entries(ifd0) if t == 0x8769)
    return next(pos for pos, (t, *_rest) in entries(where) if t == tag), e


def set_entry(photo: Path, ifd: str, tag: int, **fields: int) -> None:
    pos, e = exif_entry(photo, ifd, tag)
    data = bytearray(photo.read_bytes())
    old = dict(zip(("tag", "type", "count", "value"), struct.unpack_from(e + "HHII", data, pos)))
    struct.pack_into(e + "HHII", data, pos, *{**old, **fields}.values())
    photo.write_bytes(bytes(data))


TIFF_LEN_PANA = 29174  # r_pana.jpg's EXIF block minus "Exif\0\0"
DAMAGED_EXIF = {
    # Orientation (SHORT, 1 value) claiming 2**31 - 1 values: the bomb the hunt found.
    "count_bomb_IFD0": (
        ("0th", 0x0112, {"count": 0x7FFFFFFF}),
        r"EXIF IFD0 tag 0x0112 claims 2147483647 values \(4294967294 bytes\) at byte \d+, past "
        rf"the end of the {TIFF_LEN_PANA}-byte block",
    ),
    # The same in the Exif sub-IFD (ExposureProgram).
    "count_bomb_Exif_IFD": (
        ("Exif", 0x8822, {"count": 0x7FFFFFFF}),
        r"EXIF Exif IFD tag 0x8822 claims 2147483647 values \(4294967294 bytes\) at byte \d+, "
        rf"past the end of the {TIFF_LEN_PANA}-byte block",
    ),
    # PrintIM made to cover the whole block: inside it, but overlapping every other value.
    "values_overlap": (
        ("0th", 0xC4A5, {"count": TIFF_LEN_PANA - 8, "value": 8}),
        rf"EXIF values add up to \d+ bytes, more than the {TIFF_LEN_PANA}-byte block",
    ),
}


@pytest.mark.parametrize("damage", DAMAGED_EXIF.values(), ids=DAMAGED_EXIF.keys())
def test_damaged_exif_is_refused_when_writing(photo, damage):
    (ifd, tag, fields), reason = damage
    set_entry(photo, ifd, tag, **fields)
    before = photo.read_bytes()
    result, _logged = isolated("embedded", photo)
    assert re.fullmatch(rf"{re.escape(str(photo))}: {reason}; not written", result["refused"])
    assert photo.read_bytes() == before
    assert leftovers(photo.parent) == []


def test_exif_count_bomb_is_skipped_when_reading(photo):
    """The XMP keywords are still read; the EXIF block is skipped with its reason."""
    insert_xmp(photo, USER_SIDECAR_BEACH.encode())
    set_entry(photo, "0th", 0x0112, count=0x7FFFFFFF)
    assert "Invalid size" in exiftool_json(photo, "-Orientation", "-Warning")["Warning"]
    result, logged = isolated("read", photo)
    assert result == {"keywords": ["beach"], "unread": []}
    assert len(logged) == 1
    assert logged[0].startswith(f"{photo}: keywords in a metadata block not read (EXIF IFD0 tag "
                                "0x0112 claims 2147483647 values")


def test_exif_piexif_cannot_read_is_named_in_one_line(photo):
    """A block in bounds that piexif still cannot decode (a value type that does not exist):
    reading names piexif's reason on one line; writing keeps the block and says so."""
    set_entry(photo, "0th", 0x0112, type=99)
    _result, logged = isolated("read", photo)
    assert logged == [
        f"{photo}: keywords in a metadata block not read (piexif cannot read the EXIF block "
        "(ValueError: Exif might be wrong. Got incorrect value type to decode. tag: 274 type: 99))"
    ]
    exif_before = photo.read_bytes()[: 4 + struct.unpack(">H", photo.read_bytes()[4:6])[0]]
    result, _ = isolated("embedded", photo)
    assert result["notes"] == [
        "XPKeywords skipped: piexif cannot read the EXIF block (ValueError: Exif might be wrong. "
        "Got incorrect value type to decode. tag: 274 type: 99)"
    ]
    assert photo.read_bytes().startswith(exif_before)  # EXIF segment kept byte for byte
    assert as_list(keywords_seen(photo)["Subject"]) == ["cat", "dog"]


def test_xpkeywords_of_the_wrong_type_is_left_alone(photo):
    """XPKeywords stored as SHORTs (values over 255 are no string of bytes): not decoded into
    garbage, not overwritten; the XMP keywords are written."""
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XPKeywords=abc", str(photo)],
                   check=True)
    data = photo.read_bytes()
    pos, e = exif_entry(photo, "0th", 0x9C9E)
    _tag, _typ, count, value = struct.unpack_from(e + "HHII", data, pos)
    set_entry(photo, "0th", 0x9C9E, type=3, count=count // 2)
    data = bytearray(photo.read_bytes())
    data[12 + value : 12 + value + 2] = b"\xff\xff"
    photo.write_bytes(bytes(data))
    xp_before = exiftool_json(photo, "-XPKeywords")["XPKeywords"]
    assert read_keywords(photo) == []
    done = write_keywords(photo, ["cat"], mode="embedded")
    assert done.notes == ["XPKeywords skipped: EXIF XPKeywords is not a string of bytes"]
    assert not done.xpkeywords
    assert exiftool_json(photo, "-XPKeywords")["XPKeywords"] == xp_before
    assert as_list(keywords_seen(photo)["Subject"]) == ["cat"]


def test_camera_exif_passes_the_bounds_check():
    """No false alarm on real cameras' EXIF (MakerNotes, thumbnails, GPS, Interop IFDs)."""
    for path in sorted(CAMERA.glob("*.jpg")):
        segment = next(s for s in jpeg.read_header(path).segments if s.is_exif)
        exif.check_bounds(segment.payload)
        assert exif.load(segment.payload)["0th"], path
