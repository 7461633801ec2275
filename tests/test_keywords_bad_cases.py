"""Keyword writes that must fail cleanly: one-line error, original byte-identical, no temp file."""

from __future__ import annotations

import errno
import os
import shutil
import struct
from pathlib import Path

import pytest

from storage.keywords import KeywordWriteError, read_keywords, sidecar_path, write_keywords
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
