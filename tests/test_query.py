"""The search language: parsing (pure) and searching a real SQLite library built through the ORM."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.dialects import postgresql

from storage.db import make_engine, read_connection, write_session
from storage.migrate import open_for_write
from storage.models import (
    ERROR,
    PENDING,
    TAGGED,
    AlbumRoot,
    Meta,
    Photo,
    PhotoTag,
    Tag,
    TagParent,
)
from storage.query import (
    DateTerm,
    PathTerm,
    QueryError,
    ScoreTerm,
    SortKey,
    StatusTerm,
    TagIndex,
    TagTerm,
    UnknownTagError,
    build_select,
    parse_query,
    parse_sort,
    search,
)

NOW = datetime(2024, 3, 15, 12, 0, 0)


# ---------------------------------------------------------------- parsing (no database)

def test_terms_are_anded_and_a_lone_comma_separates_alternatives():
    q = parse_query(["cat", "dog", ",", "car"])
    assert q.alternatives == [[TagTerm("cat", index=0), TagTerm("dog", index=1)],
                              [TagTerm("car", index=3)]]
    assert parse_query("cat dog , car").alternatives == q.alternatives  # one string, shell-split


def test_comma_inside_a_word_is_part_of_the_tag_name_like_beets():
    assert parse_query(["cat,dog"]).alternatives == [[TagTerm("cat,dog", index=0)]]


def test_negation_with_caret_or_minus():
    q = parse_query(["animal", "^dog", "-cat"])
    assert q.alternatives[0][1] == TagTerm("dog", negated=True, index=1)
    assert q.alternatives[0][2] == TagTerm("cat", negated=True, index=2)


def test_tag_field_and_exact_tag():
    q = parse_query(["tag:cat", "tag:=cat", "猫"])
    assert q.alternatives[0] == [TagTerm("cat", index=0), TagTerm("cat", exact=True, index=1),
                                 TagTerm("猫", index=2)]


def test_sort_terms_are_taken_out_wherever_they_are():
    q = parse_query(["date-", "cat", "score+", ",", "dog", "path-"])
    assert q.sort == [SortKey("date", True), SortKey("score", False), SortKey("path", True)]
    assert q.alternatives == [[TagTerm("cat", index=1)], [TagTerm("dog", index=4)]]


def test_empty_query_matches_everything():
    q = parse_query([])
    assert q.alternatives == [] and q.sort == []


@pytest.mark.parametrize("text, low, high", [
    ("score:0.6..", 0.6, None),
    ("score:..0.3", None, 0.3),
    ("score:0.25..0.75", 0.25, 0.75),
    ("score:0.6", 0.6, None),  # a single number means "at least"
    ("score:1", 1.0, None),
])
def test_score_ranges(text, low, high):
    (term,) = parse_query([text]).alternatives[0]
    assert term == ScoreTerm(low, high, index=0)


@pytest.mark.parametrize("value, start, end", [
    ("2023", datetime(2023, 1, 1), datetime(2024, 1, 1)),
    ("2023-06", datetime(2023, 6, 1), datetime(2023, 7, 1)),
    ("2024-02", datetime(2024, 2, 1), datetime(2024, 3, 1)),  # leap year: through the 29th
    ("2023-06-05", datetime(2023, 6, 5), datetime(2023, 6, 6)),
    ("2023-06..2023-08", datetime(2023, 6, 1), datetime(2023, 9, 1)),  # June 1 through Aug 31
    ("2008..2010", datetime(2008, 1, 1), datetime(2011, 1, 1)),
    ("..2009", None, datetime(2010, 1, 1)),
    ("2008-12..", datetime(2008, 12, 1), None),
    ("2008-12-01T22", datetime(2008, 12, 1, 22), datetime(2008, 12, 1, 23)),
    ("2008-12-01T22:45..", datetime(2008, 12, 1, 22, 45), None),
    ("2008-12-01t22:45:20..2008-12-01T22:45:40",
     datetime(2008, 12, 1, 22, 45, 20), datetime(2008, 12, 1, 22, 45, 41)),
    ("-1w..", NOW - timedelta(days=7), None),
    ("-1w", NOW - timedelta(days=7), None),  # a lone relative date means "since then"
    ("-6w..-4w", NOW - timedelta(days=42), NOW - timedelta(days=28)),
    ("-2m..", NOW - timedelta(days=60), None),  # a month is 30 days, as in beets
    ("-1y..+3d", NOW - timedelta(days=365), NOW + timedelta(days=3)),
    ("..-10d", None, NOW - timedelta(days=10)),
])
def test_date_ranges(value, start, end):
    (term,) = parse_query([f"date:{value}"], now=NOW).alternatives[0]
    assert term == DateTerm(start, end, index=0)


def test_path_and_status_terms(tmp_path):
    q = parse_query(["path:2023/", f"^path:{tmp_path}", "path:~/Pictures", "status:ERROR"])
    assert q.alternatives[0] == [
        PathTerm("2023/", absolute=False, index=0),
        PathTerm(str(tmp_path), absolute=True, negated=True, index=1),
        PathTerm("~/Pictures", absolute=True, index=2),
        StatusTerm("error", index=3),
    ]


@pytest.mark.parametrize("terms, index, fragment", [
    (["cat", "dog", "score:abc"], 2, "'abc' is not a number"),
    (["score:1.5.."], 0, "outside 0..1"),
    (["score:0.8..0.2"], 0, "empty range"),
    (["score:.."], 0, "at least one end"),
    (["score:0.1..0.2..0.3"], 0, "one '..'"),
    (["^score:0.5.."], 0, "cannot be negated"),
    (["date:2023-13"], 0, "not a valid date"),
    (["date:2023-02-30"], 0, "not a valid date"),
    (["date:2023-06-01T25"], 0, "not a valid date"),
    (["cat", "date:June"], 1, "not a date"),
    (["date:2023..2022"], 0, "empty range"),
    (["date:-1x.."], 0, "not a date"),
    (["foo:bar"], 0, "unknown field 'foo'"),
    (["tag:"], 0, "needs a value"),
    (["tag:="], 0, "needs a tag name"),
    (["status:done"], 0, "unknown status"),
    (["^^cat"], 0, "double negation"),
    ([",", "cat"], 0, "at the start"),
    (["cat", ","], 1, "at the end"),
    (["cat", ",", ",", "dog"], 2, "after another ','"),
    (["cat", "date-", ","], 2, "at the end"),
])
def test_malformed_queries_name_the_term(terms, index, fragment):
    with pytest.raises(QueryError) as info:
        parse_query(terms, now=NOW)
    assert info.value.index == index
    assert info.value.term == terms[index]
    assert fragment in info.value.reason
    assert str(info.value).startswith(f"at term {index + 1} {terms[index]!r}: ")
    assert "\n" not in str(info.value)


def test_parse_sort():
    assert parse_sort("score") == SortKey("score", True)  # best first
    assert parse_sort("date") == SortKey("date", False)  # oldest first
    assert parse_sort("path") == SortKey("path", False)
    assert parse_sort("date-") == SortKey("date", True)
    assert parse_sort("score+") == SortKey("score", False)
    with pytest.raises(QueryError, match="unknown sort key 'size'"):
        parse_sort("size")


# ---------------------------------------------------------------- searching a real database

def build_library(tmp_path: Path) -> tuple[str, Path, Path]:
    """A migrated SQLite database with two album roots, real (tiny) files, a tag hierarchy
    (tabby < cat < animal, beagle < dog < animal, cat and dog < pet) and Chinese names.
    Returns (url, root1, root2)."""
    root1 = tmp_path / "Photos"
    root2 = tmp_path / "Other Album"
    url = f"sqlite:///{tmp_path / 'library.db'}"
    engine = open_for_write(url)
    photos = [
        # root, relpath, status, taken_at, {tag: score} or {(tag, source): score}
        (root1, "2023/06/tabby.jpg", TAGGED, datetime(2023, 6, 5, 10),
         {"tabby": 0.91, ("tabby", "keyword"): 1.0}),  # one tag from two sources
        (root1, "2023/07/beagle.jpg", TAGGED, datetime(2023, 7, 5), {"beagle": 0.72, "car": 0.2}),
        (root1, "2023/08/cat_and_dog.jpg", TAGGED, datetime(2023, 8, 31, 23, 30),
         {"cat": 0.40, "dog": 0.55}),
        (root1, "2022/Car.JPG", TAGGED, None, {"car": 0.95}),
        (root1, "trips/2023-Rome/bat.jpg", TAGGED, datetime(2024, 1, 15), {"bat": 0.3}),
        (root1, "recent.jpg", TAGGED, datetime.now() - timedelta(days=2), {"car": 0.5}),
        (root1, "inbox/new.jpg", PENDING, None, {}),
        (root1, "broken.jpg", ERROR, None, {}),
        (root2, "kitty.png", TAGGED, datetime(2021, 12, 31, 23, 59, 59),
         {"cat": 0.65, ("tabby", "user"): 1.0}),
    ]
    utc_now = datetime.now(UTC).replace(tzinfo=None)
    with write_session(engine) as s:
        ids = {}
        for root in (root1, root2):
            r = AlbumRoot(path=str(root), added_at=NOW)
            s.add(r)
            s.flush()
            ids[root] = r.id
        tags = {}
        for name, zh in [("animal", "动物"), ("cat", "猫"), ("tabby", "虎斑猫"), ("dog", "狗"),
                         ("beagle", "比格犬"), ("bat", "蝙蝠"), ("pet", "宠物"), ("car", "汽车"),
                         ("person", "人")]:
            tags[name] = Tag(name=name, zh=zh)
            s.add(tags[name])
        s.flush()
        for child, parent in [("cat", "animal"), ("tabby", "cat"), ("dog", "animal"),
                              ("beagle", "dog"), ("bat", "animal"), ("cat", "pet"),
                              ("dog", "pet")]:
            s.add(TagParent(tag_id=tags[child].id, parent_id=tags[parent].id))
        for root, relpath, status, taken_at, scores in photos:
            file = root / relpath
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(b"\xff\xd8 not really a jpeg")
            photo = Photo(root_id=ids[root], relpath=relpath, size=file.stat().st_size,
                          mtime_ns=file.stat().st_mtime_ns, taken_at=taken_at, status=status,
                          indexed_at=NOW,
                          error="cannot identify image file" if status == ERROR else None,
                          retry_at=utc_now - timedelta(hours=1) if status == ERROR else None,
                          model="resnet18" if status == TAGGED else None,
                          mapping_version="1" if status == TAGGED else None,
                          tagged_at=NOW if status == TAGGED else None)
            s.add(photo)
            s.flush()
            for key, score in scores.items():
                name, source = key if isinstance(key, tuple) else (key, "model")
                s.add(PhotoTag(photo_id=photo.id, tag_id=tags[name].id, score=score,
                               source=source))
        s.add(Meta(key="model", value="resnet18"))
        s.add(Meta(key="mapping_version", value="1"))
        s.add(Meta(key="last_nightly_run", value="2024-03-15T03:00:00Z"))
    engine.dispose()
    return url, root1, root2


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    url, root1, root2 = build_library(tmp_path_factory.mktemp("lib"))
    from storage.db import make_engine

    engine = make_engine(url)
    yield engine, root1, root2
    engine.dispose()


def found(library, *terms: str, **kwargs) -> list[str]:
    """Relative paths found (photos of the second root prefixed 'other:'), in result order."""
    engine, root1, root2 = library
    with read_connection(engine) as connection:
        hits = search(connection, list(terms), **kwargs)
    return [h.relpath if h.root == str(root1) else f"other:{h.relpath}" for h in hits]


def found_set(library, *terms: str) -> set[str]:
    return set(found(library, *terms))


CATS = {"2023/06/tabby.jpg", "2023/08/cat_and_dog.jpg", "other:kitty.png"}
DOGS = {"2023/07/beagle.jpg", "2023/08/cat_and_dog.jpg"}
ALL = {"2023/06/tabby.jpg", "2023/07/beagle.jpg", "2023/08/cat_and_dog.jpg", "2022/Car.JPG",
       "trips/2023-Rome/bat.jpg", "recent.jpg", "inbox/new.jpg", "broken.jpg", "other:kitty.png"}


def test_a_tag_finds_narrower_tags_transitively(library):
    assert found_set(library, "cat") == CATS  # tabby is narrower than cat
    assert found_set(library, "dog") == DOGS
    assert found_set(library, "animal") == CATS | DOGS | {"trips/2023-Rome/bat.jpg"}
    assert found_set(library, "pet") == CATS | DOGS  # a second parent
    assert found_set(library, "tabby") == {"2023/06/tabby.jpg", "other:kitty.png"}


def test_exact_tag_skips_narrower_tags(library):
    assert found_set(library, "tag:=cat") == {"2023/08/cat_and_dog.jpg", "other:kitty.png"}
    assert found_set(library, "tag:cat") == CATS


def test_names_are_case_insensitive_and_chinese_names_work(library):
    assert found_set(library, "CAT") == CATS
    assert found_set(library, "猫") == CATS
    assert found_set(library, "动物") == found_set(library, "animal")
    assert found_set(library, "tag:狗") == DOGS


def test_and_or_not_and_precedence(library):
    assert found_set(library, "cat", "dog") == {"2023/08/cat_and_dog.jpg"}
    assert found_set(library, "cat", ",", "dog") == CATS | DOGS
    # AND binds tighter than the comma: (cat AND dog) OR car
    assert found_set(library, "cat", "dog", ",", "car") == {
        "2023/08/cat_and_dog.jpg", "2023/07/beagle.jpg", "2022/Car.JPG", "recent.jpg"}
    assert found_set(library, "animal", "^dog") == CATS - {"2023/08/cat_and_dog.jpg"} | {
        "trips/2023-Rome/bat.jpg"}
    assert found_set(library, "animal", "-dog") == found_set(library, "animal", "^dog")
    # NOT alone returns everything else, untagged photos included (as in beets)
    assert found_set(library, "^animal") == ALL - CATS - DOGS - {"trips/2023-Rome/bat.jpg"}
    assert found_set(library, "^cat", "^dog", ",", "tabby") == (ALL - CATS - DOGS) | {
        "2023/06/tabby.jpg", "other:kitty.png"}
    # three alternatives: two found through the tag index, one checked photo by photo
    assert found_set(library, "tabby", ",", "dog", ",", "path:Rome", "^cat") == {
        "2023/06/tabby.jpg", "other:kitty.png", "trips/2023-Rome/bat.jpg"} | DOGS


def test_empty_query_finds_every_photo(library):
    assert found_set(library) == ALL


def test_score_range_applies_to_the_tag_terms(library):
    # cat_and_dog has cat at 0.40 only; kitty has cat 0.65 (and a user tabby 1.0)
    assert found_set(library, "cat", "score:0.6..") == {"2023/06/tabby.jpg", "other:kitty.png"}
    assert found_set(library, "cat", "score:0.5") == {"2023/06/tabby.jpg", "other:kitty.png"}
    assert found_set(library, "animal", "score:..0.45") == {
        "2023/08/cat_and_dog.jpg", "trips/2023-Rome/bat.jpg"}
    assert found_set(library, "dog", "score:0.5..0.6") == {"2023/08/cat_and_dog.jpg"}
    # with AND, each tag must reach the range: dog 0.55 but cat 0.40
    assert found_set(library, "cat", "dog", "score:0.5..") == set()
    # in a negated term: "no dog at 0.7 or more"
    assert found_set(library, "animal", "^dog", "score:0.7..") == {
        "2023/06/tabby.jpg", "other:kitty.png"}
    # a score range per alternative
    assert found_set(library, "cat", "score:0.9..", ",", "car", "score:..0.3") == {
        "2023/06/tabby.jpg", "other:kitty.png", "2023/07/beagle.jpg"}


def test_score_range_without_tag_terms_means_any_tag(library):
    assert found_set(library, "score:0.9..") == {
        "2023/06/tabby.jpg", "2022/Car.JPG", "other:kitty.png"}


def test_path_is_a_case_insensitive_substring_of_the_relative_path(library):
    assert found_set(library, "path:2023/") == {
        "2023/06/tabby.jpg", "2023/07/beagle.jpg", "2023/08/cat_and_dog.jpg"}
    assert found_set(library, "path:rome") == {"trips/2023-Rome/bat.jpg"}
    assert found_set(library, "path:car.jpg") == {"2022/Car.JPG"}
    assert found_set(library, "^path:2023") == ALL - {
        "2023/06/tabby.jpg", "2023/07/beagle.jpg", "2023/08/cat_and_dog.jpg",
        "trips/2023-Rome/bat.jpg"}
    # LIKE wildcards in the value are literal characters
    assert found_set(library, "path:%") == set()
    assert found_set(library, "path:_") == {"2023/08/cat_and_dog.jpg"}


def test_absolute_path_is_a_prefix_of_the_full_path(library):
    _, root1, root2 = library
    assert found_set(library, f"path:{root1}/2023/0") == {
        "2023/06/tabby.jpg", "2023/07/beagle.jpg", "2023/08/cat_and_dog.jpg"}
    assert found_set(library, f"path:{root2}") == {"other:kitty.png"}
    assert found_set(library, f"path:{root1.parent}/") == ALL  # a folder above both roots
    assert found_set(library, f"path:{str(root1).upper()}/TRIPS") == {"trips/2023-Rome/bat.jpg"}
    assert found_set(library, "path:/nowhere/at/all") == set()
    assert found_set(library, "cat", f"^path:{root2}") == CATS - {"other:kitty.png"}


def test_date_ranges_on_taken_at(library):
    assert found_set(library, "date:2023") == {
        "2023/06/tabby.jpg", "2023/07/beagle.jpg", "2023/08/cat_and_dog.jpg"}
    # June 1 through August 31, 23:30 on the 31st included
    assert found_set(library, "date:2023-07..2023-08") == {
        "2023/07/beagle.jpg", "2023/08/cat_and_dog.jpg"}
    assert found_set(library, "date:2023-08-31") == {"2023/08/cat_and_dog.jpg"}
    assert found_set(library, "date:..2022") == {"other:kitty.png"}  # 2021-12-31 23:59:59
    assert found_set(library, "date:2024..") == {"trips/2023-Rome/bat.jpg", "recent.jpg"}
    assert found_set(library, "date:-1w..") == {"recent.jpg"}
    # photos without a date never match a date term, so its negation includes them
    assert found_set(library, "^date:..2030") == {
        "2022/Car.JPG", "inbox/new.jpg", "broken.jpg"}


def test_status_field(library):
    assert found_set(library, "status:error") == {"broken.jpg"}
    assert found_set(library, "status:pending") == {"inbox/new.jpg"}
    assert found_set(library, "^status:tagged") == {"broken.jpg", "inbox/new.jpg"}


def test_sort_keys(library):
    assert found(library, "animal", "date+") == [
        "other:kitty.png", "2023/06/tabby.jpg", "2023/07/beagle.jpg",
        "2023/08/cat_and_dog.jpg", "trips/2023-Rome/bat.jpg"]
    assert found(library, "animal", "date-") == [
        "trips/2023-Rome/bat.jpg", "2023/08/cat_and_dog.jpg", "2023/07/beagle.jpg",
        "2023/06/tabby.jpg", "other:kitty.png"]
    # undated photos come last in either direction
    assert found(library, "car", "date-") == ["recent.jpg", "2023/07/beagle.jpg", "2022/Car.JPG"]
    assert found(library, "car", "date+") == ["2023/07/beagle.jpg", "recent.jpg", "2022/Car.JPG"]
    # score: the best score among the matched tags (kitty: user tabby 1.0)
    assert found(library, "cat", "score-") == [
        "other:kitty.png", "2023/06/tabby.jpg", "2023/08/cat_and_dog.jpg"]
    assert found(library, "dog", "score+") == ["2023/08/cat_and_dog.jpg", "2023/07/beagle.jpg"]
    # photos without any tag have no score and come last either way
    assert found(library, "score-")[0] == "other:kitty.png"
    assert found(library, "score-")[-2:] == ["broken.jpg", "inbox/new.jpg"]
    assert found(library, "score+")[0] == "trips/2023-Rome/bat.jpg"
    assert found(library, "score+")[-2:] == ["broken.jpg", "inbox/new.jpg"]
    assert found(library, "car", "path-") == ["recent.jpg", "2023/07/beagle.jpg", "2022/Car.JPG"]
    # --sort comes after the query's sort keys
    assert found(library, "car", sort=[SortKey("path", False)]) == [
        "2022/Car.JPG", "2023/07/beagle.jpg", "recent.jpg"]


def test_hit_score_is_the_best_matched_tag_score(library):
    engine, root1, _ = library
    with read_connection(engine) as connection:
        hits = {h.relpath: h for h in search(connection, ["dog", ",", "car"], with_score=True)}
    assert hits["2023/07/beagle.jpg"].score == pytest.approx(0.72)
    assert hits["2023/08/cat_and_dog.jpg"].score == pytest.approx(0.55)  # dog, not cat
    assert hits["2022/Car.JPG"].score == pytest.approx(0.95)
    assert hits["2022/Car.JPG"].path == str(root1 / "2022/Car.JPG")


def test_a_tag_named_like_query_syntax_is_suggested_as_it_must_be_typed(tmp_path):
    """Keywords read off photos can be named "-dash" or "date-"; a suggestion says tag:-dash,
    which finds them (plain -dash means NOT dash)."""
    from sqlalchemy import select

    url, root1, _ = build_library(tmp_path)
    engine = make_engine(url)
    with write_session(engine) as s:
        photo = s.scalars(select(Photo).where(Photo.relpath == "2022/Car.JPG")).one()
        for name in ("-dash", "date-", "score:0.5"):
            keyword = Tag(name=name, from_mapping=False)
            s.add(keyword)
            s.flush()
            s.add(PhotoTag(photo_id=photo.id, tag_id=keyword.id, score=1.0, source="keyword"))
    with read_connection(engine) as connection:
        for typed, suggested in (("dash", "tag:-dash"), ("date", "tag:date-"),
                                 ("score:0.5x", None)):
            if suggested is None:  # a malformed field term, not a tag: no suggestion at all
                with pytest.raises(QueryError):
                    search(connection, [typed])
                continue
            with pytest.raises(UnknownTagError) as info:
                search(connection, [typed])
            assert f"did you mean: {suggested}" in str(info.value)
            assert [h.relpath for h in search(connection, [suggested])] == ["2022/Car.JPG"]
        assert "did you mean: cat" in str(pytest.raises(UnknownTagError, search, connection,
                                                        ["catt"]).value)
    engine.dispose()


def test_limit(library):
    assert found(library, "animal", "date+", limit=2) == ["other:kitty.png", "2023/06/tabby.jpg"]
    assert found(library, "animal", limit=0) == []


def test_unknown_tag_suggests_the_nearest(library):
    engine, _, _ = library
    with read_connection(engine) as connection:
        with pytest.raises(UnknownTagError) as info:
            search(connection, ["animal", "^catt"])
        assert info.value.name == "catt" and info.value.index == 1
        assert "cat" in info.value.suggestions
        assert str(info.value).startswith("unknown tag 'catt'; did you mean: cat")
        with pytest.raises(UnknownTagError) as info:
            search(connection, ["猫猫"])
        assert info.value.suggestions == ["猫"]
        with pytest.raises(UnknownTagError, match="'phototag tags' lists the known tags"):
            search(connection, ["zzzzzz"])
        with pytest.raises(UnknownTagError, match="lone ','"):
            search(connection, ["cat,dog"])


def test_tag_index_handles_cycles(library):
    index = TagIndex(children={1: {2}, 2: {3}, 3: {1}})
    assert index.with_narrower({2}) == {1, 2, 3}


def test_compiled_sql_is_portable(library):
    """The SELECT compiles for PostgreSQL too: no SQLite-only SQL in the query compiler."""
    engine, root1, _ = library
    with read_connection(engine) as connection:
        tags = TagIndex.load(connection)
    query = parse_query(["cat", "^dog", "score:0.5..", "path:2023", ",", f"path:{root1}/x",
                         "date:2023-06..2023-08", "score-", "date-"])
    stmt = build_select(query, tags, roots=[(1, str(root1))], with_score=True, limit=10)
    sql = str(stmt.compile(dialect=postgresql.dialect()))
    assert "IN (" in sql and "NOT (EXISTS" in sql and "LIMIT" in sql
    assert "photo.relpath ILIKE" in sql  # PostgreSQL's own case-insensitive LIKE
    lone_negation = build_select(parse_query(["^dog"]), tags)
    assert "NOT IN" in str(lone_negation.compile(dialect=postgresql.dialect()))


def test_the_rarest_tag_term_drives_the_search(library):
    """The estimate decides which tag term uses the tag index; the others become EXISTS checks.
    Either way the photos found are the same."""
    engine, _, _ = library
    with read_connection(engine) as connection:
        tags = TagIndex.load(connection)
        cat, dog = tags.with_narrower(tags.lookup("cat")), tags.with_narrower(tags.lookup("dog"))
        for rare in (cat, dog):
            stmt = build_select(parse_query(["cat", "dog"]), tags,
                                estimate=lambda ids, rare=rare: 1 if ids == rare else 100)
            sql = str(stmt.compile(compile_kwargs={"literal_binds": True}))
            driven = sql.split("photo.id IN (")[1].split(")")[0]
            assert f"tag_id IN ({', '.join(map(str, sorted(rare)))}" in driven
            assert "EXISTS" in sql
            found = {row.relpath for row in connection.execute(stmt)}
            assert found == {"2023/08/cat_and_dog.jpg"}


def test_negated_tag_checked_per_photo_after_a_date(library):
    assert found_set(library, "date:2023", "^dog") == {"2023/06/tabby.jpg"}
    assert found_set(library, "^dog", "date:2023") == {"2023/06/tabby.jpg"}


def test_details_false_leaves_out_dates_and_status(library):
    engine, _, _ = library
    with read_connection(engine) as connection:
        full = search(connection, ["dog", "score-"])
        slim = search(connection, ["dog", "score-"], details=False)
    assert [(h.id, h.path, h.score) for h in slim] == [(h.id, h.path, h.score) for h in full]
    assert full[0].taken_at == datetime(2023, 7, 5) and full[0].status == TAGGED
    assert slim[0].taken_at is None and slim[0].status is None


@pytest.mark.parametrize("terms", [["animal"], ["cat", "dog"], ["cat", "^dog"], ["animal", ",", "car"],
                                   ["animal", "score:0.6.."], ["^dog", "animal"]])
def test_common_tag_with_a_limit_walks_photos_in_path_order(library, monkeypatch, terms):
    """With a limit and the path order, a driving tag estimated as common (here: any, with the cap
    at 1) is checked per photo (EXISTS) instead of IN; the photos found are the same."""
    import storage.query_sql

    engine, _, _ = library
    expected = {limit: found(library, *terms, limit=limit) for limit in (1, 2, 100)}
    assert expected[100] == found(library, *terms)  # the limit cuts, it does not change the order
    monkeypatch.setattr(storage.query_sql, "ESTIMATE_CAP", 1)
    with read_connection(engine) as connection:
        tags = TagIndex.load(connection)
    stmt = build_select(parse_query(terms), tags, extra_sort=[SortKey("path", False)], limit=2,
                        estimate=lambda ids: 1)
    sql = str(stmt.compile(dialect=postgresql.dialect()))
    assert "photo.id IN (" not in sql and "EXISTS" in sql
    for limit, paths in expected.items():
        assert found(library, *terms, limit=limit) == paths
