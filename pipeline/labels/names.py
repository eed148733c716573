"""Label names: matching structure names (ROI or segment names) to label values, and merging masks."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Optional

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
    # coded concepts (pipeline.labels.codes): unset parts come from its default table by name
    category: Optional[CodeSpec] = field(default=None, metadata={
        "help": "SNOMED CT segmented property category, e.g. {value: '91723000', meaning: Anatomical Structure}."})
    type: Optional[CodeSpec] = field(default=None, metadata={
        "help": "SNOMED CT segmented property type, e.g. {value: '10200004', meaning: Liver}."})
    modifier: Optional[CodeSpec] = field(default=None, metadata={
        "help": "Optional type modifier, e.g. {value: '7771000', meaning: Left}."})
    rt_type: Optional[RtRoiType] = field(default=None, metadata={
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
    unmatched = []
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
