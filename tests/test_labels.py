"""The shipped ImageNet label mapping and its loader, on the real data files."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from tagger.labels import LabelMapError, TagInfo, load_label_map

LABELS_TOML = resources.files("tagger") / "data" / "labels.toml"


@pytest.fixture(scope="module")
def label_map():
    return load_label_map()


@pytest.fixture(scope="module")
def index(label_map) -> dict[str, int]:
    """torchvision class name -> index."""
    return {c.name: c.index for c in label_map.classes}


def probs_with(index: dict[str, int], **named: float) -> list[float]:
    """A probability vector that is zero except for the named classes (underscores for spaces)."""
    probs = [0.0] * 1000
    for name, p in named.items():
        probs[index[name.replace("_", " ")]] = p
    return probs


def scores(tags) -> dict[str, float]:
    return {t.name: t.score for t in tags}


def ancestors(label_map, name: str) -> set[str]:
    seen, stack = set(), list(label_map.tag(name).broader)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(label_map.tag(n).broader)
    return seen


# ------------------------------------------------------------------------------ the shipped data


def test_classes_match_torchvision_in_index_order(label_map):
    import torchvision

    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert [c.name for c in label_map.classes] == list(categories)
    assert [c.index for c in label_map.classes] == list(range(1000))
    wnids = [c.wnid for c in label_map.classes]
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids == sorted(set(wnids))  # index order is sorted WNID order, no duplicates


def test_every_class_is_mapped_or_dropped_exactly_once(label_map):
    doc = tomllib.loads(LABELS_TOML.read_text(encoding="utf-8"))
    uses = Counter(doc["drop"])
    for table in doc["tags"].values():
        uses.update(table.get("classes", []))
    wnids = [c.wnid for c in label_map.classes]
    assert set(uses) == set(wnids)
    assert [w for w, n in uses.items() if n != 1] == []
    dropped = set(doc["drop"])
    for c in label_map.classes:
        assert (label_map.tag_of_class(c.index) is None) == (c.wnid in dropped), c.name
    assert isinstance(doc["version"], str) and label_map.version == doc["version"]


def test_every_tag_has_a_chinese_name_and_known_broader_tags(label_map):
    tags = label_map.all_tags()
    names = {t.name for t in tags}
    for t in tags:
        assert re.search(r"[\u4e00-\u9fff]", t.zh), t.name
        assert set(t.broader) <= names, t.name
        assert 0 < t.threshold < 1
    # broader-only tags are tags too
    assert label_map.tag("animal") == TagInfo("animal", "动物", (), label_map.tag("animal").threshold,
                                              label_map.tag("animal").priority)
    assert label_map.tag("cat").broader == ("animal", "pet")
    assert set(label_map.tag("dog").broader) == {"animal", "pet"}
    with pytest.raises(KeyError):
        label_map.tag("no such tag")


def test_each_of_the_118_dog_breeds_has_its_own_tag_below_dog(label_map):
    import torchvision

    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    # torchvision's breeds run from Chihuahua to Mexican hairless
    breeds = range(categories.index("Chihuahua"), categories.index("Mexican hairless") + 1)
    assert len(breeds) == 118
    tags = [label_map.tag_of_class(i) for i in breeds]
    assert len(set(tags)) == 118
    for i, t in zip(breeds, tags):
        assert t != "dog" and "dog" in ancestors(label_map, t), categories[i]
    # wild canids are not dogs
    for name in ("timber wolf", "coyote", "dingo", "red fox", "hyena"):
        t = label_map.tag_of_class(categories.index(name))
        assert t != "dog" and "dog" not in ancestors(label_map, t), name


# ------------------------------------------------------------------------------ scoring


def test_cat_photo_gives_cat_animal_pet_with_summed_scores(label_map, index):
    probs = probs_with(index, tabby=0.6, tiger_cat=0.25, Egyptian_cat=0.05, hamster=0.04, alp=0.06)
    tags = label_map.tags_for(probs)
    got = scores(tags)
    assert set(got) == {"cat", "pet", "animal"}  # hamster and mountain stay under their thresholds
    assert got["cat"] == pytest.approx(0.9)
    assert got["pet"] == pytest.approx(0.94)  # cat + hamster
    assert got["animal"] == pytest.approx(0.94)
    # score desc, then priority desc: pet and animal tie, pet is the more specific
    assert [t.name for t in tags] == ["pet", "animal", "cat"]
    cat = next(t for t in tags if t.name == "cat")
    assert cat.zh == "猫" and cat.broader == ("animal", "pet")


def test_dog_breeds_each_under_threshold_sum_to_dog(label_map, index):
    probs = probs_with(index, golden_retriever=0.15, beagle=0.15, pug=0.15)
    got = scores(label_map.tags_for(probs))
    assert got["dog"] == pytest.approx(0.45)
    assert "golden retriever" not in got and "beagle" not in got and "pug" not in got
    assert {"dog", "pet", "animal"} <= set(got)


def test_a_clear_breed_gives_breed_and_dog(label_map, index):
    got = scores(label_map.tags_for(probs_with(index, golden_retriever=0.8, Labrador_retriever=0.1)))
    assert got["golden retriever"] == pytest.approx(0.8)
    assert got["dog"] == pytest.approx(0.9)
    assert "labrador retriever" not in got


def test_dogsled_is_a_sled_not_a_dog(label_map, index):
    got = scores(label_map.tags_for(probs_with(index, dogsled=0.9)))
    assert {"sled", "snow"} <= set(got)
    assert "dog" not in got and "animal" not in got and "pet" not in got


@pytest.mark.parametrize("cls, tag", [
    ("alp", "mountain"), ("espresso", "coffee"), ("seashore", "beach"), ("sandbar", "beach"),
    ("lakeside", "lake"), ("Persian cat", "cat"), ("Siamese cat", "cat"), ("cheeseburger", "burger"),
])
def test_class_maps_to_friendly_tag(label_map, index, cls, tag):
    assert label_map.tag_of_class(index[cls]) == tag
    assert tag in scores(label_map.tags_for(probs_with(index, **{cls.replace(" ", "_"): 0.8})))


@pytest.mark.parametrize("cls", ["web site", "jigsaw puzzle", "crossword puzzle", "envelope"])
def test_dropped_class_gives_no_tags(label_map, index, cls):
    assert label_map.tag_of_class(index[cls]) is None
    assert label_map.tags_for(probs_with(index, **{cls.replace(" ", "_"): 0.99})) == []


def test_an_unsure_model_spread_thin_over_many_classes_gives_no_broad_tag(label_map, index):
    # near-uniform output, as for a dark or blurry photo: ~0.36 lands on the animal classes in crumbs
    probs = [0.0009] * 1000
    probs[index["jellyfish"]] = 0.1
    animal_classes = [c.index for c in label_map.classes if label_map.tag_of_class(c.index)
                      and "animal" in ancestors(label_map, label_map.tag_of_class(c.index))]
    animal_mass = sum(probs[i] for i in animal_classes)
    assert animal_mass > label_map.tag("animal").threshold  # would pass if crumbs counted
    assert label_map.class_floor > 0.0009
    assert label_map.tags_for(probs) == []


def test_tags_for_wants_1000_probabilities(label_map):
    with pytest.raises(ValueError):
        label_map.tags_for([0.5, 0.5])


def test_labels_module_does_not_import_torch_or_numpy():
    code = ("import sys, tagger.labels; tagger.labels.load_label_map(); "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ user files


def write(tmp_path: Path, text: str, name: str = "my-labels.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_user_file_adds_tags_moves_classes_and_overrides_fields(tmp_path, index):
    user = write(tmp_path, """
version = "mine-1"
drop = ["n02123597"]                # Siamese cat: no tags any more

[tags."my tabby"]
zh = "我的虎斑猫"
broader = ["cat"]
threshold = 0.5
classes = ["n02123045"]             # tabby, moved here from cat

[tags.screenshot]
zh = "截图"
classes = ["n06359193"]             # web site, moved here from drop

[tags.coffee]
threshold = 0.5
""")
    m = load_label_map(user)
    assert m.version == "2026.11+user:mine-1"
    assert m.tag_of_class(index["tabby"]) == "my tabby"
    assert m.tag_of_class(index["tiger cat"]) == "cat"  # cat keeps its other classes
    assert m.tag_of_class(index["Siamese cat"]) is None
    assert m.tag_of_class(index["web site"]) == "screenshot"

    got = scores(m.tags_for(probs_with(index, tabby=0.6, tiger_cat=0.2)))
    assert got["my tabby"] == pytest.approx(0.6)
    assert got["cat"] == pytest.approx(0.8) and {"pet", "animal"} <= set(got)
    assert m.tag("my tabby") == TagInfo("my tabby", "我的虎斑猫", ("cat",), 0.5, 50)
    assert m.tags_for(probs_with(index, Siamese_cat=0.9)) == []
    assert scores(m.tags_for(probs_with(index, web_site=0.9))) == {"screenshot": pytest.approx(0.9)}

    coffee = m.tag("coffee")
    assert coffee.threshold == 0.5 and coffee.zh == "咖啡"  # only the field given is replaced
    assert "coffee" not in scores(m.tags_for(probs_with(index, espresso=0.4)))

    # the shipped mapping is untouched by loading a user file
    assert load_label_map().tag_of_class(index["tabby"]) == "cat"


def test_user_file_can_change_the_class_floor(tmp_path, index):
    probs = [0.0009] * 1000
    probs[index["jellyfish"]] = 0.1
    m = load_label_map(write(tmp_path, "class_floor = 0.0\n"))
    assert m.class_floor == 0.0
    assert "animal" in scores(m.tags_for(probs))


def test_user_file_without_version_gets_a_content_hash(tmp_path):
    m1 = load_label_map(write(tmp_path, '[tags.coffee]\nthreshold = 0.4\n', "a.toml"))
    m2 = load_label_map(write(tmp_path, '[tags.coffee]\nthreshold = 0.5\n', "b.toml"))
    assert m1.version.startswith("2026.11+user:sha256-")
    assert m1.version != m2.version


@pytest.mark.parametrize("text, problem", [
    ('[tags.x]\nzh = "x"\nclasses = ["n99999999"]\n', "unknown WNID"),
    ('[tags.animal]\nbroader = ["cat"]\n', "cycle"),
    ('[tags.kitten]\nbroader = ["cat"]\nclasses = ["n02123045"]\n', "no 'zh'"),
    ('[tags.cat]\nzh = ""\n', "zh"),
    ('[tags.cat]\ncolour = "grey"\n', "unknown key"),
    ('colour = "grey"\n', "unknown key"),
    ('[tags.kitten]\nzh = "小猫"\nbroader = ["kitty"]\n', "unknown broader"),
    ('drop = ["n02123045"]\n[tags.kitten]\nzh = "小猫"\nclasses = ["n02123045"]\n', "mapped twice"),
    ('[tags.a]\nzh = "甲"\nclasses = ["n02123045"]\n[tags.b]\nzh = "乙"\nclasses = ["n02123045"]\n',
     "mapped twice"),
    ('[tags.cat]\nthreshold = "high"\n', "threshold"),
    ('[tags.cat]\nthreshold = 1.5\n', "threshold"),
    ('[tags.cat]\npriority = 1.5\n', "priority"),
    ('[tags.cat]\nbroader = "animal"\n', "broader"),
    ('version = 3\n', "version"),
    ('drop = "n02123045"\n', "drop"),
    ('class_floor = -1\n', "class_floor"),
    ('[tags.cat\nzh = "猫"\n', "not valid TOML"),
])
def test_bad_user_file_raises_one_line_error_naming_the_file(tmp_path, text, problem):
    user = write(tmp_path, text)
    with pytest.raises(LabelMapError) as err:
        load_label_map(user)
    message = str(err.value)
    assert str(user) in message and problem in message
    assert "\n" not in message


def test_missing_user_file_is_a_label_map_error(tmp_path):
    with pytest.raises(LabelMapError, match="cannot read"):
        load_label_map(tmp_path / "nope.toml")
