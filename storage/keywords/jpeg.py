"""Segment-level JPEG handling: split the header into marker segments, swap one, join again.

Everything from the first SOS marker to the end of the file (the entropy-coded image, EOI and any
trailing data such as MPF preview images) is kept as one opaque byte string, so image data can
never change. Nothing is decoded or re-encoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

SOI = b"\xff\xd8"
SOS = 0xDA
EOI = 0xD9
APP0 = 0xE0
APP1 = 0xE1
APP2 = 0xE2
XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"
EXIF_ID = b"Exif\x00\x00"
MPF_ID = b"MPF\x00"
# A segment's 16-bit length counts itself (2 bytes) plus the payload.
MAX_PAYLOAD = 0xFFFF - 2
MAX_XMP_PACKET = MAX_PAYLOAD - len(XMP_ID)  # 65504 bytes
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class JpegError(ValueError):
    """The bytes are not a JPEG whose header we can walk safely."""


@dataclass(frozen=True)
class Segment:
    marker: int
    raw: bytes  # the whole segment: 0xFF marker, length, payload (and any fill bytes before it)

    @property
    def payload(self) -> bytes:
        return self.raw[self.raw.index(bytes([0xFF, self.marker])) + 4 :]

    @property
    def is_xmp(self) -> bool:
        return self.marker == APP1 and self.payload.startswith(XMP_ID)

    @property
    def is_exif(self) -> bool:
        return self.marker == APP1 and self.payload.startswith(EXIF_ID)

    @property
    def is_mpf(self) -> bool:
        return self.marker == APP2 and self.payload.startswith(MPF_ID)


@dataclass
class JpegParts:
    segments: list[Segment]
    image: bytes  # from the SOS marker to the end of the file, untouched

    def join(self) -> bytes:
        return SOI + b"".join(s.raw for s in self.segments) + self.image


def make_segment(marker: int, payload: bytes) -> Segment:
    if len(payload) > MAX_PAYLOAD:
        raise JpegError(f"segment payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return Segment(marker, bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload)


def split(data: bytes) -> JpegParts:
    if not data.startswith(SOI):
        raise JpegError("not a JPEG (no SOI marker)")
    pos, segments = 2, []
    while True:
        start = pos
        if pos >= len(data) or data[pos] != 0xFF:
            raise JpegError(f"no marker at byte {pos} (corrupt or truncated header)")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1  # fill bytes
        if pos >= len(data):
            raise JpegError("truncated header")
        marker = data[pos]
        pos += 1
        if marker == SOS:
            return JpegParts(segments, data[start:])
        if marker == EOI:
            raise JpegError("no image data (EOI before SOS)")
        if marker in _STANDALONE:
            segments.append(Segment(marker, data[start:pos]))
            continue
        if pos + 2 > len(data):
            raise JpegError("truncated header")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2 or pos + length > len(data):
            raise JpegError(f"segment 0x{marker:02X} at byte {start} runs past the end of file")
        pos += length
        segments.append(Segment(marker, data[start:pos]))


def read_header(path: Path, first: int = 64 * 1024) -> JpegParts:
    """``split`` of the file at ``path``, reading only as far as its header needs (the image
    data is read only if the header has not ended by then): metadata without the megabytes."""
    with open(path, "rb") as f:
        data = f.read(first)
        while True:
            try:
                return split(data)
            except JpegError:
                more = f.read(len(data))
                if not more:
                    raise
                data += more


def xmp_insert_index(segments: list[Segment]) -> int:
    """Where a new XMP segment belongs: after EXIF APP1, else after the leading APP0s (JFIF)."""
    for i, seg in enumerate(segments):
        if seg.is_exif:
            return i + 1
    i = 0
    while i < len(segments) and segments[i].marker == APP0:
        i += 1
    return i
