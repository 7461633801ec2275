"""ORM classes for the writers (indexer, worker, keyword sync), mapped onto ``storage.schema``.

The tables themselves (columns, indexes, constraints) are defined once, in ``storage.schema``;
this module adds the classes and their relationships. The read-only commands search, tags and
status use the Core tables and never import this module (nor the ORM); ``show`` does, to find a
photo the way the indexer files it.
"""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase, Mapped, relationship

from storage import schema
from storage.schema import (  # noqa: F401  (re-exported: the writers import them from here)
    ERROR,
    PENDING,
    SOURCE_KEYWORD,
    SOURCE_MODEL,
    SOURCE_USER,
    SOURCES,
    STATUSES,
    TAGGED,
)


class Base(DeclarativeBase):
    metadata = schema.metadata


class AlbumRoot(Base):
    __table__ = schema.album_root

    photos: Mapped[list[Photo]] = relationship(back_populates="root", passive_deletes=True)


class Photo(Base):
    __table__ = schema.photo

    root: Mapped[AlbumRoot] = relationship(back_populates="photos")
    tags: Mapped[list[PhotoTag]] = relationship(
        back_populates="photo", cascade="all, delete-orphan", passive_deletes=True
    )


class Tag(Base):
    __table__ = schema.tag


class TagParent(Base):
    __table__ = schema.tag_parent


class PhotoTag(Base):
    __table__ = schema.photo_tag

    photo: Mapped[Photo] = relationship(back_populates="tags")
    tag: Mapped[Tag] = relationship()


class Meta(Base):
    __table__ = schema.meta
