"""Turning ``--input PATH`` into a sorted list of cases, splitting it into shards, and reading one case.

PATH may be:

- a folder of NIfTI / NRRD / MHA files: one case per file; the case id is the file name without its
  suffix and without a trailing ``_0000`` channel suffix (nnU-Net naming);
- a single such file;
- a text file (``.txt`` / ``.lst``) listing inputs, one path per line, relative to the text file;
  blank lines and ``#`` comments are ignored; each entry is expanded like PATH itself;
- anything else (a folder of DICOM files, a DICOMDIR, one DICOM file): a DICOM export, scanned and
  filtered with the ingest selection rules (``ingest.select``); each selected CT series is a case
  whose id is :func:`pipeline.case_ids.series_case_id`, the same id ``ctseg ingest`` gives it, so
  no patient name or ID reaches a file name or a log and predictions pair with ingested labels.

Case ids contain only ``[A-Za-z0-9_-]`` (no dots: ``<case>.`` prefixes every output file). The
list is sorted by case id; shards are ``cases[k]`` with ``k mod n == i`` (``shard_by: index``) or
chosen by a hash of the case id (``shard_by: hash``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.geometry import Volume
from pipeline.volume_io import is_volume_file, load_volume, strip_volume_suffix

log = logging.getLogger("ctseg.predict")

LIST_SUFFIXES = (".txt", ".lst")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Case:
    """One volume to segment: a volume file, or one selected series of a DICOM export."""

    case_id: str
    source: str                       # what the ledger and report show as the input (no patient data)
    path: Path | None = None       # volume file
    series: Any = None                # pipeline.dicom.scan.SeriesInfo for DICOM cases
    notes: list[str] = field(default_factory=list)
    error: str | None = None       # refused while finding inputs (a bad list entry): fails with this reason
    private: list[str] = field(default_factory=list)  # texts that name the input (list entries): private/ only

    @property
    def is_dicom(self) -> bool:
        return self.series is not None


@dataclass
class Discovery:
    """The cases found under PATH and what was passed over (skipped DICOM series and files)."""

    cases: list[Case]
    skipped: list[str] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)  # every input folder read (outputs must stay outside)


@dataclass
class SourceImage:
    """A case's image in HU on its source grid, plus what the reader noticed."""

    volume: Volume
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------

def discover_cases(input_path: Path, ingest_cfg: Any = None, workers: int = 2) -> Discovery:
    """All cases under ``input_path`` (see module docstring), sorted by case id, ids unique."""
    input_path = Path(input_path)
    if not input_path.exists():
        raise InputError(f"input {input_path} does not exist. Pass a DICOM export, a folder of NIfTI/NRRD/MHA "
                         f"files, one such file, or a .txt list of them.")
    discovery = Discovery(cases=[])
    _expand(input_path, discovery, ingest_cfg, workers, seen_lists=set())
    discovery.cases = _unique_ids(discovery.cases)
    discovery.cases.sort(key=lambda case: case.case_id)
    return discovery


def _expand(path: Path, discovery: Discovery, ingest_cfg, workers: int, seen_lists: set) -> None:
    if path.is_file() and path.name.lower().endswith(LIST_SUFFIXES):
        _expand_list(path, discovery, ingest_cfg, workers, seen_lists)
    elif path.is_file() and is_volume_file(path):
        discovery.cases.append(_file_case(path))
    elif path.is_dir() and _volume_files(path):
        discovery.folders.append(path)
        discovery.cases.extend(_file_case(p) for p in _volume_files(path))
    elif path.exists():
        discovery.folders.append(path if path.is_dir() else path.parent)
        _expand_dicom(path, discovery, ingest_cfg, workers)
    else:
        raise InputError(f"input {path} does not exist. Fix the path (list entries are relative to the list file).")


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and is_volume_file(p)
                  and not p.name.lower().endswith(".seg.nrrd"))


def _expand_list(list_file: Path, discovery: Discovery, ingest_cfg, workers: int, seen_lists: set) -> None:
    resolved = list_file.resolve()
    if resolved in seen_lists:
        raise InputError(f"input list {list_file} includes itself (directly or through another list). Remove the loop.")
    seen_lists.add(resolved)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"input list {list_file} must be a readable UTF-8 text file, got {exc}. Fix the file.") \
            from None
    for number, line in enumerate(lines, start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        target = Path(entry) if Path(entry).is_absolute() else list_file.parent / entry
        where = f"input list {list_file.name} line {number}"
        if not target.exists():
            _refuse_entry(discovery, list_file, number, entry, target,
                          f"{where}: the entry must be an existing file or folder, got a path that does not exist "
                          f"(entries are relative to the list file's folder). Fix or remove the line.")
            continue
        found = len(discovery.cases)
        try:
            _expand(target, discovery, ingest_cfg, workers, seen_lists)
        except InputError as exc:  # one bad entry is one failed case; the other entries still run
            del discovery.cases[found:]
            _refuse_entry(discovery, list_file, number, entry, target, f"{where}: {exc}")


def _refuse_entry(discovery: Discovery, list_file: Path, number: int, entry: str, target: Path,
                  reason: str) -> None:
    """A list entry that yields no case becomes a failed case named after the list and the line."""
    discovery.cases.append(Case(case_id=f"{_sanitise(list_file.stem)}-line{number}",
                                source=str(target), error=reason, private=[entry]))


def case_id_from_file(path: Path) -> str:
    stem = strip_volume_suffix(path.name)
    if stem.endswith("_0000"):
        stem = stem[: -len("_0000")]
    return _sanitise(stem)


def _sanitise(text: str) -> str:
    return (_UNSAFE.sub("_", text).strip("_-") or "case")[:80]


def _file_case(path: Path) -> Case:
    return Case(case_id=case_id_from_file(path), source=str(path), path=path)


def _unique_ids(cases: list[Case]) -> list[Case]:
    by_id: dict[str, list[Case]] = {}
    for case in cases:
        by_id.setdefault(case.case_id, []).append(case)
    unique = []
    for case_id, group in by_id.items():
        if len(group) == 1:
            unique.append(group[0])
            continue
        sources = {c.source for c in group}
        if len(sources) < len(group):  # the same input listed twice: keep it once
            group = list({c.source: c for c in group}.values())
        for case in group:
            if len(group) > 1:
                digest = hashlib.sha256(case.source.encode("utf-8")).hexdigest()[:6]
                case.notes.append(f"case id '{case_id}' is shared by {len(group)} inputs; this one is "
                                  f"'{case_id}-{digest}'")
                case.case_id = f"{case_id}-{digest}"
            unique.append(case)
    return unique


def _expand_dicom(root: Path, discovery: Discovery, ingest_cfg, workers: int) -> None:
    from pipeline.dicom.scan import scan_export
    from pipeline.dicom.select import SelectionRules, select_series

    scan = scan_export(root, workers=workers)
    rules = getattr(ingest_cfg, "select", None) or SelectionRules()
    decisions = select_series(scan.series, rules)
    for decision in decisions:
        series = decision.series
        if decision.selected:
            discovery.cases.append(Case(case_id=dicom_case_id(series, ingest_cfg),
                                        source=f"{root} [series {series.short_key}]",
                                        series=series))
        else:
            discovery.skipped.append(f"{root}: {series.name} not selected: {decision.reason}")
    if scan.skipped:
        discovery.skipped.append(f"{root}: {len(scan.skipped)} file(s) are not readable DICOM images and were "
                                 f"skipped")
    if not any(d.selected for d in decisions):
        raise InputError(f"input {root} must contain NIfTI/NRRD/MHA files or a DICOM export with at least one CT "
                         f"series that passes the selection rules, got {len(scan.series)} series and none selected"
                         f"{' (' + decisions[0].reason + ')' if decisions else ''}. Check the path or the rules.")


def dicom_case_id(series, ingest_cfg: Any = None) -> str:
    """The case id of a DICOM series: the one ingest gives it (:func:`pipeline.case_ids.series_case_id`)."""
    from pipeline.case_ids import series_case_id

    return series_case_id(series, anonymise=getattr(ingest_cfg, "anonymise_case_ids", True))


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------

def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """The explicit ``--shard i/n``, else torchrun's RANK / WORLD_SIZE when WORLD_SIZE > 1, else None."""
    if shard is None:
        world = os.environ.get("WORLD_SIZE", "")
        rank = os.environ.get("RANK", "")
        if world.strip().isdigit() and int(world) > 1:
            if not rank.strip().isdigit():
                raise ConfigError(f"RANK must be an integer when WORLD_SIZE={world} is set, got {rank!r}. "
                                  f"Launch with torchrun, or pass --shard i/n.")
            shard = (int(rank), int(world))
    if shard is None:
        return None
    index, count = int(shard[0]), int(shard[1])
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {index}/{count}. Example: --shard 0/4.")
    return index, count


def slurm_shard() -> tuple[int, int]:
    """(i, n) of this task of a SLURM job array (``sbatch --array=0-3``): launcher variables, not configuration."""
    task, first, count = (os.environ.get(name, "") for name in
                          ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"))
    if not task.strip().isdigit() or not count.strip().isdigit():
        raise ConfigError(f"--shard slurm must run inside a SLURM job array (SLURM_ARRAY_TASK_ID and "
                          f"SLURM_ARRAY_TASK_COUNT set), got SLURM_ARRAY_TASK_ID={task!r}, "
                          f"SLURM_ARRAY_TASK_COUNT={count!r}. Submit with sbatch --array=0-N, or pass --shard i/n.")
    index = int(task) - (int(first) if first.strip().isdigit() else 0)
    if not 0 <= index < int(count):
        raise ConfigError(f"--shard slurm needs a contiguous array (e.g. --array=0-3), got task {task} of "
                          f"{count} starting at {first or 0}. Use --shard i/n for other arrays.")
    return index, int(count)


def shard_of(position: int, case_id: str, count: int, shard_by: str = "index") -> int:
    if shard_by == "hash":
        return int(hashlib.sha256(case_id.encode("utf-8")).hexdigest()[:12], 16) % count
    return position % count


def select_shard(cases: list[Case], shard: tuple[int, int] | None, shard_by: str = "index") -> list[Case]:
    """The cases of shard ``(i, n)`` of the sorted list; all cases when ``shard`` is None."""
    if shard is None:
        return list(cases)
    index, count = shard
    return [case for position, case in enumerate(cases) if shard_of(position, case.case_id, count, shard_by) == index]


# ---------------------------------------------------------------------------------------------
# Reading one case
# ---------------------------------------------------------------------------------------------

def read_case(case: Case, ingest_cfg: Any = None, refuse_implausible: bool = True) -> SourceImage:
    """Load the case's HU volume; raises InputError when it is unreadable or does not look like CT."""
    if case.error is not None:
        raise InputError(case.error)
    if case.is_dicom:
        image = _read_dicom(case, ingest_cfg)
    else:
        image = SourceImage(load_volume(case.path), info={"file": str(case.path),
                                                          "bytes": case.path.stat().st_size})
    image.warnings[:0] = case.notes
    _check_ct(image, case, refuse_implausible)
    return image


def _read_dicom(case: Case, ingest_cfg) -> SourceImage:
    from pipeline.dicom.assemble import AssemblyOptions, assemble_series

    options = getattr(ingest_cfg, "assembly", None) or AssemblyOptions()
    assembled = assemble_series(case.series, options)
    info = {"dicom": {k: v for k, v in assembled.provenance.items() if k not in ("series_description",)}}
    return SourceImage(assembled.volume, list(assembled.warnings), info)


def _check_ct(image: SourceImage, case: Case, refuse: bool) -> None:
    array = image.volume.array
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(f"{case.source} must be a 3D volume, got shape {array.shape}. Pass one 3D CT per file.")
    try:
        from pipeline.dicom.plausibility import PlausibilityOptions, check_plausibility
    except ImportError:  # pragma: no cover - the module is part of ctseg; kept optional for partial installs
        return
    problems = check_plausibility(image.volume, case.source, PlausibilityOptions(refuse=False, min_slices=1))
    if problems and refuse:
        details = "; ".join(p.split(": ", 1)[-1] for p in problems)
        raise InputError(f"{case.source} must look like a CT volume in HU, got: {details}. Check that it is the "
                         f"original CT (not MR, a screenshot or a display export), or set "
                         f"predict.refuse_implausible: false to segment it anyway.")
    image.warnings.extend(problems)
