"""Connected-component clean-up of label maps: the one component labelling, per-class rules, and their choice by CV.

One function labels connected components (:func:`label_components`, 26-connectivity, as everywhere in ctseg);
training fingerprints, trust flags, configured and decided clean-up all count components with it.

A :class:`Rule` is what may be done to one class: keep only its largest component, and/or remove its components
smaller than ``min_component_ml``. Thresholds are physical volumes (mL), so a rule chosen on the model grid
applies unchanged on any other grid: :func:`apply_rules` counts each component's volume with the voxel volume of
the grid it is given. Predict applies rules on the source grid after reassembly, so what a rule guarantees (one
component, no island below N mL) holds in the written file.

:func:`decide` chooses the rules from cross-validation predictions as nnU-Net's ``determine_postprocessing`` does:
a rule is kept for a class only if it raises that class's mean Dice over the validation cases (strictly; ties and
losses keep the prediction as it is). nnU-Net also tries "largest component of all foreground together", kept only
when the foreground mean rises and no class's Dice drops; ctseg's rules act per class and set only that class's
voxels to background, so no other class's Dice can change and that check holds by construction. Besides nnU-Net's
largest component, removing components under N mL is tried for a few N: fractions (:data:`THRESHOLD_FRACTIONS`)
of the smallest component any training label of the class has. A case where the class is absent from both the
reference and the prediction scores Dice 1 (so every mean is over the same cases, with and without a rule).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import torchrun

STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
# Fractions of the smallest training component of the class. Not 1.0: a new patient's organ or tumour may well
# be smaller than every training one, and a threshold at the smallest size seen deletes it whole (the bench's
# phantom network decided "kidney components < 219 mL" on one validation case, and removed a real kidney).
THRESHOLD_FRACTIONS = (0.1, 0.25, 0.5)
IMPROVEMENT = 1e-9  # a rule must raise the mean Dice by more than float rounding


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of a boolean mask: (component number per voxel, 0 outside; voxels per component)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        # components do not depend on the axis order (26-connectivity is symmetric), and scipy's label runs
        # several times faster on C order: a 512x512x300 NIfTI label map (Fortran order, as predict holds it)
        # took 4.9 s, its transposed view 1.1 s, with the same sizes
        components, sizes = label_components(mask.T)
        return components.T, sizes
    components, count = ndimage.label(mask, structure=STRUCTURE)
    # count the component voxels only: a bincount of the whole box first casts it to int64, a fresh array of
    # 8 bytes per voxel (150 MB for a liver's box in a 512x512x300 CT, 1-2 s on a VM that faults pages in slowly)
    return components, np.bincount(components[components > 0], minlength=count + 1)[1:]


def label_boxes(labels: np.ndarray, max_label: int) -> dict[int, tuple[slice, ...]]:
    """Bounding boxes of the label values 1..max_label present in an integer ``labels`` volume (absent: no key).

    Max-projections (vectorised) first find the box of all foreground; scipy's ``find_objects``, an element-by-
    element pass, then scans only that box, in memory order: on a Fortran-ordered volume (a NIfTI label map, as
    predict holds it) it runs on the transposed view, 5x faster than on the volume as given (1.36 against 0.25 s
    for a 512x512x300 label map).
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.flags.f_contiguous and not labels.flags.c_contiguous:
        return {value: box[::-1] for value, box in label_boxes(labels.T, max_label).items()}
    if labels.size == 0 or max_label < 1:
        return {}
    outer: tuple[slice, ...] = ()
    if labels.ndim > 1:
        projection = labels.max(axis=-1) > 0  # the first axes' box from a projection along the last one
        if not projection.any():
            return {}
        spans = [np.flatnonzero(projection.any(axis=tuple(a for a in range(projection.ndim) if a != d)))
                 for d in range(projection.ndim)]
        outer = tuple(slice(int(span[0]), int(span[-1]) + 1) for span in spans)
        # a max, not (labels > 0).any(): no box-sized temporary (fresh memory faults in slowly on some VMs)
        last = np.flatnonzero(labels[outer].max(axis=tuple(range(labels.ndim - 1))) > 0)
        outer += (slice(int(last[0]), int(last[-1]) + 1),)
    else:
        outer = (slice(0, labels.shape[0]),)
    offset = [s.start for s in outer]
    region = labels[outer]
    # in slabs along the first axis, one thread each (find_objects releases the GIL: 0.12 -> 0.07 s for a
    # 512x512x300 label map on 2 cores), then each label's boxes joined
    cuts = np.linspace(0, region.shape[0], max(1, min(torchrun.cores_per_process(), region.shape[0])) + 1).astype(int)
    slabs = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    with ThreadPoolExecutor(max_workers=len(slabs)) as pool:
        found = list(pool.map(lambda slab: ndimage.find_objects(region[slab[0]:slab[1]], max_label=max_label),
                              slabs))
    boxes: dict[int, tuple[slice, ...]] = {}
    for (start, _), slab_boxes in zip(slabs, found):
        for value, box in enumerate(slab_boxes, start=1):
            if box is None:
                continue
            box = (slice(box[0].start + start, box[0].stop + start),) + tuple(box[1:])
            known = boxes.get(value)
            boxes[value] = box if known is None else tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                                                           for a, b in zip(known, box))
    return {value: tuple(slice(s.start + o, s.stop + o) for s, o in zip(boxes[value], offset))
            for value in sorted(boxes)}


def components_by_class(labels: np.ndarray, values: list[int]) -> Iterator[tuple[int, tuple[slice, ...], np.ndarray,
                                                                              np.ndarray]]:
    """``(value, box, components, sizes)`` for each of ``values`` present in an integer ``labels`` volume, in order.

    ``components`` and ``sizes`` are :func:`label_components` of the value's mask within its bounding ``box``.
    The masks are labelled in threads, one per core (scipy's labelling releases the GIL: 0.38 -> 0.22 s for the
    predict benchmark's three classes on 2 cores), at most two per core ahead of the one handed out, so only
    that many component maps are held at once. Each mask is taken in the calling thread before its labelling is
    queued; the caller may turn voxels of a class it has been given to background before asking for the next
    (the clean-up does): that changes no other class's mask.
    """
    boxes = label_boxes(labels, max(values, default=0))
    present = [value for value in values if value in boxes]
    queue = iter(present)
    workers = max(1, min(len(present), torchrun.cores_per_process()))
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def queue_next() -> None:
            value = next(queue, None)
            if value is not None:
                pending.append((value, pool.submit(label_components, labels[boxes[value]] == value)))

        for _ in range(2 * workers):
            queue_next()
        while pending:
            value, labelled = pending.popleft()
            components, sizes = labelled.result()
            queue_next()
            yield value, boxes[value], components, sizes


@dataclass(frozen=True)
class Rule:
    """The clean-up of one class (both parts may be set: small components go, then only the largest stays)."""

    keep_largest_component: bool = False
    min_component_ml: float | None = None

    @property
    def empty(self) -> bool:
        return not self.keep_largest_component and self.min_component_ml is None

    def keep(self, sizes: np.ndarray, voxel_ml: float) -> np.ndarray:
        """Which of the components (voxel counts ``sizes``) the rule keeps."""
        keep = np.ones(len(sizes), dtype=bool)
        if self.min_component_ml is not None:
            keep &= sizes * voxel_ml >= self.min_component_ml
        if self.keep_largest_component and len(sizes) > 1:
            keep &= np.arange(len(sizes)) == int(np.argmax(sizes))
        return keep

    def describe(self) -> str:
        parts = (["keep the largest component"] if self.keep_largest_component else []) + (
            [f"remove components under {self.min_component_ml:.4g} mL"] if self.min_component_ml is not None else [])
        return " and ".join(parts) or "none"

    def to_json(self) -> dict:
        return {"keep_largest_component": self.keep_largest_component, "min_component_ml": self.min_component_ml}

    @classmethod
    def from_json(cls, data: dict) -> Rule:
        ml = data.get("min_component_ml")
        return cls(bool(data.get("keep_largest_component", False)), None if ml is None else float(ml))


def apply_rules(labels: np.ndarray, voxel_ml: float, rules: dict[int, Rule], names: dict[int, str],
                kept_sizes: dict[int, np.ndarray] | None = None) -> list[dict]:
    """Apply ``rules`` (by label value) to ``labels`` in place; one record per class that had components.

    ``voxel_ml``: the voxel volume of the grid ``labels`` lies on. Each record names the class, the rule, the
    components found and removed, the removed volume and a one-line note for provenance and the report.
    ``kept_sizes``, when given, receives per ruled class the voxel counts of the components left, in
    :func:`label_components`' order: what labelling the class again would give (whole components were removed),
    so the trust step need not label it again.
    """
    active = {value: rule for value, rule in rules.items() if not rule.empty}
    if not active:
        return []
    records = []
    for value, box, components, sizes in components_by_class(labels, sorted(active)):
        records.append(_apply_rule(labels[box], value, active[value], components, sizes, voxel_ml, names))
        if kept_sizes is not None:
            kept_sizes[value] = sizes[active[value].keep(sizes, voxel_ml)]
    if kept_sizes is not None:  # ruled classes that are absent have no components
        kept_sizes.update({value: np.zeros(0, dtype=np.int64) for value in active if value not in kept_sizes})
    return records


def _apply_rule(region: np.ndarray, value: int, rule: Rule, components: np.ndarray, sizes: np.ndarray,
                voxel_ml: float, names: dict[int, str]) -> dict:
    """One class's rule on its box ``region`` (a view: edits land in the label map); its record."""
    keep = rule.keep(sizes, voxel_ml)
    removed = ~keep
    removed_ml = float(sizes[removed].sum() * voxel_ml)
    name = names.get(value, str(value))
    if removed.any():
        # a lookup table by component number: np.isin over the boxes took 0.23 s for 184 removed islands
        region[np.concatenate(([False], removed))[components]] = 0
        note = (f"{name}: removed {int(removed.sum())} of {len(sizes)} connected components ({removed_ml:.2f} mL; "
                f"rule: {rule.describe()})")
    else:
        note = f"{name}: {len(sizes)} connected component(s), none removed (rule: {rule.describe()})"
    return {"label": name, "rule": rule.to_json(), "components": int(len(sizes)), "removed": int(removed.sum()),
            "removed_ml": round(removed_ml, 4), "kept_ml": round(float(sizes[keep].sum() * voxel_ml), 4), "note": note}


# ---------------------------------------------------------------------------------------------
# The decision from cross-validation predictions
# ---------------------------------------------------------------------------------------------

@dataclass
class ClassComponents:
    """One case's prediction of one class, as the decision needs it: its components and their overlaps."""

    sizes: np.ndarray      # voxels of each predicted component
    overlaps: np.ndarray   # reference voxels of the class inside each component
    reference: int         # reference voxels of the class

    def dice(self, rule: Rule, voxel_ml: float) -> float:
        keep = rule.keep(self.sizes, voxel_ml) if len(self.sizes) else np.zeros(0, dtype=bool)
        predicted = int(self.sizes[keep].sum())
        if predicted + self.reference == 0:
            return 1.0  # absent from both: right (see module docstring)
        return 2.0 * int(self.overlaps[keep].sum()) / (predicted + self.reference)


def class_components(prediction: np.ndarray, reference: np.ndarray, values: list[int]) -> dict[int, ClassComponents]:
    """Per class value, the components of ``prediction`` and their overlap with ``reference`` (same grid)."""
    found = {}
    for value in values:
        truth = reference == value
        components, sizes = label_components(prediction == value)
        overlaps = np.bincount(components[truth], minlength=len(sizes) + 1)[1:]
        found[value] = ClassComponents(sizes, overlaps, int(truth.sum()))
    return found


def smallest_component_ml(labels: Iterable[np.ndarray], values: list[int], voxel_ml: float) -> dict[int, float | None]:
    """Per class value, the volume (mL) of the smallest connected component in any of the label maps."""
    smallest: dict[int, float | None] = {value: None for value in values}
    for label in labels:
        for value in values:
            _, sizes = label_components(label == value)
            if len(sizes):
                ml = float(sizes.min()) * voxel_ml
                known = smallest[value]
                smallest[value] = ml if known is None else min(known, ml)
    return smallest


def candidate_rules(smallest_ml: float | None) -> list[Rule]:
    """The rules tried for one class: removal under fractions of its smallest training component, then LCC."""
    thresholds = sorted({round(f * smallest_ml, 6) for f in THRESHOLD_FRACTIONS}) if smallest_ml else []
    return [Rule(min_component_ml=t) for t in thresholds if t > 0] + [Rule(keep_largest_component=True)]


def decide(cases: dict[str, dict[int, ClassComponents]], classes: dict[int, str], voxel_ml: float,
           smallest_ml: dict[int, float | None]) -> dict:
    """The rule per class that raises its mean Dice over ``cases`` the most, or none (see module docstring).

    ``cases``: per case id, :func:`class_components` of its CV prediction; ``classes``: name per value.
    Returns the figures and decisions that :func:`pipeline.models.folder.write_postprocessing` stores.
    """
    decided = {}
    for value, name in classes.items():
        scored = [c[value] for c in cases.values() if value in c]
        baseline = float(np.mean([c.dice(Rule(), voxel_ml) for c in scored])) if scored else float("nan")
        tried = []
        best, best_dice = None, baseline
        for rule in candidate_rules(smallest_ml.get(value)):
            mean = float(np.mean([c.dice(rule, voxel_ml) for c in scored])) if scored else float("nan")
            tried.append({**rule.to_json(), "mean_dice": round(mean, 6)})
            if scored and mean > best_dice + IMPROVEMENT:
                best, best_dice = rule, mean
        split = sum(int(len(c.sizes) > 1) for c in scored)
        if best is None:
            reason = (f"no rule raised the mean Dice ({baseline:.4f} over {len(scored)} cases; {split} with more than "
                      f"one predicted component)" if scored else "no validation case")
        else:
            reason = f"{best.describe()}: mean Dice {baseline:.4f} -> {best_dice:.4f} over {len(scored)} cases"
        decided[name] = {
            "value": int(value), "cases": len(scored), "cases_with_several_components": split,
            "rule": best.to_json() if best is not None else None,
            "dice_without": round(baseline, 6) if scored else None,
            "dice_with": round(best_dice, 6) if scored else None,
            "smallest_training_component_ml": None if smallest_ml.get(value) is None
            else round(float(smallest_ml[value]), 6),
            "candidates": tried, "reason": reason,
        }
    case_dice: dict[str, dict] = {}
    for case_id, per_class in cases.items():
        case_dice[case_id] = {}
        for value, name in classes.items():
            if value not in per_class:
                continue
            rule = Rule.from_json(decided[name]["rule"]) if decided[name]["rule"] else Rule()
            case_dice[case_id][name] = {"without": round(per_class[value].dice(Rule(), voxel_ml), 6),
                                        "with": round(per_class[value].dice(rule, voxel_ml), 6)}
    means = [(d["dice_without"], d["dice_with"]) for d in decided.values() if d["dice_without"] is not None]
    return {"classes": decided, "cases": len(cases), "voxel_ml": voxel_ml,
            "mean_foreground_dice_without": round(float(np.mean([m[0] for m in means])), 6) if means else None,
            "mean_foreground_dice_with": round(float(np.mean([m[1] for m in means])), 6) if means else None,
            "case_dice": case_dice}


def decided_rules(decision: dict | None) -> dict[str, Rule]:
    """The rules a stored decision applies, by class name (classes with no rule left out)."""
    if not decision:
        return {}
    return {name: Rule.from_json(entry["rule"]) for name, entry in decision.get("classes", {}).items()
            if entry.get("rule")}
