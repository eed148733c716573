"""Dataset descriptions (``datasets/<name>/dataset.yaml``): where the cases are and what labels mean.

A description names its label values (name, value, colour, synonyms) and says where the cases
are, either as an export folder to scan (``source``) or as an explicit ``cases`` list. Relative
paths are relative to the folder of the dataset.yaml. Example::

    name: phantom
    labels:
      - {name: liver, value: 1, color: [221, 130, 101], synonyms: [Liver]}
      - {name: GTV, value: 2, synonyms: [GTV Primary], regex: ['^gtv[ _-]?\\d*$'], required: true}
    exclude: ['^z_', couch, '(?i)ptv']            # structures never used (regex, case-insensitive)
    source: ../../outputs/demo/export          # a DICOM export or a folder of volumes, or:
    cases:
      - {id: p000, image: export/P000/1/2, label: nifti/p000_label.nii.gz, role: train}
    test_cases: [p009]                         # ids held out from training
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.config import build_dataclass
from pipeline.errors import ConfigError
from pipeline.labels.codes import codes_json
from pipeline.labels.names import LabelSpec


@dataclass
class DatasetCase:
    """One case given explicitly: an image (DICOM series folder or volume file) and an optional label."""

    id: str
    image: str
    label: str | None = None
    role: Literal["train", "test"] = "train"


@dataclass
class DatasetDescription:
    """The parsed dataset.yaml."""

    name: str
    labels: list[LabelSpec]
    description: str = ""
    source: str | None = None
    cases: list[DatasetCase] = field(default_factory=list)
    test_cases: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)  # regexes of structure names never used (see names.py)
    path: str = ""  # the dataset.yaml it came from; filled in by load_dataset

    @property
    def folder(self) -> Path:
        return Path(self.path).parent

    def resolve(self, relative: str) -> Path:
        candidate = Path(relative).expanduser()
        return candidate if candidate.is_absolute() else (self.folder / candidate)

    def foreground(self) -> list[LabelSpec]:
        return [spec for spec in self.labels if spec.value != 0]

    def label_values(self) -> set[int]:
        return {0} | {spec.value for spec in self.labels}

    def content_hash(self) -> str:
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]

    def label_json(self) -> list[dict]:
        return [{"name": s.name, "value": s.value, "color": list(s.color), "synonyms": list(s.synonyms),
                 **codes_json(s)} for s in self.labels]


def load_dataset(path: str | Path) -> DatasetDescription:
    """Parse and check a dataset.yaml; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset description {path} does not exist. Set 'dataset' in the config (or "
                          f"--set dataset=datasets/<name>/dataset.yaml) to an existing file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"dataset description {path} is not valid YAML: {str(exc).splitlines()[0]}.") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"dataset description {path} must be a mapping, got {type(data).__name__}.")
    sources = {key: str(path) for key in _dotted_keys(data)}
    description = build_dataclass(DatasetDescription, {**data, "path": str(path)}, sources)
    _check(description, path)
    return description


def _dotted_keys(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield f"{prefix}{key}"
            yield from _dotted_keys(value, f"{prefix}{key}.")


def _check(description: DatasetDescription, path: Path) -> None:
    values = [spec.value for spec in description.labels]
    if len(set(values)) != len(values):
        raise ConfigError(f"dataset description {path}: label values must be unique, got {values}.")
    if any(v < 0 or v > 65535 for v in values):
        raise ConfigError(f"dataset description {path}: label values must be in 0..65535, got {values}.")
    if not description.foreground():
        raise ConfigError(f"dataset description {path} must name at least one foreground label (value > 0).")
    if not description.source and not description.cases:
        raise ConfigError(f"dataset description {path} must give 'source' (an export folder) or 'cases' "
                          f"(a list of id/image/label). Add one of them.")
    _check_patterns(description, path)
    for spec in description.labels:
        for key in ("category", "type", "modifier"):
            code = getattr(spec, key, None)
            if code is not None and not (code.value.strip() and code.meaning.strip() and code.scheme.strip()):
                raise ConfigError(f"dataset description {path}: label '{spec.name}' {key} must give value, meaning "
                                  f"and scheme, got {code}. Example: {{value: '10200004', meaning: Liver}} "
                                  f"(scheme defaults to SCT).")
    ids = [case.id for case in description.cases]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"dataset description {path}: case ids must be unique.")


def _check_patterns(description: DatasetDescription, path: Path) -> None:
    """Every regex compiles, and no exclude pattern removes a label's own name or synonym."""
    from pipeline.labels.names import compile_patterns

    excluded = compile_patterns(description.exclude, f"dataset description {path}: exclude")
    for spec in description.labels:
        compile_patterns(spec.regex, f"dataset description {path}: label '{spec.name}' regex")
        for alias in [spec.name, *spec.synonyms]:
            hit = next((p.pattern for p in excluded if p.search(alias)), None)
            if hit is not None and spec.value != 0:
                raise ConfigError(f"dataset description {path}: exclude pattern '{hit}' must not match the name or "
                                  f"synonym '{alias}' of label '{spec.name}', or that label could never be found. "
                                  f"Narrow the pattern or rename the label.")
