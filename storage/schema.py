"""The phototag schema as SQLAlchemy Core tables: the one definition of every table and index.

The read-only commands (search, tags, status) query these tables with Core alone, which keeps the
ORM's import (a sixth of ``phototag search``'s start-up) off their path; ``storage.models`` maps
the ORM classes that the writers use onto these same tables, and Alembic compares the migrations
with this ``metadata``.

The database is the source of truth and the daemon's queue: a photo stays ``pending`` until its
tags are committed, so a crash at any moment loses nothing.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# photo.status values.
PENDING = "pending"
TAGGED = "tagged"
ERROR = "error"
STATUSES = (PENDING, TAGGED, ERROR)

# photo_tag.source values.
SOURCE_MODEL = "model"  # written by the tagger
SOURCE_USER = "user"  # set by the user through phototag
SOURCE_KEYWORD = "keyword"  # read from the photo's existing sidecar / EXIF / XMP keywords
SOURCES = (SOURCE_MODEL, SOURCE_USER, SOURCE_KEYWORD)

# The hashlib algorithm of photo.content_hash (the whole file's bytes; ~1.5 GB/s with the CPU's SHA
# extensions: a few ms per photo). Keyword rewrites report their new hash in it too.
CONTENT_HASH = "sha256"

metadata = MetaData()

# A folder whose photos are indexed; photo paths are stored relative to it.
album_root = Table(
    "album_root", metadata,
    Column("id", Integer, primary_key=True),
    Column("path", String(4096), nullable=False, unique=True),
    Column("added_at", DateTime, nullable=False),
)

photo = Table(
    "photo", metadata,
    Column("id", Integer, primary_key=True),
    Column("root_id", ForeignKey("album_root.id", ondelete="CASCADE"), nullable=False),
    Column("relpath", String(4096), nullable=False),
    # 64-bit: nanosecond mtimes (and files over 2 GiB) overflow PostgreSQL's 32-bit INTEGER.
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("content_hash", String(64)),
    Column("width", Integer),
    Column("height", Integer),
    Column("taken_at", DateTime),
    Column("status", String(16), nullable=False, default=PENDING),
    Column("error", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("retry_at", DateTime),
    Column("tagged_at", DateTime),
    Column("model", String(64)),
    Column("mapping_version", String(64)),
    Column("indexed_at", DateTime, nullable=False),
    # Keywords phototag itself last wrote into the photo's sidecar or embedded XMP (a JSON list),
    # so that a re-tag replaces only those and never a keyword the user set.
    Column("written_keywords", Text),
    Column("keywords_written_at", DateTime),
    # "<size> <sha256>" of phototag's keyword rewrite of this JPEG while it is being put in place
    # (committed before the rename, cleared after): a file that matches it is phototag's own write.
    Column("own_write", String(100)),
    # The photo's XMP sidecars ("<size>:<mtime_ns>" per naming, see storage.keywords.sidecar_state)
    # when the keywords in them were last read: a scan that finds them different reads them again.
    Column("sidecar_state", String(100)),
    # When the current tagging attempt started (the photo entered the tagger; counted in
    # attempts); cleared when its outcome is stored. Still set when phototag finds the photo
    # again: the attempt never ended (a crash, an out-of-memory kill), see daemon.indexer.
    Column("attempt_started_at", DateTime),
    # Attempts in a row that never ended (found still started by a later phototag process),
    # since the photo was last tagged, changed or queued again: a photo that keeps bringing
    # phototag down is given up on after a few (daemon.indexer.MAX_INTERRUPTED).
    Column("interruptions", Integer, nullable=False, default=0, server_default="0"),
    UniqueConstraint("root_id", "relpath", name="uq_photo_root_relpath"),
    Index("ix_photo_status_retry", "status", "retry_at"),
    Index("ix_photo_content_hash", "content_hash"),
    Index("ix_photo_taken_at", "taken_at"),
)

# A tag name with its Chinese name. Broader tags live in tag_parent (cat -> animal, pet).
tag = Table(
    "tag", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("zh", String(255), index=True),
    # False for tags that only come from keywords read off the photos, not from the label mapping.
    Column("from_mapping", Boolean, nullable=False, default=True),
)

# An edge of the tag hierarchy: tag_id is narrower than parent_id.
tag_parent = Table(
    "tag_parent", metadata,
    Column("tag_id", ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True),
    Column("parent_id", ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True, index=True),
)

photo_tag = Table(
    "photo_tag", metadata,
    Column("photo_id", ForeignKey("photo.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True),
    Column("source", String(16), primary_key=True, default=SOURCE_MODEL),
    Column("score", Float, nullable=False),
    # photo_id too, so that finding the photos with a tag is an index-only scan.
    Index("ix_photo_tag_tag_score", "tag_id", "score", "photo_id"),
)

# Small key/value facts about the library, e.g. when the nightly job last succeeded.
meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
