"""EXIF: read with piexif; write XPKeywords by a minimal patch that moves no existing byte.

piexif's load -> dump -> insert rebuilds the whole TIFF block (big-endian, MakerNote offsets
broken). Instead :func:`patch_xpkeywords` appends a copy of IFD0 — the same 12-byte entries plus
an XPKeywords entry — and its value at the end of the EXIF block, then points the TIFF header at
the copy. Every other byte keeps its offset, so MakerNotes with absolute offsets, the thumbnail,
the Exif/GPS sub-IFDs are untouched. The old IFD0 stays as unreferenced bytes; a copy we appended
earlier is reclaimed on the next write. The result is checked with piexif: every tag of every
IFD (MakerNote bytes included) and the thumbnail must be equal, XPKeywords aside.
"""

from __future__ import annotations

import struct

import piexif

from .jpeg import EXIF_ID, MAX_PAYLOAD

XPKEYWORDS = 0x9C9E
_BYTE = 1
_IFDS = ("0th", "Exif", "GPS", "Interop", "1st")


class ExifPatchRefused(Exception):
    """XPKeywords cannot be written without risk; the message says why."""


def load(exif_payload: bytes) -> dict:
    """piexif's view of an APP1 EXIF payload (``Exif\\0\\0`` + TIFF)."""
    return piexif.load(exif_payload)


def decode_xpkeywords(exif: dict) -> list[str]:
    raw = exif.get("0th", {}).get(XPKEYWORDS)
    if not raw:
        return []
    text = bytes(raw).decode("utf-16-le", errors="replace").rstrip("\x00")
    return [k.strip() for k in text.split(";") if k.strip()]


def encode_xpkeywords(keywords: list[str]) -> bytes:
    return ";".join(keywords).encode("utf-16-le") + b"\x00\x00"


def patch_xpkeywords(exif_payload: bytes, keywords: list[str]) -> bytes:
    """A new EXIF payload whose IFD0 XPKeywords is ``keywords`` (removed if empty).

    Raises ExifPatchRefused when the block is unusual enough that the patch is not proven safe.
    """
    if not exif_payload.startswith(EXIF_ID):
        raise ExifPatchRefused("EXIF segment without the Exif\\0\\0 header")
    tiff = exif_payload[len(EXIF_ID) :]
    order = tiff[:2]
    if order not in (b"II", b"MM"):
        raise ExifPatchRefused("unknown TIFF byte order")
    e = "<" if order == b"II" else ">"
    if len(tiff) < 8 or struct.unpack(e + "H", tiff[2:4])[0] != 42:
        raise ExifPatchRefused("not a TIFF header")
    (ifd0,) = struct.unpack(e + "I", tiff[4:8])
    if ifd0 < 8 or ifd0 + 2 > len(tiff):
        raise ExifPatchRefused("IFD0 offset out of range")
    (count,) = struct.unpack(e + "H", tiff[ifd0 : ifd0 + 2])
    ifd_end = ifd0 + 2 + 12 * count + 4
    if count == 0 or ifd_end > len(tiff):
        raise ExifPatchRefused("IFD0 runs past the EXIF block")
    entries = [tiff[ifd0 + 2 + 12 * i : ifd0 + 14 + 12 * i] for i in range(count)]
    next_ifd = tiff[ifd_end - 4 : ifd_end]
    tags = [struct.unpack(e + "H", entry[:2])[0] for entry in entries]
    if tags != sorted(tags) or len(set(tags)) != len(tags):
        raise ExifPatchRefused("IFD0 entries are not in ascending order")

    base = tiff
    old_xp = [entry for entry, tag in zip(entries, tags) if tag == XPKEYWORDS]
    if old_xp and _is_appended_copy(old_xp[0], e, ifd_end, len(tiff)):
        base = tiff[:ifd0]  # our own earlier copy of IFD0 + value: reclaim it
    entries = [entry for entry, tag in zip(entries, tags) if tag != XPKEYWORDS]
    if not keywords and not old_xp:
        return exif_payload

    value = encode_xpkeywords(keywords) if keywords else b""
    new_ifd0 = len(base) + len(base) % 2
    new_count = len(entries) + (1 if value else 0)
    value_at = new_ifd0 + 2 + 12 * new_count + 4
    if value:
        if len(value) <= 4:
            entry = struct.pack(e + "HHI", XPKEYWORDS, _BYTE, len(value)) + value.ljust(4, b"\0")
        else:
            entry = struct.pack(e + "HHII", XPKEYWORDS, _BYTE, len(value), value_at)
        entries.append(entry)
        entries.sort(key=lambda x: struct.unpack(e + "H", x[:2])[0])
        if len(value) <= 4:
            value = b""
    new_tiff = (
        base[:4]
        + struct.pack(e + "I", new_ifd0)
        + base[8:]
        + b"\0" * (new_ifd0 - len(base))
        + struct.pack(e + "H", new_count)
        + b"".join(entries)
        + next_ifd
        + value
        + b"\0" * (len(value) % 2)
    )
    payload = EXIF_ID + new_tiff
    if len(payload) > MAX_PAYLOAD:
        raise ExifPatchRefused(f"EXIF block would exceed 64 KB ({len(payload)} bytes)")
    _check_only_xpkeywords_changed(exif_payload, payload, keywords)
    return payload


def _is_appended_copy(xp_entry: bytes, e: str, ifd_end: int, tiff_len: int) -> bool:
    """True if IFD0 and its XPKeywords value exactly fill the end of the block (our layout)."""
    _tag, typ, count = struct.unpack(e + "HHI", xp_entry[:8])
    if typ != _BYTE or count <= 4:
        return False
    (offset,) = struct.unpack(e + "I", xp_entry[8:12])
    return offset == ifd_end and offset + count + count % 2 == tiff_len


def _check_only_xpkeywords_changed(old: bytes, new: bytes, keywords: list[str]) -> None:
    try:
        before, after = piexif.load(old), piexif.load(new)
    except Exception as exc:  # piexif raises bare ValueError/struct.error on odd blocks
        raise ExifPatchRefused(f"piexif cannot read the EXIF block ({exc})") from None
    for ifd in _IFDS:
        a = {k: v for k, v in before.get(ifd, {}).items() if not (ifd == "0th" and k == XPKEYWORDS)}
        b = {k: v for k, v in after.get(ifd, {}).items() if not (ifd == "0th" and k == XPKEYWORDS)}
        if a != b:
            raise ExifPatchRefused(f"patch would change EXIF {ifd} tags; not written")
    if before.get("thumbnail") != after.get("thumbnail"):
        raise ExifPatchRefused("patch would change the EXIF thumbnail; not written")
    if decode_xpkeywords(after) != keywords:
        raise ExifPatchRefused("XPKeywords did not read back; not written")
