"""Label names: matching structure names (ROI or segment names) to label values, and merging masks."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ConfigError, InputError
from pipeline.labels.codes import CodeSpec, RtRoiType

log = logging.getLogger("ctseg.labels")


@dataclass
class LabelSpec:
    """One output label: its value, display colour and the structure names that mean it."""

    name: str = field(default="", metadata={"help": "Label name, e.g. liver or GTV_Mass."})
    value: int = field(default=1, metadata={"help": "Voxel value of this label in label maps (1–255)."})
    color: list[int] = field(default_factory=lambda: [255, 0, 0], metadata={"help": "RGB display colour, 0–255."})
    synonyms: list[str] = field(default_factory=list, metadata={
        "help": "Other structure names meaning this label, e.g. GTV_Mass_CT. Matching ignores case, and treats "
                "spaces, '-' and '_' alike."})
    regex: list[str] = field(default_factory=list, metadata={
        "help": "Regular expressions (Python re, searched in the name, case-insensitive) for further structure "
                "names meaning this label, e.g. '^gtv'. Used only when no name or synonym matches exactly."})
    required: bool = field(default=True, metadata={
        "help": "A case whose structure for this label is missing, empty or ambiguous is left out of training "
                "(with the reason in structures.csv). false: such a case is kept and the label is left out "
                "of its label map (its voxels count as background)."})
    # coded concepts (pipeline.labels.codes): unset parts come from its default table by name
    category: CodeSpec | None = field(default=None, metadata={
        "help": "SNOMED CT segmented property category, e.g. {value: '91723000', meaning: Anatomical Structure}."})
    type: CodeSpec | None = field(default=None, metadata={
        "help": "SNOMED CT segmented property type, e.g. {value: '10200004', meaning: Liver}."})
    modifier: CodeSpec | None = field(default=None, metadata={
        "help": "Optional type modifier, e.g. {value: '7771000', meaning: Left}."})
    rt_type: RtRoiType | None = field(default=None, metadata={
        "help": "RT ROI Interpreted Type of the RTSTRUCT output: ORGAN, GTV, CTV, PTV, AVOIDANCE, EXTERNAL, ..."})


def normalise_name(name: str) -> str:
    """Case-insensitive key in which runs of spaces, '-' and '_' are the same separator."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower()).strip("_")


def map_names_to_values(names: list[str], specs: list[LabelSpec], strict: bool = False,
                        source: str = "the label file") -> dict[str, int]:
    """Map each structure name in ``names`` to the value of the LabelSpec it means (by name or synonym).

    The result lists names in the order of ``specs``, so :func:`merge_masks` lets later specs win.
    Every spec must be matched by some name (InputError listing the names ``source`` has).
    Names that match no spec are ignored (an RTSTRUCT holds BODY, couch, …) unless ``strict``.
    """
    keys: dict[str, LabelSpec] = {}
    for spec in specs:
        for alias in [spec.name, *spec.synonyms]:
            key = normalise_name(alias)
            other = keys.get(key)
            if other is not None and other is not spec:
                raise ConfigError(f"label name '{alias}' must belong to one label, got both '{other.name}' "
                                  f"(value {other.value}) and '{spec.name}' (value {spec.value}). Remove one synonym.")
            keys[key] = spec
    matched: dict[int, list[str]] = {id(spec): [] for spec in specs}
    unmatched: list[str] = []
    for name in names:
        spec = keys.get(normalise_name(name))
        if spec is None:
            unmatched.append(name)
        else:
            matched[id(spec)].append(name)
    missing = [spec for spec in specs if not matched[id(spec)]]
    if missing:
        wanted = "; ".join(f"'{s.name}'" + (f" (or {', '.join(s.synonyms)})" if s.synonyms else "") for s in missing)
        raise InputError(f"{source} must contain a structure named {wanted}, got {sorted(names)}. Add the name "
                         f"used there to the label's synonyms in the configuration.")
    if unmatched and strict:
        known = sorted({alias for spec in specs for alias in [spec.name, *spec.synonyms]})
        raise InputError(f"{source}: structure name(s) {unmatched} must match a configured label, known names are "
                         f"{known}. Add them as synonyms, or turn strict matching off to ignore them.")
    if unmatched:
        log.info("%s: ignoring structures %s that match no configured label", source, unmatched)
    return {name: spec.value for spec in specs for name in matched[id(spec)]}


def merge_masks(masks: dict[str, np.ndarray], mapping: dict[str, int]) -> np.ndarray:
    """One label array from boolean masks: ``mapping`` (name → value) order decides, later names overwrite.

    Masks whose name is not in ``mapping`` are left out. Overlaps between different labels are logged
    as a warning with the voxel count, because they usually mean a contouring mistake.
    """
    chosen = [(name, mapping[name]) for name in mapping if name in masks]
    if not chosen:
        raise InputError(f"merge_masks needs at least one mask named in the mapping {list(mapping)}, got masks "
                         f"{list(masks)}. Check the structure names.")
    shapes = {masks[name].shape for name, _ in chosen}
    if len(shapes) != 1:
        raise InputError(f"masks to merge must share one shape, got {sorted(shapes)}. Rasterise all structures "
                         f"on the same image grid.")
    high = max(value for _, value in chosen)
    label = np.zeros(shapes.pop(), dtype=np.uint8 if high <= 255 else np.uint16)
    for name, value in chosen:
        mask = np.asarray(masks[name], dtype=bool)
        overlap = mask & (label != 0) & (label != value)
        if overlap.any():
            previous = sorted({n for n, v in chosen if v in set(np.unique(label[overlap]).tolist())})
            log.warning("%d voxels of '%s' (value %d) overlap %s; '%s' overwrites them", int(overlap.sum()), name,
                        value, previous, name)
        label[mask] = value
    return label


# ---------------------------------------------------------------------------------------------
# Mapping a case's structures to labels, with a reason for every decision
# ---------------------------------------------------------------------------------------------

@dataclass
class StructureMapping:
    """How one case's structures map to labels (see :func:`map_structures`)."""

    chosen: dict[int, int]            # label value -> index of the structure that became it
    label_of: dict[int, str]          # structure index -> label name it was mapped to
    notes: dict[int, str]             # structure index -> why it was not mapped
    left_out: str | None = None       # why the case cannot be used for training (None: it can)
    warnings: list[str] = field(default_factory=list)


def compile_patterns(patterns: list[str], where: str) -> list[re.Pattern]:
    """Case-insensitive compiled regular expressions; a bad one is a ConfigError naming ``where``."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(str(pattern), re.IGNORECASE))
        except re.error as exc:
            raise ConfigError(f"{where}: '{pattern}' must be a valid regular expression, got error: {exc}. "
                              f"Fix or quote the pattern (Python re syntax).") from exc
    return compiled


def map_structures(names: list[str], empty: list[bool], specs: list[LabelSpec], exclude: list[str] = (),
                   where: str = "the dataset description") -> StructureMapping:
    """Map one case's structure ``names`` to the foreground ``specs``; never raises for the data.

    A structure matching an ``exclude`` pattern is never used. For each label, structures whose
    name equals its name or a synonym (ignoring case, and spaces/'-'/'_') are its candidates; only
    when there are none, structures matching one of its ``regex`` are. One candidate becomes the
    label; none is "missing", two or more are "ambiguous" (nothing is guessed), a candidate with no
    voxels is "empty". A structure claimed by two labels is ambiguous for both. A required label
    that is missing, empty or ambiguous leaves the case out of training (``left_out``).
    """
    excluded = compile_patterns(list(exclude), f"{where} exclude")
    notes: dict[int, str] = {}
    usable = []
    for index, name in enumerate(names):
        hit = next((p.pattern for p in excluded if p.search(name)), None)
        if hit is not None:
            notes[index] = f"excluded by '{hit}'"
        else:
            usable.append(index)
    candidates: dict[int, list[int]] = {}
    for spec in specs:
        keys = {normalise_name(alias) for alias in [spec.name, *spec.synonyms]}
        exact = [i for i in usable if normalise_name(names[i]) in keys]
        if not exact and spec.regex:
            patterns = compile_patterns(spec.regex, f"{where} label '{spec.name}' regex")
            exact = [i for i in usable if any(p.search(names[i]) for p in patterns)]
        candidates[spec.value] = exact
    claimed: dict[int, list[LabelSpec]] = {}
    for spec in specs:
        for index in candidates[spec.value]:
            claimed.setdefault(index, []).append(spec)
    result = StructureMapping(chosen={}, label_of={}, notes=notes)
    problems = []
    for spec in specs:
        found = candidates[spec.value]
        shared = [i for i in found if len(claimed[i]) > 1]
        problem = None
        if not found:
            problem = f"label '{spec.name}': no structure matches (structures: {_listing(names, notes)})"
        elif len(found) > 1:
            problem = (f"label '{spec.name}' is ambiguous: {', '.join(repr(names[i]) for i in found)} all match; "
                       f"rename, exclude or narrow the synonyms")
            for i in found:
                notes[i] = f"ambiguous for label '{spec.name}'"
        elif shared:
            others = [s.name for s in claimed[found[0]]]
            problem = f"structure '{names[found[0]]}' matches several labels {others}"
            notes[found[0]] = f"matches several labels {others}"
        elif empty[found[0]]:
            problem = f"label '{spec.name}': structure '{names[found[0]]}' is empty"
            notes[found[0]] = f"empty: label '{spec.name}' has no voxels in this case"
        else:
            result.chosen[spec.value] = found[0]
            result.label_of[found[0]] = spec.name
            continue
        if spec.required or "ambiguous" in problem or "several labels" in problem:
            problems.append(problem)
        else:
            result.warnings.append(f"{problem}; optional label left out of this case's label map")
    for index in range(len(names)):
        if index not in result.label_of and index not in notes:
            notes[index] = "matches no label"
    if problems:
        result.left_out = "; ".join(problems)
        for index in list(result.label_of):
            notes[index] = f"would be label '{result.label_of.pop(index)}', but the case is left out"
        result.chosen = {}
    return result


def _listing(names: list[str], notes: dict[int, str]) -> str:
    shown = [repr(n) + (" (excluded)" if notes.get(i, "").startswith("excluded") else "") for i, n in enumerate(names)]
    return ", ".join(shown) if shown else "none"
