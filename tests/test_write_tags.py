"""``phototag write-tags`` through the real CLI on a real database and real JPEGs (exiftool reads
them back), and keywords that ``phototag index`` and ``phototag search`` then see."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon import keyword_sync
from daemon.cli import main
from storage import library
from storage.db import write_session
from storage.keywords import sidecar_path
from test_keyword_sync import CAMERA, PHOTOS, exiftool_keywords, make_library

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None, reason="needs exiftool")

CAT_KEYWORDS = ["animal", "cat", "pet", "tabby"]


@pytest.fixture
def lib(tmp_path):
    lib = make_library(tmp_path, {"cat.jpg": PHOTOS / "cat.jpg",
                                  "trip/sony.jpg": CAMERA / "r_sony.jpg",
                                  "trip/canon.jpg": CAMERA / "r_canon.jpg",
                                  "trip/coffee.jpg": PHOTOS / "coffee.jpg"},
                       {"cat.jpg": {"tabby": 0.8, "cat": 0.9, "animal": 0.95, "pet": 0.6},
                        "trip/sony.jpg": {"sled": 0.7, "snow": 0.5},
                        "trip/canon.jpg": {"coffee": 0.9}})
    lib.config = tmp_path / "config.toml"
    lib.config.write_text("")
    yield lib
    lib.engine.dispose()


def run(lib, *args: str):
    return CliRunner().invoke(main, ["--config", str(lib.config), "--db", lib.url, *args],
                              catch_exceptions=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_sidecar_mode_writes_sidecars_exiftool_reads(lib):
    photos_before = snapshot(lib.root)
    result = run(lib, "write-tags", "--mode", "sidecar")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["keywords: 3 written, 0 failed (sidecar)"]
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    cat = exiftool_keywords(sidecar_path(lib.files["cat.jpg"], "append"))
    assert sorted(cat["subject"]) == CAT_KEYWORDS
    assert "phototag|animal|cat|tabby" in cat["hierarchical"]
    assert exiftool_keywords(sidecar_path(lib.files["trip/canon.jpg"], "append"))[
        "subject"] == ["coffee"]
    assert not sidecar_path(lib.files["trip/coffee.jpg"], "append").exists()  # not tagged
    after = snapshot(lib.root)
    assert {k: v for k, v in after.items() if not k.endswith(".xmp")} == photos_before


def test_mode_and_sidecar_name_come_from_the_config(lib):
    lib.config.write_text('[metadata]\nwrite = "sidecar"\nsidecar_name = "replace"\n')
    assert run(lib, "write-tags").exit_code == 0
    side = sidecar_path(lib.files["cat.jpg"], "replace")
    assert side.name == "cat.xmp"
    assert sorted(exiftool_keywords(side)["subject"]) == CAT_KEYWORDS


def test_writing_off_and_no_mode_is_a_one_line_error(lib):
    result = run(lib, "write-tags")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "phototag: error: keyword writing is off: pass --mode sidecar|embedded, "
        "or set [metadata] write in the config"]
    assert not any(p.suffix == ".xmp" for p in lib.root.rglob("*"))


def test_path_limits_the_photos_written(lib):
    result = run(lib, "write-tags", "--mode", "sidecar", str(lib.root / "trip"))
    assert result.exit_code == 0, result.output
    assert "2 written" in result.stdout
    assert sidecar_path(lib.files["trip/sony.jpg"], "append").is_file()
    assert not sidecar_path(lib.files["cat.jpg"], "append").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(lib):
    before = snapshot(lib.root)
    db_before = lib.photo("cat.jpg")
    result = run(lib, "write-tags", "--mode", "embedded", "--dry-run")
    assert result.exit_code == 0, result.output
    cat, sony = lib.files["cat.jpg"], lib.files["trip/sony.jpg"]
    lines = result.stdout.splitlines()
    assert (f"{cat} -> {cat}: phototag|animal, phototag|animal|cat, "
            f"phototag|animal|cat|tabby, phototag|pet") in lines
    # sled's path follows the shipped mapping's first broader tag (snow), not the longer chain
    assert f"{sony} -> {sony}: phototag|snow|sled, phototag|snow" in lines
    assert lines[-1] == "dry run: 3 photos would be written"
    assert snapshot(lib.root) == before
    after = lib.photo("cat.jpg")
    assert (after.written_keywords, after.keywords_written_at) == (None, None)
    assert after.size == db_before.size


def test_dry_run_sidecar_names_the_sidecar(lib):
    result = run(lib, "write-tags", "--mode", "sidecar", "--dry-run", str(lib.files["cat.jpg"]))
    cat = lib.files["cat.jpg"]
    assert result.stdout.splitlines()[0].startswith(f"{cat} -> {cat}.xmp: phototag|animal")


def test_embedded_rewrite_replaces_only_ours_and_keeps_a_users_keyword(lib):
    sony = lib.files["trip/sony.jpg"]
    assert run(lib, "write-tags", "--mode", "embedded").exit_code == 0
    assert sorted(exiftool_keywords(sony)["subject"]) == ["sled", "snow"]
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-charset", "utf8",
                    "-XMP-dc:Subject+=Oma", str(sony)], check=True)
    # What the indexer does with the user's edit: the file changed, so it is tagged again.
    st = sony.stat()
    with write_session(lib.engine) as s:
        library.mark_changed(s, lib.photo("trip/sony.jpg").id, st.st_size, st.st_mtime_ns)
    lib.tag("trip/sony.jpg", {"coffee": 0.9})
    result = run(lib, "write-tags", "--mode", "embedded", str(sony))
    assert result.exit_code == 0, result.output
    seen = exiftool_keywords(sony)
    assert sorted(seen["subject"]) == ["Oma", "coffee"]
    assert seen["hierarchical"] == ["phototag|coffee"]
    assert sorted(";".join(seen["xp"]).split(";")) == ["Oma", "coffee"]  # EXIF XPKeywords


def test_changed_photo_is_skipped_with_a_clear_line(lib):
    cat = lib.files["cat.jpg"]
    os.utime(cat, ns=(cat.stat().st_atime_ns, cat.stat().st_mtime_ns + 5_000_000_000))
    before = cat.read_bytes()
    result = run(lib, "write-tags", "--mode", "embedded")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"phototag: {cat}: photo changed since it was tagged; not written"]
    assert result.stdout.splitlines() == ["keywords: 2 written, 1 failed (embedded)"]
    assert cat.read_bytes() == before
    assert exiftool_keywords(lib.files["trip/canon.jpg"])["subject"] == ["coffee"]


def test_read_only_photo_is_one_error_line_and_the_others_are_written(lib):
    sony = lib.files["trip/sony.jpg"]
    before = sony.read_bytes()
    sony.chmod(0o444)
    try:
        result = run(lib, "write-tags", "--mode", "embedded")
    finally:
        sony.chmod(0o644)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"phototag: {sony}: photo is read-only; not written"]
    assert "2 written, 1 failed" in result.stdout
    assert sony.read_bytes() == before
    assert sorted(exiftool_keywords(lib.files["cat.jpg"])["subject"]) == CAT_KEYWORDS


def test_bad_config_mode_is_refused(lib):
    result = run(lib, "write-tags", "--mode", "xmp")
    assert result.exit_code == 2 and "'xmp' is not one of" in result.stderr


def test_write_tags_never_imports_torch(lib):
    code = ("import sys\nfrom daemon.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code, "--config", str(lib.config), "--db", lib.url,
                    "write-tags", "--mode", "sidecar"], check=True, capture_output=True)
    assert sidecar_path(lib.files["cat.jpg"], "append").is_file()


def test_imported_user_keywords_are_searchable(lib):
    sony = lib.files["trip/sony.jpg"]
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-charset", "utf8",
                    "-XMP-dc:Subject+=Großmutter", "-XPKeywords=海滩", str(sony)], check=True)
    photo_id = lib.photo("trip/sony.jpg").id
    with write_session(lib.engine) as s:
        assert sorted(keyword_sync.import_keywords(s, photo_id, sony)) == ["Großmutter", "海滩"]
    for keyword in ("Großmutter", "großmutter", "海滩"):
        result = run(lib, "search", keyword)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [str(sony)]


# --- with the real indexer ------------------------------------------------------------------


def test_embedded_write_is_not_taken_for_an_edit_by_the_next_index(tmp_path, resnet18_weights):
    album = tmp_path / "album"
    album.mkdir()
    for name in ("r_sony.jpg", "r_canon.jpg", "r_olympus.jpg"):
        shutil.copy2(CAMERA / name, album / name)
    db = tmp_path / "phototag.db"
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nweights = "{resnet18_weights}"\nbatch_size = 4\n')

    def cli(*args: str):
        result = CliRunner().invoke(main, ["--config", str(config), "--db", str(db), *args],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    assert cli("index", str(album)).stdout.startswith("indexed: 3 new")
    with sqlite3.connect(db) as con:
        # Whatever the random-weight model found, every photo gets at least one known tag.
        con.execute("INSERT OR IGNORE INTO photo_tag (photo_id, tag_id, source, score) "
                    "SELECT photo.id, tag.id, 'model', 0.5 FROM photo, tag "
                    "WHERE tag.name = 'cat'")
        before = {r[0]: r[1:] for r in con.execute(
            "SELECT relpath, size, tagged_at, content_hash FROM photo")}
    sizes = {name: (album / name).stat().st_size for name in before}

    result = cli("write-tags", "--mode", "embedded")
    assert result.stdout.splitlines()[-1] == "keywords: 3 written, 0 failed (embedded)"
    for name in before:
        assert "cat" in exiftool_keywords(album / name)["subject"]
        assert (album / name).stat().st_size != sizes[name]

    assert "0 new, 0 changed, 0 moved, 0 removed, 0 failed, 3 unchanged" in \
        cli("index", str(album)).stdout
    with sqlite3.connect(db) as con:
        after = {r[0]: r[1:] for r in con.execute(
            "SELECT relpath, size, tagged_at, content_hash, status FROM photo")}
    for name, (size, tagged_at, content_hash, status) in after.items():
        assert size == (album / name).stat().st_size
        assert tagged_at == before[name][1] and status == "tagged"  # not tagged again
        assert content_hash == hashlib.sha256((album / name).read_bytes()).hexdigest()
        assert content_hash != before[name][2]


def test_a_photo_that_lost_all_its_tags_loses_our_keywords(lib):
    cat = lib.files["cat.jpg"]
    subprocess.run(["exiftool", "-q", "-XMP-dc:Subject=Oma", "-o",
                    str(sidecar_path(cat, "append")), str(cat)], check=True)
    assert run(lib, "write-tags", "--mode", "sidecar").exit_code == 0
    assert sorted(exiftool_keywords(sidecar_path(cat, "append"))["subject"]) == [
        "Oma", *CAT_KEYWORDS]
    lib.tag("cat.jpg", {})  # re-tagged (e.g. a new model) and nothing is sure enough now
    result = run(lib, "write-tags", "--mode", "sidecar", str(cat))
    assert result.exit_code == 0 and "1 written" in result.stdout
    seen = exiftool_keywords(sidecar_path(cat, "append"))
    assert (seen["subject"], seen["hierarchical"]) == (["Oma"], [])
    assert lib.photo("cat.jpg").written_keywords == "[]"
    # Nothing of ours left: the next backfill leaves the photo alone.
    assert "0 written" in run(lib, "write-tags", "--mode", "sidecar", str(cat)).stdout
