"""Typed configuration: documented dataclass defaults, YAML override files and ``--set a.b=c``.

Defaults live in code (:class:`Config` and the per-stage option dataclasses it nests). A YAML file
holds only overrides. Every key is checked against the dataclasses: an unknown key or a wrong type
raises :class:`~pipeline.errors.ConfigError` naming the file (or ``--set``) it came from and the
valid choices. Values are data only: nothing is evaluated, and no path comes from the environment.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from pipeline.demo_options import DemoConfig
from pipeline.errors import ConfigError
from pipeline.evaluate.options import EvaluateConfig
from pipeline.ingest.options import IngestConfig
from pipeline.pacs.options import PacsConfig
from pipeline.predict.options import PredictConfig
from pipeline.preprocess.options import PreprocessConfig
from pipeline.train.options import TrainConfig


@dataclass
class Config:
    """Everything a ctseg run needs. Sections mirror the stages."""

    experiment: str = field(default="default", metadata={
        "help": "Run name; stage outputs go to <output_root>/<experiment>/<stage>/."})
    output_root: str = field(default="outputs", metadata={
        "help": "Folder that holds all experiments (relative paths are relative to the working directory)."})
    dataset: str = field(default="", metadata={
        "help": "Path to a dataset.yaml describing where the cases are and what each label value means."})
    seed: int = field(default=0, metadata={"help": "Seed for every random choice (splits, sampling, init)."})
    workers: int = field(default=2, metadata={"help": "Worker threads/processes for I/O-bound steps."})
    ingest: IngestConfig = field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.output_root) / self.experiment

    def stage_dir(self, stage: str) -> Path:
        return self.experiment_dir / stage


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (), base: dict | None = None) -> Config:
    """Build a Config from defaults, then each YAML file in order, then each ``a.b=c`` override."""
    merged: dict = dict(base or {})
    sources: dict[str, str] = {}
    for path in files:
        data = _read_yaml(Path(path))
        _merge(merged, data, sources, source=str(path))
    for item in overrides:
        key, value = _parse_override(item)
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(merged, nested, sources, source=f"--set {item}")
    return build_dataclass(Config, merged, sources, prefix="")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Check the path given to --config.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}. "
                          f"Fix the syntax at the line shown.") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping of settings, got {type(data).__name__}.")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set must look like key.sub=value, got '{item}'. Example: --set train.max_epochs=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set must name a key before '=', got '{item}'.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _merge(target: dict, data: dict, sources: dict[str, str], source: str, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, sources, source, prefix=f"{dotted}.")
        else:
            target[key] = value
            _record_sources(value, dotted, source, sources)


def _record_sources(value, dotted: str, source: str, sources: dict[str, str]) -> None:
    sources[dotted] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record_sources(sub, f"{dotted}.{key}", source, sources)


def build_dataclass(cls, data: dict, sources: dict[str, str] | None = None, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a nested dict, checking every key and type."""
    sources = sources or {}
    if not isinstance(data, dict):
        origin = sources.get(prefix.rstrip("."), "config")
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r} (from {origin}).")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            origin = sources.get(dotted, "config")
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown setting '{dotted}' in {origin}. Valid keys here: {valid}.")
        kwargs[key] = _coerce(hints[key], value, dotted, sources)
    return cls(**kwargs)


def _coerce(hint, value, dotted: str, sources: dict[str, str]):
    origin = get_origin(hint)
    args = get_args(hint)
    where = sources.get(dotted, "config")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, sources, prefix=f"{dotted}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, dotted, sources)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"setting '{dotted}' must be {describe_type(hint)}, got {value!r} (from {where}).")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"setting '{dotted}' must be one of {choices}, got {value!r} (from {where}).")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"setting '{dotted}' must be a list of {describe_type(args[0]) if args else 'values'}, "
                              f"got {value!r} (from {where}). Write it as [a, b, c].")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"setting '{dotted}' must have {len(args)} items, got {len(value)} (from {where}).")
            return tuple(_coerce(a, v, dotted, sources) for a, v in zip(args, value))
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, dotted, sources) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"setting '{dotted}' must be a mapping, got {value!r} (from {where}).")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"setting '{dotted}' must be true or false, got {value!r} (from {where}).")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"setting '{dotted}' must be an integer, got {value!r} (from {where}).")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"setting '{dotted}' must be a number, got {value!r} (from {where}).")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"setting '{dotted}' must be text, got {value!r} (from {where}).")
    return value


def describe_type(hint) -> str:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"list of {describe_type(args[0])}" if args else "list"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


# ---------------------------------------------------------------------------------------------
# Serialisation, hashing, reference
# ---------------------------------------------------------------------------------------------

def to_dict(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def to_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def stable_hash(data: Any) -> str:
    """The project's one content hash of JSON-like data: 16 hex digits of SHA-256 over sorted-key JSON.

    Used for stage completion records, predict's settings and preprocess's cache key; equal data gives an equal
    hash on every machine and Python version (non-JSON values are hashed by their ``str``).
    """
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def section_hash(*parts) -> str:
    """Stable hash of config sections (dataclasses or plain data) and upstream hashes."""
    return stable_hash([to_dict(part) if dataclasses.is_dataclass(part) else part for part in parts])


def reference(cls=Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every setting, for the README and ``ctseg config --list``."""
    rows = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        dotted = f"{prefix}{f.name}"
        default = getattr(instance, f.name)
        if dataclasses.is_dataclass(hint):
            rows.extend(reference(hint, prefix=f"{dotted}."))
        else:
            rows.append((dotted, describe_type(hint), default, f.metadata.get("help", "")))
    return rows
