"""Indexing: file scanning, library operations, and `phototag index` with the real tagger."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select

from daemon.scan import PhotoFilter, file_facts, read_taken_at, root_available, scan_tree
from daemon.config import DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS
from storage import library
from storage.db import read_session, write_session
from storage.migrate import open_for_write
from storage.models import ERROR, PENDING, SOURCE_MODEL, SOURCE_USER, TAGGED, Photo, PhotoTag, Tag
from tests.conftest import FIXTURES

REPO = Path(__file__).resolve().parent.parent
CAMERA = FIXTURES / "camera"
PHOTOS = FIXTURES / "photos"


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """A small real JPEG whose pixels (and so content hash) depend on ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    for x in range(0, size[0], 4):
        image.putpixel((x, seed % size[1]), (255, 255, 255))
    image.save(path, "JPEG", quality=90)
    return path


# --- scanning -----------------------------------------------------------------------------


def test_photo_filter_uses_the_nas_defaults():
    photos = PhotoFilter(DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS)
    assert photos.wanted("2023/summer/IMG_0001.JPG")
    assert photos.wanted("a.heic") and photos.wanted("b.Jpeg")
    for relpath in ("@eaDir/IMG_1.jpg/SYNOFILE_THUMB_XL.jpg", "#recycle/x.jpg", "a/#snapshot/x.jpg",
                    ".@__thumb/x.jpg", "x/.thumbnails/y.jpg", "._IMG_1.jpg", ".hidden/x.jpg",
                    "a/.IMG_1.jpg.AbC123", "IMG_1.jpg.part", "IMG_1.jpg.crdownload",
                    ".syncthing.IMG_1.jpg.tmp", "notes.txt", "movie.mp4"):
        assert not photos.wanted(relpath), relpath


def test_scan_tree_finds_photos_and_skips_excluded(tmp_path):
    for relpath in ("a.jpg", "2023/b.JPG", "2023/deep/c.png", "@eaDir/a.jpg/thumb.jpg",
                    ".hidden/d.jpg", "2023/._b.JPG", "2023/e.jpg.part", "f.txt"):
        write_jpeg(tmp_path / relpath, 1)
    (tmp_path / "loop").symlink_to(tmp_path)  # a symlinked folder is not followed
    result = scan_tree(tmp_path, PhotoFilter(DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS))
    assert sorted(result.files) == ["2023/b.JPG", "2023/deep/c.png", "a.jpg"]
    stat = (tmp_path / "a.jpg").stat()
    assert result.files["a.jpg"].size == stat.st_size
    assert result.files["a.jpg"].mtime_ns == stat.st_mtime_ns
    assert result.unreadable == [] and result.problems == []
    under = scan_tree(tmp_path, PhotoFilter(DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS), "2023")
    assert sorted(under.files) == ["2023/b.JPG", "2023/deep/c.png"]


def test_unlistable_folder_is_reported_not_taken_for_empty(tmp_path):
    write_jpeg(tmp_path / "ok/a.jpg", 1)
    (tmp_path / "gone").mkdir()
    result = scan_tree(tmp_path, PhotoFilter([], [".jpg"]), "missing-folder")
    assert result.unreadable == ["missing-folder"] and "cannot list folder" in result.problems[0]


def test_root_available(tmp_path):
    assert not root_available(tmp_path / "nope")
    assert not root_available(tmp_path)  # an empty mount point
    (tmp_path / "x").touch()
    assert root_available(tmp_path)


def test_taken_at_agrees_with_exiftool():
    checked = 0
    for photo in sorted(CAMERA.glob("*.jpg")):
        out = subprocess.run(["exiftool", "-j", "-DateTimeOriginal", str(photo)],
                             capture_output=True, text=True, check=True).stdout
        expected = json.loads(out)[0].get("DateTimeOriginal")
        got = read_taken_at(photo)
        if expected is None:
            assert got is None
        else:
            assert got == datetime.strptime(expected, "%Y:%m:%d %H:%M:%S"), photo.name
            checked += 1
    assert checked >= 5
    assert read_taken_at(PHOTOS / "cat.jpg") is None  # no EXIF date


def test_file_facts(tmp_path):
    import hashlib

    photo = write_jpeg(tmp_path / "a.jpg", 3)
    facts = file_facts(photo)
    assert facts.content_hash == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert facts.error is None
    missing = file_facts(tmp_path / "gone.jpg")
    assert missing.content_hash is None and "No such file" in missing.error


# --- library operations -------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path):
    engine = open_for_write(f"sqlite:///{tmp_path / 'phototag.db'}")
    yield engine
    engine.dispose()


class Info:
    def __init__(self, name, zh="", broader=(), score=0.5):
        self.name, self.zh, self.broader, self.score = name, zh, tuple(broader), score


def test_sync_tags_follows_the_mapping(engine):
    with write_session(engine) as s:
        library.sync_tags(s, [Info("cat", "猫", ["pet", "animal"]), Info("pet", "宠物", ["animal"]),
                              Info("animal", "动物"), Info("dog", "狗", ["pet", "animal"])])
    with write_session(engine) as s:  # the mapping changed: dog is no longer a pet; zh fixed
        ids = library.sync_tags(s, [Info("cat", "猫咪", ["pet", "animal"]), Info("pet", "宠物"),
                                    Info("animal", "动物"), Info("dog", "狗", ["animal"])])
    with read_session(engine) as s:
        tags = {t.name: t.zh for t in s.scalars(select(Tag))}
        edges = {(a, b) for a, b in s.execute(select(library.TagParent.tag_id,
                                                     library.TagParent.parent_id))}
    assert tags == {"cat": "猫咪", "pet": "宠物", "animal": "动物", "dog": "狗"}
    name = {v: k for k, v in ids.items()}
    assert {(name[a], name[b]) for a, b in edges} == {
        ("cat", "pet"), ("cat", "animal"), ("dog", "animal")}


def test_ensure_root_reuses_and_merges_roots(engine, tmp_path):
    album = tmp_path / "album"
    write_jpeg(album / "2023" / "a.jpg", 1)
    with write_session(engine) as s:
        inner, under = library.ensure_root(s, album / "2023")
        assert under == "" and inner.path == str((album / "2023").resolve())
        photo, change = library.upsert_seen_file(s, inner, "a.jpg", 1, 2)
        photo_id = photo.id
    with write_session(engine) as s:  # the parent folder takes over the inner root
        outer, under = library.ensure_root(s, album)
        assert under == ""
        assert [r.path for r in library.roots(s)] == [str(album.resolve())]
        moved = s.get(Photo, photo_id)
        assert (moved.root_id, moved.relpath) == (outer.id, "2023/a.jpg")
    with write_session(engine) as s:  # a folder inside a root belongs to it
        root, under = library.ensure_root(s, album / "2023")
        assert (root.id, under) == (outer.id, "2023")
        assert library.locate(s, album / "2023" / "a.jpg") == (root, "2023/a.jpg")
        assert library.locate(s, tmp_path / "elsewhere.jpg") is None


def test_seen_files_and_results(engine, tmp_path):
    with write_session(engine) as s:
        root, _ = library.ensure_root(s, tmp_path)
        library.sync_tags(s, [Info("cat", "猫", ["animal"]), Info("animal", "动物")])
        photo, change = library.upsert_seen_file(s, root, "a.jpg", 100, 5)
        assert change is library.Change.NEW and photo.status == PENDING
        assert library.upsert_seen_file(s, root, "a.jpg", 100, 5)[1] is library.Change.UNCHANGED
    with read_session(engine) as s:
        (job,) = library.pending_jobs(s)
        assert job.path == Path(tmp_path.resolve(), "a.jpg")
    with write_session(engine) as s:
        s.add(PhotoTag(photo_id=job.photo_id, tag_id=library.tag_ids(s)["cat"],
                       source=SOURCE_USER, score=1.0))
        assert library.store_result(s, job, [Info("cat", score=0.8), Info("animal", score=0.9)],
                                    model="m1", mapping_version="v1", width=4, height=3,
                                    taken_at=None, content_hash="ab" * 32)
    with write_session(engine) as s:  # a re-tag replaces the model's tags, not the user's
        assert library.store_result(s, job, [Info("dog", "狗", score=0.7)], model="m1",
                                    mapping_version="v2", width=4, height=3, taken_at=None,
                                    content_hash="ab" * 32)
    with read_session(engine) as s:
        rows = {(t.tag.name, t.source, t.score) for t in s.scalars(select(PhotoTag))}
        assert rows == {("cat", SOURCE_USER, 1.0), ("dog", SOURCE_MODEL, 0.7)}
        assert s.scalar(select(Tag.from_mapping).where(Tag.name == "dog")) is False
        photo = s.get(Photo, job.photo_id)
        assert (photo.status, photo.mapping_version, photo.width) == (TAGGED, "v2", 4)
        assert library.pending_jobs(s) == []
    with write_session(engine) as s:  # the file changed: back in the queue, tags kept till then
        photo, change = library.upsert_seen_file(s, root, "a.jpg", 101, 6)
        assert change is library.Change.CHANGED and photo.status == PENDING
        assert photo.content_hash is None
        # a result computed for the old file is refused
        assert not library.store_result(s, job, [], model="m1", mapping_version="v2", width=1,
                                        height=1, taken_at=None, content_hash=None)
        assert not library.store_error(s, job, "late")


def test_errors_are_retried_with_backoff(engine, tmp_path):
    with write_session(engine) as s:
        root, _ = library.ensure_root(s, tmp_path)
        library.upsert_seen_file(s, root, "bad.jpg", 10, 1)
    now = datetime(2025, 1, 1, 12, 0, 0)
    delays = []
    for attempt in range(1, 4):
        with read_session(engine) as s:
            (job,) = library.pending_jobs(s, now=now)
        with write_session(engine) as s:
            assert library.store_error(s, job, "cannot decode", retry_after=60, now=now)
        with read_session(engine) as s:
            photo = s.get(Photo, job.photo_id)
            assert (photo.status, photo.attempts, photo.error) == (ERROR, attempt, "cannot decode")
            delays.append(photo.retry_at - now)
            assert library.pending_jobs(s, now=now) == []  # not due yet
            assert library.pending_jobs(s, now=photo.retry_at - timedelta(seconds=1)) == []
            now = photo.retry_at
    assert delays == [timedelta(seconds=60), timedelta(seconds=120), timedelta(seconds=240)]
    with write_session(engine) as s:
        assert library.requeue(s, errors=True) == 1
    with read_session(engine) as s:
        assert s.scalar(select(Photo.status)) == PENDING


def test_requeue_outdated(engine, tmp_path):
    with write_session(engine) as s:
        root, _ = library.ensure_root(s, tmp_path)
        for name, mapping in (("old.jpg", "v1"), ("new.jpg", "v2")):
            photo, _ = library.upsert_seen_file(s, root, name, 1, 1)
            photo.status, photo.model, photo.mapping_version = TAGGED, "resnet18", mapping
    with write_session(engine) as s:
        assert library.requeue(s, outdated=("resnet18", "v2")) == 1
    with read_session(engine) as s:
        assert [j.relpath for j in library.pending_jobs(s)] == ["old.jpg"]


def test_find_moved_only_matches_photos_whose_file_is_gone(engine, tmp_path):
    old = write_jpeg(tmp_path / "old.jpg", 5)
    digest = file_facts(old).content_hash
    with write_session(engine) as s:
        root, _ = library.ensure_root(s, tmp_path)
        photo, _ = library.upsert_seen_file(s, root, "old.jpg", old.stat().st_size, 1)
        photo.status, photo.content_hash = TAGGED, digest
    size = old.stat().st_size
    with read_session(engine) as s:
        assert library.find_moved(s, digest, size) is None  # still there: a copy, not a move
    old.rename(tmp_path / "new.jpg")
    with read_session(engine) as s:
        assert library.find_moved(s, digest, size).relpath == "old.jpg"
        assert library.find_moved(s, digest, size + 1) is None
        assert library.find_moved(s, "00" * 32, size) is None


def test_remove_missing_keeps_what_is_still_there(engine, tmp_path):
    for name in ("keep.jpg", "appeared-later.jpg", "locked/x.jpg"):
        write_jpeg(tmp_path / name, 1)
    with write_session(engine) as s:
        root, _ = library.ensure_root(s, tmp_path)
        for name in ("keep.jpg", "gone.jpg", "appeared-later.jpg", "locked/x.jpg", "locked/y.jpg"):
            library.upsert_seen_file(s, root, name, 1, 1)
    with write_session(engine) as s:
        removed = library.remove_missing(s, root, {"keep.jpg"}, keep_under=["locked"])
    assert removed == ["gone.jpg"]
    with read_session(engine) as s:
        assert sorted(s.scalars(select(Photo.relpath))) == [
            "appeared-later.jpg", "keep.jpg", "locked/x.jpg", "locked/y.jpg"]


def test_meta(engine):
    with write_session(engine) as s:
        assert library.get_meta(s, "k") is None
        library.set_meta(s, "k", "1")
        library.set_meta(s, "k", "2")
    with read_session(engine) as s:
        assert library.get_meta(s, "k") == "2"
