"""SQLAlchemy models: the whole phototag schema.

The database is the source of truth and the daemon's queue: a photo stays ``pending`` until its
tags are committed, so a crash at any moment loses nothing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Photo.status values.
PENDING = "pending"
TAGGED = "tagged"
ERROR = "error"
STATUSES = (PENDING, TAGGED, ERROR)

# PhotoTag.source values.
SOURCE_MODEL = "model"  # written by the tagger
SOURCE_USER = "user"  # set by the user through phototag
SOURCE_KEYWORD = "keyword"  # read from the photo's existing sidecar / EXIF / XMP keywords
SOURCES = (SOURCE_MODEL, SOURCE_USER, SOURCE_KEYWORD)


class Base(DeclarativeBase):
    pass


class AlbumRoot(Base):
    """A folder whose photos are indexed; photo paths are stored relative to it."""

    __tablename__ = "album_root"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    added_at: Mapped[datetime] = mapped_column(DateTime)

    photos: Mapped[list[Photo]] = relationship(back_populates="root", passive_deletes=True)


class Photo(Base):
    __tablename__ = "photo"
    __table_args__ = (
        UniqueConstraint("root_id", "relpath", name="uq_photo_root_relpath"),
        Index("ix_photo_status_retry", "status", "retry_at"),
        Index("ix_photo_content_hash", "content_hash"),
        Index("ix_photo_taken_at", "taken_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    root_id: Mapped[int] = mapped_column(ForeignKey("album_root.id", ondelete="CASCADE"))
    relpath: Mapped[str] = mapped_column(String(4096))
    # 64-bit: nanosecond mtimes (and files over 2 GiB) overflow PostgreSQL's 32-bit INTEGER.
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    taken_at: Mapped[datetime | None] = mapped_column(DateTime)

    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    retry_at: Mapped[datetime | None] = mapped_column(DateTime)

    tagged_at: Mapped[datetime | None] = mapped_column(DateTime)
    model: Mapped[str | None] = mapped_column(String(64))
    mapping_version: Mapped[str | None] = mapped_column(String(64))
    indexed_at: Mapped[datetime] = mapped_column(DateTime)

    # Keywords phototag itself last wrote into the photo's sidecar or embedded XMP (a JSON list),
    # so that a re-tag replaces only those and never a keyword the user set.
    written_keywords: Mapped[str | None] = mapped_column(Text)
    keywords_written_at: Mapped[datetime | None] = mapped_column(DateTime)

    root: Mapped[AlbumRoot] = relationship(back_populates="photos")
    tags: Mapped[list[PhotoTag]] = relationship(
        back_populates="photo", cascade="all, delete-orphan", passive_deletes=True
    )


class Tag(Base):
    """A tag name with its Chinese name. Broader tags live in TagParent (cat -> animal, pet)."""

    __tablename__ = "tag"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    zh: Mapped[str | None] = mapped_column(String(255), index=True)
    # False for tags that only come from keywords read off the photos, not from the label mapping.
    from_mapping: Mapped[bool] = mapped_column(Boolean, default=True)


class TagParent(Base):
    """Edge of the tag hierarchy: ``tag`` is narrower than ``parent``."""

    __tablename__ = "tag_parent"

    tag_id: Mapped[int] = mapped_column(ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(
        ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class PhotoTag(Base):
    __tablename__ = "photo_tag"
    # photo_id too, so that finding the photos with a tag is an index-only scan.
    __table_args__ = (Index("ix_photo_tag_tag_score", "tag_id", "score", "photo_id"),)

    photo_id: Mapped[int] = mapped_column(
        ForeignKey("photo.id", ondelete="CASCADE"), primary_key=True
    )
    tag_id: Mapped[int] = mapped_column(ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True)
    source: Mapped[str] = mapped_column(String(16), primary_key=True, default=SOURCE_MODEL)
    score: Mapped[float] = mapped_column(Float)

    photo: Mapped[Photo] = relationship(back_populates="tags")
    tag: Mapped[Tag] = relationship()


class Meta(Base):
    """Small key/value facts about the library, e.g. when the nightly job last succeeded."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
