"""The read-only commands (search, tags, show, status) through the real CLI on a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from daemon.cli import COMMANDS, main
from test_query import build_library


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    url, root1, root2 = build_library(tmp_path_factory.mktemp("cli"))
    return url, root1, root2


def run(lib, *args: str):
    url = lib[0]
    return CliRunner().invoke(main, ["--db", url, *args], catch_exceptions=False)


def lines(result) -> list[str]:
    assert result.exit_code == 0, result.stderr
    return result.stdout.splitlines()


def test_search_prints_one_absolute_path_per_line_sorted_by_path(lib):
    _, root1, root2 = lib
    assert lines(run(lib, "search", "cat")) == [
        str(root2 / "kitty.png"),  # "Other Album" sorts before "Photos"
        str(root1 / "2023/06/tabby.jpg"),
        str(root1 / "2023/08/cat_and_dog.jpg"),
    ]


def test_printed_paths_are_the_files_on_disk(lib):
    for line in lines(run(lib, "search")):
        assert Path(line).is_file()


def test_search_chinese_tag_and_negation_without_double_dash(lib):
    assert run(lib, "search", "猫").stdout == run(lib, "search", "cat").stdout
    _, root1, _ = lib
    assert lines(run(lib, "search", "animal", "-dog", "-cat")) == [
        str(root1 / "trips/2023-Rome/bat.jpg")]
    assert lines(run(lib, "search", "--", "animal", "-dog", "-cat")) == [
        str(root1 / "trips/2023-Rome/bat.jpg")]


def test_negated_terms_are_not_taken_for_short_options(lib):
    """-h is --help and -0 is --null, yet -horse and -0cat are the terms "not horse" and "not 0cat"."""
    result = run(lib, "search", "animal", "-horse")
    assert result.exit_code == 1 and "unknown tag 'horse'" in result.stderr
    result = run(lib, "search", "animal", "-0cat")
    assert result.exit_code == 1 and "unknown tag '0cat'" in result.stderr
    _, root1, root2 = lib
    # options anywhere among the terms, with their values; a term after -- may look like one
    assert lines(run(lib, "search", "tabby", "--limit", "1", "-cat", "--sort=path-")) == []
    assert lines(run(lib, "search", "tabby", "--limit=1", "--sort", "path-")) == [
        str(root1 / "2023/06/tabby.jpg")]
    result = run(lib, "search", "-0", "--", "tabby", "--json")
    assert result.exit_code == 2 and "at term 2 '--json': double negation" in result.stderr


def test_or_and_sort_terms_on_the_command_line(lib):
    _, root1, _ = lib
    out = lines(run(lib, "search", "dog", ",", "car", "date-"))
    assert out == [str(root1 / p) for p in (
        "recent.jpg", "2023/08/cat_and_dog.jpg", "2023/07/beagle.jpg", "2022/Car.JPG")]


def test_sort_option_and_limit(lib):
    _, root1, root2 = lib
    assert lines(run(lib, "search", "--sort", "score", "--limit", "2", "animal")) == [
        str(root2 / "kitty.png"), str(root1 / "2023/06/tabby.jpg")]
    assert lines(run(lib, "search", "--sort", "date+", "--limit", "1", "animal")) == [
        str(root2 / "kitty.png")]
    result = run(lib, "search", "--sort", "size", "cat")
    assert result.exit_code == 2 and "unknown sort key 'size'" in result.stderr


def test_nul_separated_output(lib):
    _, root1, root2 = lib
    result = run(lib, "search", "-0", "tabby")
    assert result.exit_code == 0
    assert result.stdout_bytes == (os.fsencode(root2 / "kitty.png") + b"\0"
                                   + os.fsencode(root1 / "2023/06/tabby.jpg") + b"\0")


def test_thousands_of_paths_are_printed_whole_and_in_order(tmp_path):
    """Paths are written a thousand at a time: none lost or cut at a chunk's edge, non-ASCII
    names encoded as on disk, newline- or NUL-terminated."""
    from storage import library
    from storage.db import write_session
    from storage.migrate import open_for_write

    url = f"sqlite:///{tmp_path / 'many.db'}"
    engine = open_for_write(url)
    relpaths = [f"{year}/été {i:05d}.jpg" for year in (2022, 2023) for i in range(1250)]
    with write_session(engine) as session:
        root, _ = library.ensure_root(session, tmp_path / "album")
        library.add_new_files(session, root, [(relpath, 1, 1) for relpath in reversed(relpaths)])
    engine.dispose()
    album = (tmp_path / "album").resolve()
    expected = [os.fsencode(album / relpath) for relpath in relpaths]  # sorted by path
    for flag, end in ((), b"\n"), (("-0",), b"\0"):
        result = run((url,), "search", *flag)
        assert result.exit_code == 0, result.stderr
        assert result.stdout_bytes == b"".join(path + end for path in expected)


def test_json_output(lib):
    _, root1, root2 = lib
    result = run(lib, "search", "--json", "cat", "score-")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["path"] for r in records] == [
        str(root2 / "kitty.png"), str(root1 / "2023/06/tabby.jpg"),
        str(root1 / "2023/08/cat_and_dog.jpg")]
    kitty = records[0]
    assert kitty["score"] == 1.0
    assert kitty["taken_at"] == "2021-12-31T23:59:59"
    assert kitty["status"] == "tagged" and kitty["relpath"] == "kitty.png"
    assert kitty["tags"] == [
        {"name": "tabby", "zh": "虎斑猫", "score": 1.0, "source": "user"},
        {"name": "cat", "zh": "猫", "score": 0.65, "source": "model"},
    ]
    assert json.loads(run(lib, "search", "--json", "person").stdout) == []


def test_format_fields_and_escapes(lib):
    result = run(lib, "search", "--format", r"{relpath}\t{score:.2f}\t{date}\t{tags}\t{name}",
                 "dog", "score-")
    assert lines(result) == [
        "2023/07/beagle.jpg\t0.72\t2023-07-05\tbeagle,car\tbeagle.jpg",
        "2023/08/cat_and_dog.jpg\t0.55\t2023-08-31\tdog,cat\tcat_and_dog.jpg",
    ]
    result = run(lib, "search", "--format", "{status} {taken_at!r}", "status:error")
    assert lines(result) == ["error ''"]


@pytest.mark.parametrize("args, message", [
    (["--format", "{size}"], "unknown field 'size'"),
    (["--format", "{path"], "--format"),
    (["--format", "{score:d}"], "--format"),
    (["--json", "-0"], "cannot be combined"),
    (["--limt", "3"], "No such option '--limt'. Did you mean '--limit'?"),
])
def test_bad_output_options_exit_2(lib, args, message):
    result = run(lib, "search", *args, "dog")
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_malformed_query_exits_2_naming_the_term(lib):
    result = run(lib, "search", "cat", "score:abc")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == ("phototag: error: bad query 'cat score:abc': at term 2 'score:abc': "
                             "'abc' is not a number\n")
    for query, fragment in [(["date:2023-13"], "at term 1 'date:2023-13': "),
                            (["cat", "foo:bar"], "at term 2 'foo:bar': unknown field 'foo'"),
                            (["cat", ","], "at term 2 ',': ',' at the end")]:
        result = run(lib, "search", *query)
        assert result.exit_code == 2 and fragment in result.stderr
        assert result.stderr.count("\n") == 1


def test_unknown_tag_exits_1_with_suggestions(lib):
    result = run(lib, "search", "catt")
    assert result.exit_code == 1
    assert result.stderr.startswith("phototag: error: unknown tag 'catt'; did you mean: cat")
    assert result.stdout == ""


def test_no_match_is_not_an_error(lib):
    result = run(lib, "search", "person")
    assert result.exit_code == 0 and result.stdout == ""


def test_tags_lists_counts_with_chinese_and_broader_tags(lib):
    out = lines(run(lib, "tags"))
    assert out[0].split() == ["3", "car", "汽车"]
    assert "2  cat  猫  (< animal, pet)" in [line.strip() for line in out]
    assert not any(" person " in f" {line} " for line in out)  # no photos: listed with --all
    records = json.loads(run(lib, "tags", "--all", "--json").stdout)
    by_name = {r["name"]: r for r in records}
    assert by_name["person"] == {"name": "person", "zh": "人", "photos": 0, "broader": []}
    assert by_name["tabby"] == {"name": "tabby", "zh": "虎斑猫", "photos": 2, "broader": ["cat"]}
    assert by_name["cat"]["photos"] == 2 and by_name["animal"]["photos"] == 0


def test_show_resolves_a_relative_file_name(lib, monkeypatch):
    _, root1, root2 = lib
    monkeypatch.chdir(root2)
    out = lines(run(lib, "show", "kitty.png"))
    assert out[0] == f"path:            {root2 / 'kitty.png'}"
    assert "status:          tagged" in out
    assert "mapping_version: 1" in out
    assert out[-3:] == ["tags:", "  1.000  tabby  虎斑猫  [user]", "  0.650  cat  猫"]
    info = json.loads(run(lib, "show", "--json", str(root1 / "broken.jpg")).stdout)
    assert info["status"] == "error" and info["error"] == "cannot identify image file"
    assert info["tags"] == []


def test_show_through_a_symlink(lib, tmp_path):
    _, root1, _ = lib
    link = tmp_path / "link.jpg"
    link.symlink_to(root1 / "2023/06/tabby.jpg")
    info = json.loads(run(lib, "show", "--json", str(link)).stdout)
    assert info["path"] == str(root1 / "2023/06/tabby.jpg")


def test_show_a_file_not_indexed_exits_1(lib, tmp_path):
    stray = tmp_path / "stray.jpg"
    stray.write_bytes(b"x")
    result = run(lib, "show", str(stray))
    assert result.exit_code == 1
    assert result.stderr == f"phototag: error: {stray}: not in the index (run `phototag index` on its album folder)\n"


def test_status(lib):
    _, root1, root2 = lib
    out = lines(run(lib, "status"))
    assert "photos:           9" in out
    assert "  tagged:         7" in out
    assert "pending queue:    1" in out
    assert "errors:           1 (1 due for retry)" in out
    assert f"album:            {root1} (8 photos)" in out
    assert "model:            resnet18 mapping 1 (7 photos)" in out
    assert "last tagged with: resnet18 mapping 1" in out
    assert "last nightly run: 2024-03-15T03:00:00Z" in out
    info = json.loads(run(lib, "status", "--json").stdout)
    assert info["by_status"] == {"pending": 1, "tagged": 7, "error": 1}
    assert info["database"].endswith("library.db")
    assert info["library_model"] == "resnet18" and info["last_nightly_run"].startswith("2024")
    assert info["albums"] == [{"path": str(root2), "photos": 1}, {"path": str(root1), "photos": 8}]


@pytest.mark.parametrize("command", [["search", "cat"], ["tags"], ["show", "x.jpg"], ["status"]])
def test_missing_database_says_how_to_create_it_and_creates_nothing(tmp_path, command):
    db = tmp_path / "none.db"
    result = CliRunner().invoke(main, ["--db", str(db), *command])
    assert result.exit_code == 1
    assert "phototag index" in result.stderr and str(db) in result.stderr
    assert not db.exists()


def in_a_fresh_interpreter(url: str, commands: list[list[str]], report: str):
    """Run the real CLI entry point for each of ``commands`` in one fresh interpreter, print
    their exit codes, then run ``report`` (code printing to stderr) on what got imported."""
    code = (
        "import sys\n"
        "from daemon.cli import main\n"
        "codes = []\n"
        f"for args in {commands!r}:\n"
        "    try:\n"
        f"        main(['--db', {url!r}, *args])\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "print('EXIT', codes, file=sys.stderr)\n"
    ) + report
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=120)


def test_read_only_commands_never_import_torch(lib):
    result = in_a_fresh_interpreter(
        lib[0], [["search", "cat", "--json"], ["tags"], ["status"], ["show", "x.jpg"]],
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('torch', 'torchvision', 'tagger', 'PIL', 'alembic'))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n")
    assert "EXIT [0, 0, 0, 1]" in result.stderr, result.stderr  # x.jpg is not in the index
    assert "kitty.png" in result.stdout  # the search really ran
    assert "HEAVY []" in result.stderr, result.stderr  # alembic too: the database is current
    assert "alembic" not in result.stderr  # no INFO lines from it either


def test_search_tags_and_status_use_sqlalchemy_core_only(lib):
    """The ORM's import is a sixth of `phototag search`'s start-up: these commands run without it
    (`show` may use it: it finds the photo the way the indexer files it)."""
    result = in_a_fresh_interpreter(
        lib[0], [["search", "cat", "--json"], ["tags"], ["status"]],
        "print('ORM', 'sqlalchemy.orm' in sys.modules, 'storage.models' in sys.modules,\n"
        "      file=sys.stderr)\n")
    assert "EXIT [0, 0, 0]" in result.stderr, result.stderr  # all three ran and succeeded
    assert "kitty.png" in result.stdout and "last nightly run:" in result.stdout
    assert "ORM False False" in result.stderr, result.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_listed_short_help_is_the_commands_own(name):
    """`phototag --help` shows the help kept in COMMANDS; it must not drift from the command's."""
    module_name, attribute = COMMANDS[name][0].split(":")
    module = pytest.importorskip(module_name, reason=f"{module_name} not written yet")
    command = getattr(module, attribute)
    for limit in (40, 64, 1000):
        listed = click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit)
        assert listed == command.get_short_help_str(limit)


def test_help_lists_every_command_without_importing_them():
    code = (
        "import sys\n"
        "from daemon.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('LOADED', sorted(m for m in sys.modules\n"
        "                       if m.startswith(('daemon.cmd_', 'sqlalchemy', 'storage'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=120, check=True)
    assert "LOADED []" in result.stdout
    listed = result.stdout.split("Commands:")[1].split("LOADED")[0]
    names = [line.split()[0] for line in listed.splitlines() if line[2:3].strip()]  # not wrapped
    assert names == list(COMMANDS)


@pytest.mark.parametrize("args", [["search", "cat"], ["search", "animal", "--json"], ["tags"]])
def test_a_reader_that_went_away_ends_the_command_quietly(lib, args):
    """`phototag search cat | head -1`: the pipe's reader is gone (here before the first write):
    exit 0, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        phototag = str(Path(sys.executable).parent / "phototag")
        result = subprocess.run([phototag, "--db", lib[0], *args], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
