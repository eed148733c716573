"""``dataset.suggested.yaml``: the structure names an export holds, grouped into suggested labels.

Names are listed most frequent first (by the number of cases holding them). Names that differ only
by case, spacing/'-'/'_' or a numeric suffix (``GTV``, ``gtv``, ``GTV_1``, ``GTV 2``) form one group.
A group whose names start with the word that another group consists of (``GTV Primary`` and
``GTV``) joins that group only when no case holds names of both: two structures of one patient
are two things, one name per patient is one thing named differently. Helper structures
(``z_``/``x_`` prefixes, couch, table) are suggested as ``exclude`` patterns rather than labels.
Where a group matches a name of the small AAPM TG-263 table (:mod:`pipeline.labels.tg263`), that
standard name becomes the label name and every name found is kept as a synonym.

The file is a valid dataset description: edit it (drop labels, fix synonyms), then rerun
``ctseg ingest ... --set dataset=<file>``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import atomic
from pipeline.labels.names import normalise_name

FILE = "dataset.suggested.yaml"
HELPER_PATTERNS = [("^z_", "helper structures (z_ prefix)"), ("^x_", "helper structures (x_ prefix)"),
                   ("couch", "treatment couch"), ("table", "treatment table")]
PALETTE = [(255, 0, 0), (0, 170, 0), (0, 90, 255), (255, 170, 0), (170, 0, 255), (0, 200, 200), (255, 0, 170),
           (128, 128, 0), (0, 128, 128), (128, 0, 0)]


@dataclass
class NameGroup:
    key: str
    names: Counter = field(default_factory=Counter)   # name -> number of cases holding it
    cases: set = field(default_factory=set)
    colors: Counter = field(default_factory=Counter)
    joined: list[str] = field(default_factory=list)   # names that joined by the first-word rule

    @property
    def frequency(self) -> int:
        return len(self.cases)


def base_key(name: str) -> str:
    """Normalised name without a numeric suffix: ``GTV_1``, ``gtv 2``, ``GTV1`` → ``gtv``."""
    key = normalise_name(name)
    stripped = re.sub(r"_\d+$", "", key)
    stripped = re.sub(r"(?<=[a-z]{3})\d+$", "", stripped)
    return stripped or key


def group_names(rows) -> tuple[list[NameGroup], dict[str, list[str]]]:
    """Groups of structure names (most frequent first) and the helper names per exclude pattern."""
    helpers: dict[str, list[str]] = {}
    groups: dict[str, NameGroup] = {}
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if not row.name:
            continue
        pattern = next((p for p, _ in HELPER_PATTERNS if re.search(p, row.name, re.IGNORECASE)), None)
        if pattern is not None:
            helpers.setdefault(pattern, [])
            if row.name not in helpers[pattern]:
                helpers[pattern].append(row.name)
            continue
        group = groups.setdefault(base_key(row.name), NameGroup(base_key(row.name)))
        if (row.case, row.name) not in seen:
            seen.add((row.case, row.name))
            group.names[row.name] += 1
        group.cases.add(row.case)
        if row.color:
            group.colors[row.color] += 1
    ordered = sorted(groups.values(), key=lambda g: (-g.frequency, g.key))
    merged: list[NameGroup] = []
    for group in ordered:
        first_word = group.key.split("_")[0]
        target = next((g for g in merged if g.key == first_word and g is not group and not (g.cases & group.cases)),
                      None)
        if target is not None and first_word != group.key:
            target.names.update(group.names)
            target.cases |= group.cases
            target.colors.update(group.colors)
            target.joined.extend(group.names)
        else:
            merged.append(group)
    merged.sort(key=lambda g: (-g.frequency, g.key))
    return merged, helpers


def write_suggested(out: Path, rows, case_count: int, source: Path | None) -> Path:
    """Write ``dataset.suggested.yaml`` into ``out`` from the inventory ``rows``; returns its path."""
    from pipeline.labels.tg263 import standard_name

    groups, helpers = group_names(rows)
    lines = [f"# Suggested by ctseg ingest from the structures of {case_count} case(s); see structures.csv.",
             "# Names are grouped (most frequent first) when they differ only by case, spacing or a numeric",
             "# suffix, or start with another group's word and never occur in the same case. Review every",
             "# group, delete the labels you do not want to train, then rerun:",
             "#   ctseg ingest <export> --output <this folder> --set dataset=<this file>",
             "# Every label is required: a case whose structure is missing, empty or ambiguous is left out",
             "# of training (reason in structures.csv); set 'required: false' to keep such cases.",
             "name: suggested"]
    if source is not None:
        lines.append(f"source: {json.dumps(str(Path(source).resolve()))}")
    lines += ["labels:", "  - {name: background, value: 0, color: [0, 0, 0]}"]
    used = set()
    found_keys = {normalise_name(name): group.key for group in groups for name in group.names}
    for value, group in enumerate(groups, start=1):
        names = [name for name, _ in sorted(group.names.items(), key=lambda item: (-item[1], item[0]))]
        standard = standard_name(names)
        if standard and (normalise_name(standard) in used or
                         found_keys.get(normalise_name(standard), group.key) != group.key):
            standard = None  # another group holds that name: a label name must not match its structures
        label_name = standard or names[0]
        if normalise_name(label_name) in used:
            label_name = f"{label_name}_{value}"
        used.add(normalise_name(label_name))
        synonyms = [n for n in names if n != label_name]
        color = _color(group, value)
        counts = ", ".join(f"{n} ×{group.names[n]}" for n in names)
        note = f"in {group.frequency} of {case_count} case(s): {counts}"
        if standard:
            note += f"; TG-263 name {standard}"
        if group.joined:
            note += f"; joined by first word, never in one case together: {', '.join(group.joined)} (check)"
        lines.append(f"  # {note}")
        lines.append(f"  - {{name: {json.dumps(label_name)}, value: {value}, color: [{', '.join(map(str, color))}], "
                     f"synonyms: [{', '.join(json.dumps(n) for n in synonyms)}]}}")
    if helpers:
        lines.append("exclude:")
        for pattern, found in helpers.items():
            why = dict(HELPER_PATTERNS)[pattern]
            lines.append(f"  - {json.dumps(pattern)}   # {why}: {', '.join(found)}")
    else:
        lines.append("exclude: []")
    path = Path(out) / FILE
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path


def _color(group: NameGroup, value: int) -> tuple[int, int, int]:
    if group.colors:
        text = group.colors.most_common(1)[0][0]
        parts = [int(v) for v in text.split()]
        if len(parts) == 3:
            return tuple(parts)
    return PALETTE[(value - 1) % len(PALETTE)]
