"""Config files: discovery order, types, unknown keys, and that the example file is complete."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from daemon.config import (
    Config,
    ConfigError,
    database_url,
    find_config_file,
    load_config,
)

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_loads_and_equals_the_defaults():
    config = load_config(EXAMPLE)
    defaults = Config()
    for section in ("model", "labels", "scan", "daemon", "metadata"):
        assert getattr(config, section) == getattr(defaults, section), section


def test_every_key_is_documented_in_the_example():
    text = EXAMPLE.read_text(encoding="utf-8")
    for section in ("model", "labels", "scan", "daemon", "metadata"):
        for f in dataclasses.fields(getattr(Config(), section)):
            assert f"\n{f.name} =" in text or f"\n# {f.name} =" in text, f"[{section}] {f.name}"
    for key in ("database", "path", "watch", "poll_interval"):
        assert f"# {key} =" in text, key


def test_albums_and_relative_paths(tmp_path):
    path = write(tmp_path, """
database = "lib.db"
[[album]]
path = "photos"
watch = "poll"
poll_interval = 60
[model]
weights = "w/resnet18.pth"
batch_size = 8
""")
    config = load_config(path)
    assert config.source == path
    assert config.albums[0].path == tmp_path / "photos"
    assert config.albums[0].watch == "poll"
    assert config.albums[0].poll_interval == 60.0
    assert config.model.weights == tmp_path / "w" / "resnet18.pth"
    assert config.model.batch_size == 8


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[model]\nbatch_sise = 8\n", "unknown key model.batch_sise"),
        ("colour = 1\n", "unknown key colour"),
        ('[model]\nbatch_size = "8"\n', "model.batch_size must be an integer, got a string"),
        ("[model]\nbatch_size = -1\n", "model.batch_size must not be negative"),
        ('[metadata]\nwrite = "always"\n', "metadata.write must be one of"),
        ("[daemon]\nstable_seconds = true\n", "daemon.stable_seconds must be a number"),
        ('[scan]\nexclude = "@eaDir"\n', "scan.exclude must be a list, got a string"),
        ("[scan]\nexclude = [1]\n", "scan.exclude[0] must be a string"),
        ("[[album]]\nwatch = \"poll\"\n", "missing key albums[0].path"),
        ("model = 3\n", "[model] must be a table"),
        ("[model\n", "invalid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_discovery_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PHOTOTAG_CONFIG", raising=False)
    user = tmp_path / "xdg" / "phototag" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("[model]\nbatch_size = 4\n")
    assert find_config_file() == user
    env = write(tmp_path, "[model]\nbatch_size = 2\n")
    monkeypatch.setenv("PHOTOTAG_CONFIG", str(env))
    assert find_config_file() == env
    assert find_config_file(tmp_path / "explicit.toml") == tmp_path / "explicit.toml"
    assert load_config().model.batch_size == 2


def test_database_url(tmp_path, monkeypatch):
    monkeypatch.delenv("PHOTOTAG_DB", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    config = Config()
    assert database_url(config) == f"sqlite:///{tmp_path}/data/phototag/phototag.db"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/phototag")
    assert database_url(config) == "sqlite:////var/lib/phototag/phototag.db"
    config.database = "postgresql://u@h/db"
    assert database_url(config) == "postgresql://u@h/db"
    monkeypatch.setenv("PHOTOTAG_DB", str(tmp_path / "env.db"))
    assert database_url(config) == f"sqlite:///{tmp_path}/env.db"
    assert database_url(config, "sqlite:///x.db") == "sqlite:///x.db"


def test_example_is_valid_toml():
    with open(EXAMPLE, "rb") as f:
        assert "model" in tomllib.load(f)
