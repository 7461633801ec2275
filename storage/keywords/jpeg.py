"""Segment-level JPEG handling: split the header into marker segments, swap one, join again.

Everything from the first SOS marker to the end of the file (the entropy-coded image, EOI and any
trailing data such as MPF preview images) is kept as one opaque byte string, so image data can
never change. Nothing is decoded or re-encoded.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
# Everything before the image data. A camera JPEG's header is tens of KB; with ICC profiles and
# Extended XMP (depth maps, panorama data: each piece under 64 KB) a few MB. A header that has
# not ended after 64 MiB is a damaged or hostile file, not worth reading further.
MAX_HEADER_BYTES = 64 * 1024 * 1024


class JpegError(ValueError):
    """The bytes are not a JPEG whose header we can walk safely."""


class JpegTruncated(JpegError):
    """The header runs past the end of the bytes given: more of the file may complete it."""


class NotReadable(OSError):
    """A file refused before reading (not a regular file, too large); the message is the reason.

    An OSError, so that callers that already skip unreadable files skip these too; ``strerror``
    holds the reason as well, for messages built from it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.strerror = reason


def open_regular(path: Path | str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file, else raise NotReadable at once.

    A plain ``open()`` of a FIFO waits for a writer, forever; a device such as /dev/zero never
    ends. O_NONBLOCK makes the open itself return at once, then fstat on the descriptor (not on
    the path, which may have been swapped meanwhile) tells what was opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotReadable("not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
        if pos >= len(data):
            raise JpegTruncated(f"no marker at byte {pos} (truncated header)")
        if data[pos] != 0xFF:
            raise JpegError(f"no marker at byte {pos} (corrupt header)")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1  # fill bytes
        if pos >= len(data):
            raise JpegTruncated("truncated header")
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
            raise JpegTruncated("truncated header")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise JpegError(f"segment 0x{marker:02X} at byte {start} has a bad length ({length})")
        if pos + length > len(data):
            raise JpegTruncated(f"segment 0x{marker:02X} at byte {start} runs past the end of file")
        pos += length
        segments.append(Segment(marker, data[start:pos]))


def read_header(path: Path, first: int = 64 * 1024) -> JpegParts:
    """``split`` of the file at ``path``, reading only as far as its header needs (the image
    data is read only if the header has not ended by then): metadata without the megabytes.

    Raises NotReadable (an OSError) for a FIFO or a device, JpegError for a header that is
    damaged or longer than MAX_HEADER_BYTES."""
    with open_regular(path) as f:
        data = f.read(first)
        while True:
            try:
                return split(data)
            except JpegTruncated:
                if len(data) >= MAX_HEADER_BYTES:
                    raise JpegError(
                        f"JPEG header longer than {MAX_HEADER_BYTES // 2**20} MiB; not read"
                    ) from None
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
