"""Configuration: a TOML file read with tomllib and checked against typed dataclasses.

Every key is documented in ``config.example.toml``. An unknown key or a value of the wrong type is
a ``ConfigError`` that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import platformdirs

APP = "phototag"
SYSTEM_CONFIG = Path("/etc/phototag/config.toml")

DEFAULT_EXCLUDE = [
    "@eaDir",
    "#recycle",
    "#snapshot",
    ".@__thumb",
    ".thumbnails",
    ".DS_Store",
    "._*",
    ".*",  # hidden files and folders, which also covers rsync's and Syncthing's temp files
    "*.part",
    "*.crdownload",
    "*.tmp",
]
DEFAULT_EXTENSIONS = [
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif",
]


class ConfigError(Exception):
    """The configuration is unusable; the message names the file and the key."""


@dataclass
class AlbumConfig:
    path: Path
    watch: Literal["inotify", "poll"] = "inotify"  # network shares deliver no inotify events
    poll_interval: float = 300.0  # seconds between polls when watch = "poll"


@dataclass
class ModelConfig:
    name: str = "resnet18"
    weights: Path | None = None  # a local weights file; default: the model cache
    cache_dir: Path | None = None
    precision: Literal["auto", "fp32", "bf16", "int8"] = "fp32"
    runtime: Literal["torch", "onnxruntime"] = "torch"
    batch_size: int = 16
    threads: int = 0  # inference threads; 0 = chosen for the core count
    decode_threads: int = 0  # decode/preprocess threads; 0 = chosen for the core count


@dataclass
class LabelsConfig:
    file: Path | None = None  # the user's own mapping, extending or overriding the shipped one
    lang: Literal["en", "zh"] = "en"


@dataclass
class ScanConfig:
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))


@dataclass
class DaemonConfig:
    stable_seconds: float = 2.0  # a file must keep its size and mtime this long before it is queued
    batch_max_delay: float = 2.0  # a part-filled batch is tagged after waiting this long
    nightly: str = "0 3 * * *"  # cron expression of the nightly rescan / re-tag job
    retry_after: float = 600.0  # first retry of a failed photo, doubled on each failure
    watchdog_seconds: float = 0.0  # 0 = take systemd's WATCHDOG_USEC
    stall_seconds: float = 600.0  # a batch without progress this long stops the watchdog pings


@dataclass
class MetadataConfig:
    write: Literal["off", "sidecar", "embedded"] = "off"
    sidecar_name: Literal["append", "replace"] = "append"  # IMG_1.jpg.xmp or IMG_1.xmp


@dataclass
class Config:
    database: str | None = None  # a path or SQLAlchemy URL
    albums: list[AlbumConfig] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    source: Path | None = None  # the file this was read from; None = built-in defaults


def find_config_file(explicit: str | os.PathLike | None = None) -> Path | None:
    """``--config``, then ``$PHOTOTAG_CONFIG``, then the user's, then the system's config file."""
    if explicit:
        return Path(explicit)
    if os.environ.get("PHOTOTAG_CONFIG"):
        return Path(os.environ["PHOTOTAG_CONFIG"])
    user = platformdirs.user_config_path(APP) / "config.toml"
    for candidate in (user, SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: str | os.PathLike | None = None) -> Config:
    path = find_config_file(explicit)
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    # [[album]] in the file reads better than [[albums]]; both name the same list.
    if "album" in data:
        data["albums"] = data.pop("album")
    config = _build(Config, data, path, prefix="")
    config.source = path
    base = path.parent
    for album in config.albums:
        album.path = _resolve(album.path, base)
    if config.model.weights:
        config.model.weights = _resolve(config.model.weights, base)
    if config.model.cache_dir:
        config.model.cache_dir = _resolve(config.model.cache_dir, base)
    if config.labels.file:
        config.labels.file = _resolve(config.labels.file, base)
    return config


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _build(cls, data, path: Path, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [{prefix.rstrip('.')}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {prefix}{key}")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"{path}: missing key {prefix}{f.name}")
    kwargs = {key: _convert(hints[key], value, path, prefix + key) for key, value in data.items()}
    return cls(**kwargs)


def _convert(hint, value, path: Path, key: str):
    """Check ``value`` against the type hint ``hint`` and convert it (str -> Path, int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None: TOML has no null, so never None
        (hint,) = [a for a in args if a is not type(None)]
        return _convert(hint, value, path, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {key} must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {key} must be a list, got {_toml_type(value)}")
        return [_convert(args[0], v, path, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, key + ".")
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {key} must be a non-empty path string")
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: {key} must be a number, got {_toml_type(value)}")
        if value < 0:
            raise ConfigError(f"{path}: {key} must not be negative")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: {key} must be an integer, got {_toml_type(value)}")
        if value < 0:
            raise ConfigError(f"{path}: {key} must not be negative")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be true or false, got {_toml_type(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key} must be a string, got {_toml_type(value)}")
        return value
    raise AssertionError(f"unsupported config type {hint!r} for {key}")


def _toml_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def data_dir() -> Path:
    """Where the database lives: systemd's StateDirectory for the service, else the user's data dir."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return platformdirs.user_data_path(APP)


def cache_dir(config: Config) -> Path:
    """Where model weights are cached: config, systemd's CacheDirectory, else the user's cache dir."""
    if config.model.cache_dir:
        return config.model.cache_dir
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    return platformdirs.user_cache_path(APP)


def database_url(config: Config, override: str | None = None) -> str:
    """``--db`` / ``$PHOTOTAG_DB``, then config ``database``, then ``<data dir>/phototag.db``.

    A value with ``://`` is an SQLAlchemy URL; anything else is a path to an SQLite file.
    """
    value = override or os.environ.get("PHOTOTAG_DB") or config.database
    if not value:
        value = str(data_dir() / "phototag.db")
    if "://" in value:
        return value
    return "sqlite:///" + str(Path(value).expanduser().absolute())
