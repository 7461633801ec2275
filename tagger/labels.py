"""ImageNet-1k classes -> friendly photo tags, from the data files in ``tagger/data/``.

``labels.toml`` maps each class to one friendly tag (or drops it); tags form a hierarchy through
``broader``. A tag's score is the summed probability of the classes under it, so broader tags come
only from the hierarchy and never leak from one class onto another's tag. Users extend or override
the mapping with a file in the same format (see the comments at the top of ``labels.toml``).

Pure Python on purpose: commands that don't tag import this without torch or numpy.
"""

from __future__ import annotations

import csv
import hashlib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tagger.results import TagScore

NUM_CLASSES = 1000
DEFAULT_CLASS_FLOOR = 0.001  # these three are used only if the files don't say
DEFAULT_THRESHOLD = 0.2
DEFAULT_PRIORITY = 50

_TOP_KEYS = {"version", "class_floor", "drop", "defaults", "tags"}
_DEFAULT_KEYS = {"threshold", "priority"}
_TAG_KEYS = {"zh", "broader", "threshold", "priority", "classes"}


class LabelMapError(Exception):
    """A label-mapping file is invalid; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class TagInfo:
    name: str
    zh: str
    broader: tuple[str, ...]
    threshold: float
    priority: int


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    wnid: str
    name: str


class LabelMap:
    """A validated, merged mapping, precomputed so that ``tags_for`` is cheap."""

    def __init__(self, version: str, classes: list[ImageNetClass], tags: dict[str, TagInfo],
                 class_tag: list[str | None], class_floor: float = DEFAULT_CLASS_FLOOR) -> None:
        self.version = version
        self.class_floor = class_floor  # class probabilities below this count for no tag
        self.classes = classes
        self._tags = tags
        self._class_tag = class_tag
        self._names = sorted(tags)
        self._infos = [tags[n] for n in self._names]
        position = {n: i for i, n in enumerate(self._names)}
        # class index -> position of its friendly tag (-1 if dropped); tag -> itself and ancestors
        self._class_pos = [-1 if t is None else position[t] for t in class_tag]
        self._closure = [tuple(position[a] for a in _with_ancestors(n, tags)) for n in self._names]

    def tags_for(self, probs: Sequence[float]) -> list[TagScore]:
        """Friendly and broader tags whose score reaches their threshold, best first."""
        if len(probs) != NUM_CLASSES:
            raise ValueError(f"expected {NUM_CLASSES} class probabilities, got {len(probs)}")
        n = len(self._infos)
        own = [0.0] * n  # friendly tag -> summed probability of its own classes
        floor = self.class_floor
        for p, t in zip(probs, self._class_pos):
            if p >= floor and t >= 0:
                own[t] += p
        scores = [0.0] * n  # every tag -> own classes plus those of every tag beneath it
        for t, closure in enumerate(self._closure):
            if p := own[t]:
                for a in closure:
                    scores[a] += p
        found = [(info, float(score)) for info, score in zip(self._infos, scores)
                 if score and score >= info.threshold]
        found.sort(key=lambda f: (-f[1], -f[0].priority, f[0].name))
        return [TagScore(info.name, info.zh, score, info.broader) for info, score in found]

    def tag(self, name: str) -> TagInfo:
        """The tag called ``name``; KeyError if there is none."""
        return self._tags[name]

    def all_tags(self) -> list[TagInfo]:
        """Every tag, friendly and broader, sorted by name."""
        return list(self._infos)

    def tag_of_class(self, index: int) -> str | None:
        """The friendly tag of class ``index``, or None if the class is dropped."""
        return self._class_tag[index]


def load_label_map(user_file: Path | None = None) -> LabelMap:
    """The shipped mapping, extended or overridden by ``user_file`` if given."""
    data_dir = resources.files("tagger") / "data"
    classes = _read_classes(data_dir / "imagenet_classes.tsv")
    wnid_index = {c.wnid: c.index for c in classes}

    base_name = str(data_dir / "labels.toml")
    base = _parse_file(base_name, (data_dir / "labels.toml").read_bytes(), wnid_index)
    if base.version is None:
        raise LabelMapError(f"{base_name}: missing 'version'")
    missing = [c for c in classes if c.index not in base.class_tag and c.index not in base.drop]
    if missing:
        c = missing[0]
        raise LabelMapError(
            f"{base_name}: {len(missing)} classes are neither mapped nor dropped, "
            f"e.g. {c.wnid} ({c.name})")
    base_defaults = {"threshold": DEFAULT_THRESHOLD, "priority": DEFAULT_PRIORITY, **base.defaults}
    fields = dict(base.fields)
    tags = _build_tags(base_name, fields, base_defaults)
    class_tag: list[str | None] = [base.class_tag.get(i) for i in range(NUM_CLASSES)]
    version = base.version
    class_floor = DEFAULT_CLASS_FLOOR if base.class_floor is None else base.class_floor

    if user_file is not None:
        user_name = str(user_file)
        try:
            raw = Path(user_file).read_bytes()
        except OSError as e:
            raise LabelMapError(f"{user_name}: cannot read: {e.strerror or e}") from None
        user = _parse_file(user_name, raw, wnid_index)
        user_defaults = {**base_defaults, **user.defaults}
        for name, new in user.fields.items():
            if name not in fields and "zh" not in new:
                raise LabelMapError(f"{user_name}: new tag {name!r} has no 'zh'")
            old = fields.get(name, {"threshold": user_defaults["threshold"],
                                    "priority": user_defaults["priority"]})
            fields[name] = {**old, **new}
        for i, name in user.class_tag.items():
            class_tag[i] = name
        for i in user.drop:
            class_tag[i] = None
        theirs = user.version or "sha256-" + hashlib.sha256(raw).hexdigest()[:12]
        version = f"{version}+user:{theirs}"
        if user.class_floor is not None:
            class_floor = user.class_floor
        tags = _build_tags(user_name, fields, base_defaults)

    return LabelMap(version, classes, tags, class_tag, class_floor)


# ---------------------------------------------------------------------------------------- parsing


@dataclass
class _ParsedFile:
    version: str | None
    class_floor: float | None
    defaults: dict[str, Any]
    fields: dict[str, dict[str, Any]]  # tag -> the fields this file sets (classes excluded)
    class_tag: dict[int, str]  # class index -> tag, for classes this file maps
    drop: set[int]


def _read_classes(path: Any) -> list[ImageNetClass]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    classes = [ImageNetClass(int(r[0]), r[1], r[2]) for r in rows[1:]]
    wnids = [c.wnid for c in classes]
    if [c.index for c in classes] != list(range(NUM_CLASSES)) or wnids != sorted(set(wnids)):
        raise LabelMapError(f"{path}: expected {NUM_CLASSES} classes in index order with sorted WNIDs")
    return classes


def _parse_file(name: str, raw: bytes, wnid_index: dict[str, int]) -> _ParsedFile:
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise LabelMapError(f"{name}: not valid TOML: {e}") from None

    def fail(msg: str) -> LabelMapError:
        return LabelMapError(f"{name}: {msg}")

    _no_unknown_keys(doc, _TOP_KEYS, "", fail)
    version = doc.get("version")
    if version is not None and (not isinstance(version, str) or not version.strip()):
        raise fail("'version' must be a non-empty string")
    class_floor = doc.get("class_floor")
    if class_floor is not None and not _is_fraction(class_floor):
        raise fail(f"'class_floor' must be a number from 0 to 1, got {class_floor!r}")

    defaults = _table(doc, "defaults", fail)
    _no_unknown_keys(defaults, _DEFAULT_KEYS, "defaults.", fail)
    for key, value in defaults.items():
        _check_field(key, value, "defaults", fail)

    owner: dict[int, str] = {}  # class index -> where this file put it, to catch duplicates

    def claim(wnid: Any, where: str) -> int:
        if not isinstance(wnid, str):
            raise fail(f"{where}: class {wnid!r} must be a WNID string")
        if wnid not in wnid_index:
            raise fail(f"{where}: unknown WNID {wnid!r}")
        i = wnid_index[wnid]
        if i in owner:
            raise fail(f"class {wnid} is mapped twice, in {owner[i]} and {where}")
        owner[i] = where
        return i

    drop_list = doc.get("drop", [])
    if not isinstance(drop_list, list):
        raise fail("'drop' must be a list of WNIDs")
    drop = {claim(w, "drop") for w in drop_list}

    fields: dict[str, dict[str, Any]] = {}
    class_tag: dict[int, str] = {}
    for tag_name, table in _table(doc, "tags", fail).items():
        where = f"tags.{tag_name}"
        if not tag_name.strip():
            raise fail("a tag has an empty name")
        if not isinstance(table, dict):
            raise fail(f"'{where}' must be a table")
        _no_unknown_keys(table, _TAG_KEYS, where + ".", fail)
        for key, value in table.items():
            _check_field(key, value, where, fail)
        for wnid in table.get("classes", []):
            class_tag[claim(wnid, where)] = tag_name
        f = {k: v for k, v in table.items() if k != "classes"}
        if "broader" in f:
            f["broader"] = tuple(f["broader"])
        fields[tag_name] = f
    return _ParsedFile(version, class_floor, defaults, fields, class_tag, drop)


def _table(doc: dict[str, Any], key: str, fail: Any) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise fail(f"'{key}' must be a table")
    return value


def _no_unknown_keys(table: dict[str, Any], allowed: set[str], prefix: str, fail: Any) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise fail(f"unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _check_field(key: str, value: Any, where: str, fail: Any) -> None:
    if key == "zh":
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{where}.zh must be a non-empty string")
    elif key in ("broader", "classes"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(f"{where}.{key} must be a list of strings")
    elif key == "threshold":
        if not _is_fraction(value):
            raise fail(f"{where}.threshold must be a number from 0 to 1, got {value!r}")
    elif key == "priority":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{where}.priority must be an integer, got {value!r}")


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _build_tags(file_name: str, fields: dict[str, dict[str, Any]],
                defaults: dict[str, Any]) -> dict[str, TagInfo]:
    """TagInfo for every tag, with defaults filled in; checks zh and the hierarchy."""
    tags = {}
    for name, f in fields.items():
        if "zh" not in f:
            raise LabelMapError(f"{file_name}: tag {name!r} has no 'zh'")
        tags[name] = TagInfo(
            name=name,
            zh=f["zh"],
            broader=tuple(f.get("broader", ())),
            threshold=float(f.get("threshold", defaults["threshold"])),
            priority=int(f.get("priority", defaults["priority"])),
        )
    _check_hierarchy(file_name, tags)
    return tags


def _check_hierarchy(file_name: str, tags: dict[str, TagInfo]) -> None:
    """Every broader tag exists and the hierarchy has no cycle."""
    for info in tags.values():
        for b in info.broader:
            if b not in tags:
                raise LabelMapError(f"{file_name}: tag {info.name!r} has unknown broader tag {b!r}")
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise LabelMapError(f"{file_name}: broader tags form a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for b in tags[name].broader:
            visit(b, path + [name])
        state[name] = 2

    for name in tags:
        visit(name, [])


def _with_ancestors(name: str, tags: dict[str, TagInfo]) -> set[str]:
    seen: set[str] = set()
    stack = [name]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(tags[n].broader)
    return seen
