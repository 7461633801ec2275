"""Keywords embedded in a JPEG: the standard XMP APP1 segment and, where safe, EXIF XPKeywords.

Only those two APP1 segments may change; every other segment and the image data are carried over
byte for byte and checked again on the written temp file before it replaces the photo.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from . import exif, jpeg, xmp
from .atomic import replace_atomically
from .result import BeforeReplace, KeywordWriteError, PendingWrite
from .tagpaths import KeywordPath, dedupe

log = logging.getLogger(__name__)

XMP_PADDING = 2048


@dataclass
class EmbeddedResult:
    owned: list[str]
    xpkeywords: bool
    notes: list[str]
    size: int
    sha256: str  # of the new file's bytes


def write_embedded(
    photo: Path,
    data: bytes,
    photo_stat: os.stat_result,
    keywords: list[KeywordPath],
    previous: Collection[str],
    photo_unchanged: Callable[[], None],
    before_replace: BeforeReplace | None = None,
) -> EmbeddedResult:
    """Rewrite ``photo`` (whose current bytes are ``data``) with the keywords embedded.

    ``before_replace``: see ``write_keywords``.
    """
    try:
        parts = jpeg.split(data)
    except jpeg.JpegError as exc:
        raise KeywordWriteError(photo, f"{exc}; not written")
    segments = parts.segments
    xmp_at = [i for i, s in enumerate(segments) if s.is_xmp]
    exif_at = next((i for i, s in enumerate(segments) if s.is_exif), None)
    mpf_at = next((i for i, s in enumerate(segments) if s.is_mpf), None)
    if len(xmp_at) > 1:
        raise KeywordWriteError(photo, "several standard XMP segments; not written")

    if xmp_at:
        try:
            doc = xmp.parse(segments[xmp_at[0]].payload[len(jpeg.XMP_ID) :])
        except xmp.XmpError as exc:
            raise KeywordWriteError(photo, f"embedded XMP is not valid ({exc}); not written")
    else:
        doc = xmp.new_doc()

    notes: list[str] = []
    exif_dict = None
    if exif_at is None:
        notes.append("XPKeywords skipped: the JPEG has no EXIF block")
    else:
        try:
            exif_dict = exif.load(segments[exif_at].payload)
        except exif.ExifDamaged as exc:  # not merely odd: values point outside the block
            raise KeywordWriteError(photo, f"{exc}; not written") from None
        except exif.ExifUnreadable as exc:
            notes.append(f"XPKeywords skipped: {exc}")
    try:
        users_xp = [k for k in exif.decode_xpkeywords(exif_dict or {}) if k not in set(previous)]
    except exif.ExifUnreadable as exc:  # left as it is
        notes.append(f"XPKeywords skipped: {exc}")
        exif_dict, users_xp = None, []

    try:
        owned = xmp.merge_keywords(doc, keywords, previous, also_users=users_xp)
    except xmp.XmpError as exc:
        raise KeywordWriteError(photo, f"embedded XMP cannot be merged ({exc}); not written")
    subjects = xmp.get_list(doc, xmp.DC_SUBJECT)
    xmp_segment = _xmp_segment(photo, doc)

    new_segments = list(segments)
    if xmp_at:
        changed = [xmp_at[0]]
        new_segments[xmp_at[0]] = xmp_segment
    else:
        at = jpeg.xmp_insert_index(segments)
        changed = [at]
        new_segments.insert(at, xmp_segment)

    xp_values = dedupe([*subjects, *users_xp])
    xpkeywords = False
    if exif_dict is not None:
        try:
            new_exif = exif.patch_xpkeywords(segments[exif_at].payload, xp_values)
            new_segments[exif_at] = jpeg.make_segment(jpeg.APP1, new_exif)
            changed.append(exif_at)
            xpkeywords = True
        except exif.ExifPatchRefused as exc:
            notes.append(f"XPKeywords skipped: {exc}")
    if mpf_at is not None and max(changed) > mpf_at:
        # MPF offsets are relative to the MPF segment: growing a segment after it breaks them.
        raise KeywordWriteError(photo, "XMP segment lies after the MPF segment; not written")
    for note in notes:
        log.info("%s: %s", photo, note)

    new_data = jpeg.JpegParts(new_segments, parts.image).join()
    expect_xp = None
    if exif_dict is not None:
        expect_xp = xp_values if xpkeywords else exif.decode_xpkeywords(exif_dict)

    def verify(tmp: Path) -> None:
        _verify(photo, tmp, parts, new_segments, subjects, expect_xp)

    new_sha256 = hashlib.sha256(new_data).hexdigest()

    def last_check() -> None:
        photo_unchanged()
        if before_replace is not None:
            before_replace(PendingWrite(owned, len(new_data), new_sha256))

    try:
        replace_atomically(
            photo,
            new_data,
            mode=photo_stat.st_mode,
            owner=(photo_stat.st_uid, photo_stat.st_gid),
            times_ns=(photo_stat.st_atime_ns, photo_stat.st_mtime_ns),
            verify=verify,
            unchanged=last_check,
        )
    except OSError as exc:
        raise KeywordWriteError(photo, f"could not write ({exc.strerror or exc}); not changed")
    return EmbeddedResult(owned, xpkeywords, notes, len(new_data), new_sha256)


def _xmp_segment(photo: Path, doc: xmp.XmpDoc) -> jpeg.Segment:
    for padding in (XMP_PADDING, 0):
        packet = xmp.serialize(doc, padding=padding)
        if len(packet) <= jpeg.MAX_XMP_PACKET:
            return jpeg.make_segment(jpeg.APP1, jpeg.XMP_ID + packet)
    raise KeywordWriteError(
        photo,
        f"XMP packet would be {len(packet)} bytes, over the {jpeg.MAX_XMP_PACKET}-byte limit "
        "of a JPEG segment; not written",
    )


def _verify(
    photo: Path,
    tmp: Path,
    before: jpeg.JpegParts,
    segments: list[jpeg.Segment],
    subjects: list[str],
    xp: list[str] | None,
) -> None:
    """Parse the written temp file back: same image bytes, same segments, our keywords."""
    try:
        after = jpeg.split(tmp.read_bytes())
    except jpeg.JpegError as exc:
        raise KeywordWriteError(photo, f"written file does not parse ({exc}); not replaced")
    if after.image != before.image:
        raise KeywordWriteError(photo, "image data changed in the written file; not replaced")
    if after.segments != segments:
        raise KeywordWriteError(photo, "written segments differ from the plan; not replaced")
    others_before = [s for s in before.segments if not (s.is_xmp or s.is_exif)]
    others_after = [s for s in after.segments if not (s.is_xmp or s.is_exif)]
    if others_before != others_after:
        raise KeywordWriteError(photo, "a segment other than XMP/EXIF changed; not replaced")
    xmp_seg = next(s for s in after.segments if s.is_xmp)
    got = xmp.get_list(xmp.parse(xmp_seg.payload[len(jpeg.XMP_ID) :]), xmp.DC_SUBJECT)
    if got != subjects:
        raise KeywordWriteError(photo, "XMP keywords did not read back; not replaced")
    exif_seg = next((s for s in after.segments if s.is_exif), None)
    if xp is not None and exif_seg is not None and exif.decode_xpkeywords(exif.load(exif_seg.payload)) != xp:
        raise KeywordWriteError(photo, "XPKeywords did not read back; not replaced")
