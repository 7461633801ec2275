"""daemon.keyword_sync on a real SQLite library and real JPEGs, read back with exiftool."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon import keyword_sync
from daemon.config import MetadataConfig
from storage import library
from storage.db import read_session, write_session
from storage.keywords import KeywordWriteError, sidecar_path
from storage.migrate import open_for_write
from storage.models import SOURCE_KEYWORD, SOURCE_MODEL, Photo, PhotoTag, Tag

FIXTURES = Path(__file__).parent / "fixtures"
CAMERA = FIXTURES / "camera"
PHOTOS = FIXTURES / "photos"

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="needs exiftool")


@dataclass
class TagInfo:
    """What library.sync_tags reads from tagger.labels.TagInfo."""

    name: str
    zh: str | None = None
    broader: tuple[str, ...] = ()


@dataclass
class Scored:
    name: str
    score: float
    zh: str | None = None


# A small hierarchy like the label mapping's: cat has two broader tags, sled a chain.
MAPPING = [
    TagInfo("animal", "动物"),
    TagInfo("pet", "宠物"),
    TagInfo("cat", "猫", ("animal", "pet")),
    TagInfo("tabby", "虎斑猫", ("cat",)),
    TagInfo("sports", "运动"),
    TagInfo("snow", "雪"),
    TagInfo("winter sports", "冬季运动", ("sports", "snow")),
    TagInfo("sled", "雪橇", ("snow", "winter sports")),
    TagInfo("coffee", "咖啡"),
]


@dataclass
class Library:
    url: str
    root: Path
    engine: object
    files: dict[str, Path] = field(default_factory=dict)

    def photo(self, name: str) -> Photo:
        with read_session(self.engine) as s:
            root, relpath = library.locate(s, self.files[name])
            photo = library.photo_at(s, root, relpath)
            s.expunge(photo)  # a snapshot that outlives the read transaction
            return photo

    def tag(self, name: str, tags: dict[str, float]) -> None:
        """Store model tags for an indexed photo the way the indexer does (store_result)."""
        path = self.files[name]
        with write_session(self.engine) as s:
            root, relpath = library.locate(s, path)
            photo = library.photo_at(s, root, relpath)
            job = library.Job(photo.id, root.id, relpath, path, photo.size, photo.mtime_ns,
                              photo.content_hash)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert library.store_result(
                s, job, [Scored(n, v) for n, v in tags.items()], model="resnet18",
                mapping_version="test", width=None, height=None, taken_at=None,
                content_hash=digest)


def make_library(tmp_path: Path, files: dict[str, Path],
                 tags: dict[str, dict[str, float]] | None = None) -> Library:
    """Copies of real photos in an album, indexed into a migrated database and tagged."""
    root = tmp_path / "album"
    root.mkdir(exist_ok=True)
    lib = Library(f"sqlite:///{tmp_path / 'library.db'}", root, None)
    lib.engine = open_for_write(lib.url)
    with write_session(lib.engine) as s:
        library.sync_tags(s, MAPPING)
        album, _ = library.ensure_root(s, root)
        for relpath, source in files.items():
            dest = root / relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
            st = dest.stat()
            library.upsert_seen_file(s, album, relpath, st.st_size, st.st_mtime_ns)
            lib.files[relpath] = dest
    for relpath, scores in (tags or {}).items():
        lib.tag(relpath, scores)
    return lib


@pytest.fixture
def lib(tmp_path):
    lib = make_library(tmp_path, {"cat.jpg": PHOTOS / "cat.jpg",
                                  "trip/sony.jpg": CAMERA / "r_sony.jpg",
                                  "trip/coffee.jpg": PHOTOS / "coffee.jpg"},
                       {"cat.jpg": {"tabby": 0.8, "cat": 0.9, "animal": 0.95, "pet": 0.6},
                        "trip/sony.jpg": {"sled": 0.7, "snow": 0.5}})
    yield lib
    lib.engine.dispose()


def exiftool_keywords(path: Path) -> dict[str, list[str]]:
    out = subprocess.run(
        ["exiftool", "-j", "-charset", "utf8", "-XMP-dc:Subject", "-XMP-lr:HierarchicalSubject",
         "-XPKeywords", str(path)], capture_output=True, check=True).stdout
    found = json.loads(out)[0]
    as_list = (lambda v: [] if v is None else [str(x) for x in v] if isinstance(v, list)
               else [str(v)])
    return {"subject": as_list(found.get("Subject")),
            "hierarchical": as_list(found.get("HierarchicalSubject")),
            "xp": as_list(found.get("XPKeywords"))}


def test_tag_paths_follow_the_longest_broader_chain(lib):
    with read_session(lib.engine) as s:
        ids = library.tag_ids(s)
        paths = keyword_sync.tag_paths(s)
    assert paths[ids["animal"]] == ("animal",)
    assert paths[ids["cat"]] == ("animal", "cat")  # animal and pet tie: the first name wins
    assert paths[ids["tabby"]] == ("animal", "cat", "tabby")
    # sled: via winter sports (itself under snow and sports, tied: snow) beats straight via snow
    assert paths[ids["sled"]] == ("snow", "winter sports", "sled")


def test_tag_paths_follow_the_mapping_order_of_broader_tags(lib):
    order = keyword_sync.broader_order(MAPPING)
    assert order["cat"] == ("animal", "pet")
    reversed_order = {name: tuple(reversed(b)) for name, b in order.items()}
    with read_session(lib.engine) as s:
        ids = library.tag_ids(s)
        paths = keyword_sync.tag_paths(s, order)
        flipped = keyword_sync.tag_paths(s, reversed_order)
    assert paths[ids["cat"]] == ("animal", "cat")
    assert paths[ids["sled"]] == ("snow", "sled")  # the mapping's first, though shorter
    assert paths[ids["tabby"]] == ("animal", "cat", "tabby")
    assert flipped[ids["cat"]] == ("pet", "cat")
    assert flipped[ids["sled"]] == ("snow", "winter sports", "sled")  # reversed: snow, sports
    # A broader tag the database does not know (an older mapping) is passed over.
    stale = {"cat": ("mammal", "pet", "animal")}
    with read_session(lib.engine) as s:
        assert keyword_sync.tag_paths(s, stale)[ids["cat"]] == ("pet", "cat")


def test_tag_paths_with_the_shipped_label_mapping(lib):
    from tagger.labels import load_label_map

    labels = load_label_map()
    with write_session(lib.engine) as s:
        library.sync_tags(s, labels.all_tags())
    with read_session(lib.engine) as s:
        by_name = {path[-1]: path for path in
                   keyword_sync.tag_paths(s, keyword_sync.broader_order(labels.all_tags()))
                   .values()}
    for name in ("snowmobile", "rv", "tractor"):
        assert by_name[name][-2] == "vehicle", by_name[name]
    assert by_name["beagle"][-2:] == ("dog", "beagle")
    shipped = {t.name for t in labels.all_tags()}
    for path in (p for name, p in by_name.items() if name in shipped):
        for narrower, broader in zip(path[1:], path):  # a chain of the mapping's edges
            assert broader in labels.tag(narrower).broader


def test_tag_paths_survive_a_cycle(lib):
    with write_session(lib.engine) as s:
        library.sync_tags(s, [TagInfo("a", None, ("b",)), TagInfo("b", None, ("a",))])
    with read_session(lib.engine) as s:
        ids = library.tag_ids(s)
        paths = keyword_sync.tag_paths(s)
    assert paths[ids["a"]] == ("b", "a") and paths[ids["b"]] == ("a", "b")


def test_sidecar_write_records_the_keywords_it_owns(lib):
    cat = lib.files["cat.jpg"]
    before = cat.read_bytes()
    written = keyword_sync.write_photo(lib.engine, lib.photo("cat.jpg").id, mode="sidecar",
                                       sidecar_name="append")
    assert written.target == sidecar_path(cat, "append")
    assert cat.read_bytes() == before
    seen = exiftool_keywords(written.target)
    assert sorted(seen["subject"]) == ["animal", "cat", "pet", "tabby"]
    assert sorted(seen["hierarchical"]) == [
        "phototag|animal", "phototag|animal|cat", "phototag|animal|cat|tabby", "phototag|pet"]
    photo = lib.photo("cat.jpg")
    assert sorted(json.loads(photo.written_keywords)) == ["animal", "cat", "pet", "tabby"]
    assert photo.keywords_written_at >= photo.tagged_at
    assert (photo.size, photo.mtime_ns) == (cat.stat().st_size, cat.stat().st_mtime_ns)


def test_embedded_write_updates_size_and_hash_keeps_mtime(lib):
    sony = lib.files["trip/sony.jpg"]
    old = lib.photo("trip/sony.jpg")
    keyword_sync.write_photo(lib.engine, old.id, mode="embedded", sidecar_name="append")
    st = sony.stat()
    photo = lib.photo("trip/sony.jpg")
    assert st.st_size != old.size and st.st_mtime_ns == old.mtime_ns
    assert (photo.size, photo.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert photo.content_hash == hashlib.sha256(sony.read_bytes()).hexdigest()
    assert photo.status == "tagged"
    seen = exiftool_keywords(sony)
    assert sorted(seen["subject"]) == ["sled", "snow"]
    assert sorted(seen["hierarchical"]) == ["phototag|snow",
                                            "phototag|snow|winter sports|sled"]
    # The scanner's own test: the row still describes the file, so nothing is re-queued.
    with write_session(lib.engine) as s:
        root, relpath = library.locate(s, sony)
        _, change = library.upsert_seen_file(s, root, relpath, st.st_size, st.st_mtime_ns)
    assert change is library.Change.UNCHANGED


class SimulatedCrash(BaseException):
    """Stands for the process being killed (SIGKILL, power cut): no except clause catches it."""


def crashed_write(lib, monkeypatch, name: str, mode: str = "embedded") -> Photo:
    """Write ``name``'s keywords and "kill" the writer just after the new file is renamed into
    place, before the write is recorded: the folder fsync that follows the rename is where it
    dies. Returns the photo's row from before."""
    import storage.keywords.atomic

    def die(_folder):
        raise SimulatedCrash

    before = lib.photo(name)
    monkeypatch.setattr(storage.keywords.atomic, "_fsync_dir", die)
    with pytest.raises(SimulatedCrash):
        keyword_sync.write_photo(lib.engine, before.id, mode=mode, sidecar_name="append")
    monkeypatch.undo()
    return before


@pytest.mark.parametrize("scanner", ["reconcile", "upsert_seen_file"])
def test_a_crash_between_rename_and_commit_is_still_our_write(lib, monkeypatch, scanner):
    """The photo on disk is our rewrite, its row still has the old size: a scanner (the start-up
    reconcile, or the watcher's check, upsert_seen_file) recognises the write as phototag's own
    (own_write, committed before the rename) and takes the new facts without queueing the photo
    to be tagged again."""
    from daemon import indexer
    from daemon.config import Config

    sony = lib.files["trip/sony.jpg"]
    old = crashed_write(lib, monkeypatch, "trip/sony.jpg")
    st = sony.stat()
    assert st.st_size != old.size and sorted(exiftool_keywords(sony)["subject"]) == ["sled", "snow"]
    row = lib.photo("trip/sony.jpg")
    assert row.size == old.size and row.own_write is not None  # the write was not recorded

    if scanner == "reconcile":
        done = indexer.reconcile(lib.engine, lib.root, indexer.photo_filter(Config()))
        assert done is not None
    else:
        with write_session(lib.engine) as s:
            root, relpath = library.locate(s, sony)
            _, change = library.upsert_seen_file(s, root, relpath, st.st_size, st.st_mtime_ns)
        assert change is library.Change.UNCHANGED
    photo = lib.photo("trip/sony.jpg")
    assert photo.status == "tagged" and photo.tagged_at == old.tagged_at  # not queued again
    assert (photo.size, photo.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert photo.content_hash == hashlib.sha256(sony.read_bytes()).hexdigest()
    assert photo.own_write is None


def test_a_write_after_a_crashed_one_takes_it_as_ours(lib, monkeypatch):
    """After a restart the daemon may write keywords again before any rescan: that write adopts
    the crashed one instead of refusing a "changed" photo, and a rescan then finds nothing."""
    from daemon import indexer
    from daemon.config import Config

    sony = lib.files["trip/sony.jpg"]
    old = crashed_write(lib, monkeypatch, "trip/sony.jpg")
    written = keyword_sync.write_photo(lib.engine, old.id, mode="embedded", sidecar_name="append")
    assert written is not None and sorted(written.keywords) == ["sled", "snow"]
    summary = indexer.Summary()
    indexer.reconcile(lib.engine, lib.root, indexer.photo_filter(Config()), summary=summary)
    photo = lib.photo("trip/sony.jpg")
    assert summary.changed == 0 and photo.status == "tagged" and photo.tagged_at == old.tagged_at
    assert (photo.size, photo.own_write) == (sony.stat().st_size, None)


@pytest.mark.parametrize("mode", ["embedded", "sidecar"])
def test_keywords_of_a_crashed_write_stay_ours(lib, monkeypatch, mode):
    """The keywords being written are recorded before the rename: after a crash they are still
    phototag's, so the next write (the photo re-tagged as coffee) replaces them, and they never
    come back as the user's own keywords."""
    sony = lib.files["trip/sony.jpg"]
    old = crashed_write(lib, monkeypatch, "trip/sony.jpg", mode)
    assert sorted(keyword_sync.previous_keywords(lib.photo("trip/sony.jpg"))) == ["sled", "snow"]
    lib.tag("trip/sony.jpg", {"coffee": 0.9})
    keyword_sync.write_photo(lib.engine, old.id, mode=mode, sidecar_name="append")
    target = sony if mode == "embedded" else sidecar_path(sony)
    assert exiftool_keywords(target)["subject"] == ["coffee"]
    with write_session(lib.engine) as s:
        assert keyword_sync.import_keywords(s, old.id, sony) == []


def test_after_a_crashed_write_a_users_edit_is_still_an_edit(lib, monkeypatch):
    """own_write names the file phototag wrote (size, hash, kept mtime): any other change (the
    user's own edit) queues the photo as usual, and clears own_write."""
    sony = lib.files["trip/sony.jpg"]
    crashed_write(lib, monkeypatch, "trip/sony.jpg")
    mtime = sony.stat().st_mtime_ns
    with open(sony, "ab") as f:
        f.write(b"\0" * 100)  # bytes after EOI: another file, same mtime as ours
    os.utime(sony, ns=(mtime, mtime))
    st = sony.stat()
    with write_session(lib.engine) as s:
        root, relpath = library.locate(s, sony)
        _, change = library.upsert_seen_file(s, root, relpath, st.st_size, st.st_mtime_ns)
    assert change is library.Change.CHANGED
    photo = lib.photo("trip/sony.jpg")
    assert photo.status == "pending" and photo.own_write is None


def test_mark_changed_leaves_a_row_that_already_has_the_files_facts(lib):
    """A rescan's stat can predate its write transaction: a row updated meanwhile to exactly
    those facts is not queued again."""
    photo = lib.photo("trip/sony.jpg")
    with write_session(lib.engine) as s:
        assert library.mark_changed(s, photo.id, photo.size, photo.mtime_ns) is False
        assert library.mark_changed(s, photo.id, photo.size + 1, photo.mtime_ns) is True
    assert lib.photo("trip/sony.jpg").status == "pending"


def test_retag_replaces_only_our_keywords_and_keeps_the_users(lib):
    sony = lib.files["trip/sony.jpg"]
    photo_id = lib.photo("trip/sony.jpg").id
    keyword_sync.write_photo(lib.engine, photo_id, mode="embedded", sidecar_name="append")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-charset", "utf8",
                    "-XMP-dc:Subject+=Oma", str(sony)], check=True)
    # The user's edit changed the file: the scanner re-queues it, the indexer re-tags it.
    st = sony.stat()
    with write_session(lib.engine) as s:
        library.mark_changed(s, photo_id, st.st_size, st.st_mtime_ns)
    lib.tag("trip/sony.jpg", {"coffee": 0.9})
    keyword_sync.write_photo(lib.engine, photo_id, mode="embedded", sidecar_name="append")
    seen = exiftool_keywords(sony)
    assert sorted(seen["subject"]) == ["Oma", "coffee"]
    assert seen["hierarchical"] == ["phototag|coffee"]
    assert json.loads(lib.photo("trip/sony.jpg").written_keywords) == ["coffee"]


def test_changed_photo_is_not_written_and_the_attempt_recorded(lib):
    cat = lib.files["cat.jpg"]
    with open(cat, "ab") as f:
        f.write(b"\0")  # edited after tagging, not yet re-indexed
    before = cat.read_bytes()
    photo_id = lib.photo("cat.jpg").id
    with pytest.raises(KeywordWriteError, match="changed since it was tagged"):
        keyword_sync.write_photo(lib.engine, photo_id, mode="embedded", sidecar_name="append")
    assert cat.read_bytes() == before
    photo = lib.photo("cat.jpg")
    assert photo.written_keywords is None and photo.keywords_written_at is not None
    with read_session(lib.engine) as s:
        assert photo_id not in keyword_sync.due_photo_ids(s)


def test_write_due_writes_newly_tagged_photos_once(lib):
    metadata = MetadataConfig(write="sidecar", sidecar_name="replace")
    summary = keyword_sync.write_due(lib.engine, metadata)
    assert (summary.written, summary.failed) == (2, 0)  # coffee.jpg is still pending
    assert sidecar_path(lib.files["cat.jpg"], "replace").is_file()
    assert not sidecar_path(lib.files["trip/coffee.jpg"], "replace").exists()
    assert keyword_sync.write_due(lib.engine, metadata).written == 0
    lib.tag("trip/coffee.jpg", {"coffee": 0.8})
    assert keyword_sync.write_due(lib.engine, metadata).written == 1
    assert exiftool_keywords(sidecar_path(lib.files["trip/coffee.jpg"], "replace"))[
        "subject"] == ["coffee"]


def test_write_due_is_a_no_op_when_writing_is_off(lib):
    assert keyword_sync.write_due(lib.engine, MetadataConfig()).written == 0
    assert not any(p.suffix == ".xmp" for p in lib.root.rglob("*"))


def test_write_photos_reports_each_failure_and_writes_the_rest(lib):
    cat = lib.files["cat.jpg"]
    cat.chmod(0o444)
    try:
        ids = [lib.photo("cat.jpg").id, lib.photo("trip/sony.jpg").id]
        warned: list[str] = []
        summary = keyword_sync.write_photos(lib.engine, ids, mode="embedded",
                                            sidecar_name="append", warn=warned.append)
    finally:
        cat.chmod(0o644)
    assert (summary.written, summary.failed) == (1, 1)
    assert warned == [f"{cat}: photo is read-only; not written"]
    assert "sled" in exiftool_keywords(lib.files["trip/sony.jpg"])["subject"]


def test_selected_photo_ids_under_a_folder_or_file(lib):
    with read_session(lib.engine) as s:
        every = keyword_sync.selected_photo_ids(s)
        trip = keyword_sync.selected_photo_ids(s, lib.root / "trip")
        one = keyword_sync.selected_photo_ids(s, lib.files["cat.jpg"])
        above = keyword_sync.selected_photo_ids(s, lib.root.parent)
    sony, cat = lib.photo("trip/sony.jpg").id, lib.photo("cat.jpg").id
    assert sorted(every) == sorted([cat, sony]) == sorted(above)  # untagged coffee left out
    assert trip == [sony] and one == [cat]


def test_import_keywords_become_keyword_tags_without_our_own(lib):
    sony = lib.files["trip/sony.jpg"]
    photo_id = lib.photo("trip/sony.jpg").id
    keyword_sync.write_photo(lib.engine, photo_id, mode="embedded", sidecar_name="append")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-charset", "utf8",
                    "-XMP-dc:Subject+=Oma", "-XMP-dc:Subject+=Cat", "-XMP-dc:Subject+=雪",
                    str(sony)], check=True)
    with write_session(lib.engine) as s:
        names = keyword_sync.import_keywords(s, photo_id, sony)
    # "Cat" is the mapping's "cat" (case ignored), "雪" is snow's Chinese name; "Oma" is new.
    assert sorted(names) == ["Oma", "cat", "snow"]
    with read_session(lib.engine) as s:
        rows = s.execute(select(Tag.name, Tag.from_mapping, PhotoTag.source)
                         .join(PhotoTag, PhotoTag.tag_id == Tag.id)
                         .where(PhotoTag.photo_id == photo_id)).all()
    assert sorted(r for r in rows if r[2] == SOURCE_KEYWORD) == [
        ("Oma", False, SOURCE_KEYWORD), ("cat", True, SOURCE_KEYWORD),
        ("snow", True, SOURCE_KEYWORD)]
    assert sorted(r[0] for r in rows if r[2] == SOURCE_MODEL) == ["sled", "snow"]
    # Importing again replaces the keyword rows: a keyword the user removed goes.
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Subject-=Oma", str(sony)],
                   check=True)
    with write_session(lib.engine) as s:
        assert sorted(keyword_sync.import_keywords(s, photo_id, sony)) == ["cat", "snow"]


def test_import_keywords_from_a_sidecar_of_a_photo_never_written(lib):
    cat = lib.files["cat.jpg"]
    subprocess.run(["exiftool", "-q", "-charset", "utf8", "-XMP-dc:Subject=Großmutter",
                    "-o", str(sidecar_path(cat, "append")), str(cat)], check=True)
    photo_id = lib.photo("cat.jpg").id
    with write_session(lib.engine) as s:
        assert keyword_sync.import_keywords(s, photo_id, cat) == ["Großmutter"]


def test_bad_written_keywords_json_is_treated_as_empty(lib):
    photo_id = lib.photo("cat.jpg").id
    with write_session(lib.engine) as s:
        s.get(Photo, photo_id).written_keywords = "not json"
    written = keyword_sync.write_photo(lib.engine, photo_id, mode="sidecar",
                                       sidecar_name="append")
    assert sorted(written.keywords) == ["animal", "cat", "pet", "tabby"]


def test_a_tag_that_cannot_be_a_keyword_is_left_out(lib):
    with write_session(lib.engine) as s:
        library.sync_tags(s, [TagInfo("jeans/denim", None, ("coffee",))])
    lib.tag("trip/coffee.jpg", {"jeans/denim": 0.9, "coffee": 0.8})
    written = keyword_sync.write_photo(lib.engine, lib.photo("trip/coffee.jpg").id,
                                       mode="sidecar", sidecar_name="append")
    assert written.keywords == ["coffee"]
    assert exiftool_keywords(written.target)["hierarchical"] == ["phototag|coffee"]
