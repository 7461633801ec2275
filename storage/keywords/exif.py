"""EXIF: read with piexif; write XPKeywords by a minimal patch that moves no existing byte.

piexif's load -> dump -> insert rebuilds the whole TIFF block (big-endian, MakerNote offsets
broken). Instead :func:`patch_xpkeywords` appends a copy of IFD0 — the same 12-byte entries plus
an XPKeywords entry — and its value at the end of the EXIF block, then points the TIFF header at
the copy. Every other byte keeps its offset, so MakerNotes with absolute offsets, the thumbnail,
the Exif/GPS sub-IFDs are untouched. The old IFD0 stays as unreferenced bytes; a copy we appended
earlier is reclaimed on the next write. The result is checked with piexif: every tag of every
IFD (MakerNote bytes included) and the thumbnail must be equal, XPKeywords aside.

Every block goes through :func:`check_bounds` before piexif sees it (see there why).
"""

from __future__ import annotations

import struct

import piexif

from .jpeg import EXIF_ID, MAX_PAYLOAD

XPKEYWORDS = 0x9C9E
_BYTE = 1
_LONG = 4
_IFD = 13
_IFDS = ("0th", "Exif", "GPS", "Interop", "1st")
# Bytes per value of each TIFF type: BYTE ASCII SHORT LONG RATIONAL SBYTE UNDEFINED SSHORT SLONG
# SRATIONAL FLOAT DOUBLE IFD.
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_EXIF_POINTER, _GPS_POINTER, _INTEROP_POINTER = 0x8769, 0x8825, 0xA005


class ExifPatchRefused(Exception):
    """XPKeywords cannot be written without risk; the message says why."""


class ExifUnreadable(ValueError):
    """The EXIF block cannot be read; the message (one line) says why."""


class ExifDamaged(ExifUnreadable):
    """An IFD or a value lies outside the EXIF block: never handed to piexif."""


def load(exif_payload: bytes) -> dict:
    """piexif's view of an APP1 EXIF payload (``Exif\\0\\0`` + TIFF).

    Raises ExifDamaged (see :func:`check_bounds`) or ExifUnreadable, never piexif's own errors.
    """
    check_bounds(exif_payload)
    try:
        return piexif.load(exif_payload)
    except Exception as exc:  # piexif raises bare ValueError/struct.error on odd blocks
        reason = " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(":")
        raise ExifUnreadable(f"piexif cannot read the EXIF block ({reason})") from None


def check_bounds(exif_payload: bytes) -> None:
    """Raise ExifDamaged unless the IFDs piexif reads (0th, Exif, GPS, Interop, 1st) and all
    their values lie inside the block, and the values together are no larger than the block.

    piexif trusts each entry's count and allocates count x size before it looks at the data:
    one SHORT entry claiming 0x7fffffff values costs 30 s and 4 GB for a 100 KB photo. Real
    values are disjoint ranges of the block, so a block that fails here is damaged.
    """
    tiff = exif_payload[len(EXIF_ID) :]
    if not exif_payload.startswith(EXIF_ID) or tiff[:2] not in (b"II", b"MM") or len(tiff) < 8:
        raise ExifDamaged("EXIF block without a TIFF header")
    e = "<" if tiff[:2] == b"II" else ">"
    total = 0

    def walk(name: str, offset: int) -> tuple[dict[int, int], int]:
        """The IFD's pointer tags (tag -> offset) and its next-IFD offset (0: none)."""
        nonlocal total
        if offset < 8 or offset + 2 > len(tiff):
            raise ExifDamaged(
                f"EXIF {name} at byte {offset} lies outside the {len(tiff)}-byte block"
            )
        (count,) = struct.unpack_from(e + "H", tiff, offset)
        end = offset + 2 + 12 * count
        if end > len(tiff):
            raise ExifDamaged(f"EXIF {name} claims {count} entries, more than the block holds")
        pointers = {}
        for at in range(offset + 2, end, 12):
            tag, typ, n, value = struct.unpack_from(e + "HHII", tiff, at)
            size = n * _TYPE_SIZES.get(typ, 0)  # unknown types: piexif reads nothing of them
            if size > 4:  # stored elsewhere in the block, at offset ``value``
                if value + size > len(tiff):
                    raise ExifDamaged(
                        f"EXIF {name} tag 0x{tag:04X} claims {n} values ({size} bytes) at byte "
                        f"{value}, past the end of the {len(tiff)}-byte block"
                    )
                total += size
            if tag in (_EXIF_POINTER, _GPS_POINTER, _INTEROP_POINTER):
                if typ not in (_LONG, _IFD) or n != 1:
                    raise ExifDamaged(f"EXIF {name} tag 0x{tag:04X} is not an IFD offset")
                pointers[tag] = value
        next_ifd = struct.unpack_from(e + "I", tiff, end)[0] if end + 4 <= len(tiff) else 0
        return pointers, next_ifd

    (ifd0_at,) = struct.unpack_from(e + "I", tiff, 4)
    ifd0, ifd1_at = walk("IFD0", ifd0_at)
    if _EXIF_POINTER in ifd0:
        exif_ifd, _ = walk("Exif IFD", ifd0[_EXIF_POINTER])
        if _INTEROP_POINTER in exif_ifd:
            walk("Interop IFD", exif_ifd[_INTEROP_POINTER])
    if _GPS_POINTER in ifd0:
        walk("GPS IFD", ifd0[_GPS_POINTER])
    if ifd1_at:
        walk("IFD1", ifd1_at)
    if total > len(tiff):
        raise ExifDamaged(
            f"EXIF values add up to {total} bytes, more than the {len(tiff)}-byte block"
        )


def decode_xpkeywords(exif: dict) -> list[str]:
    """XPKeywords of piexif's dict. Raises ExifUnreadable if it is not a string of bytes (a
    damaged entry of another type)."""
    raw = exif.get("0th", {}).get(XPKEYWORDS)
    if not raw:
        return []
    if not isinstance(raw, (bytes, tuple)) or not all(
        isinstance(b, int) and 0 <= b <= 255 for b in raw
    ):
        raise ExifUnreadable("EXIF XPKeywords is not a string of bytes")
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
        before, after = load(old), load(new)
    except ExifUnreadable as exc:
        raise ExifPatchRefused(str(exc)) from None
    for ifd in _IFDS:
        a = {k: v for k, v in before.get(ifd, {}).items() if not (ifd == "0th" and k == XPKEYWORDS)}
        b = {k: v for k, v in after.get(ifd, {}).items() if not (ifd == "0th" and k == XPKEYWORDS)}
        if a != b:
            raise ExifPatchRefused(f"patch would change EXIF {ifd} tags; not written")
    if before.get("thumbnail") != after.get("thumbnail"):
        raise ExifPatchRefused("patch would change the EXIF thumbnail; not written")
    if decode_xpkeywords(after) != keywords:
        raise ExifPatchRefused("XPKeywords did not read back; not written")
