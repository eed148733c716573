"""Which results to distrust: plausibility flags against the training fingerprint, and a per-case confidence.

Flags (each with its reason; they go into the case's warnings, the ledger's summary and the report):

- ``volume_low`` / ``volume_high``: a label's volume below the smallest training volume divided by
  ``predict.trust.volume_margin`` (default 2: below half the smallest) or above the largest times it
  (above twice the largest). Volumes are measured on the case's own grid, as in training.
- ``label_missing``: a label predicted empty that was present in every training case.
- ``components``: more connected components (26-connectivity, after ``predict.postprocess``) than
  any training case had for that label, counting only components of at least
  ``component_min_fraction`` (default 0.1) of the label's smallest training volume: specks of a
  few voxels are not a second organ. (Training labels count every component: a lenient limit.)
- ``spacing`` / ``field_of_view``: the voxel spacing or the image extent along R, A or S outside
  [training min / ``input_margin``, training max × ``input_margin``] (default margin 2).
- ``hu_distribution``: the Wasserstein-1 distance (HU) between the body HU histogram of the case
  and that of the most similar training case exceeds ``max(hu_distance_floor_hu,
  hu_spread_factor × s)``, where ``s`` is the largest such distance of a training case to the most
  similar other training case (the training set's own spread); defaults 10 HU and 2. The fraction
  of body voxels in HU bins no training case had is given in the reason.

The confidence (0 = distrust, 1 = as certain as the model can be) is

    confidence = (1 - H) × A × 0.5 ** n_flags

- ``H``: mean normalised softmax entropy (entropy / ln K, in [0, 1]) over the voxels predicted
  foreground, on the model grid (at most 200 000 of them, evenly spaced); taken as 0 (no penalty)
  when the probabilities were not kept (nearest reassembly, streaming stitching) or nothing was
  predicted (an empty result is flagged by ``label_missing`` instead);
- ``A``: the mean Dice (over foreground classes, micro-averaged over the sliding windows) between
  each ensemble member (fold × TTA mirroring) and the ensemble's own labels; 1 with a single member
  (one fold without TTA: a mirrored pass would double the inference time, so none is added);
- ``n_flags``: the number of flags above.

A case **needs review** when it has a flag or its confidence is below ``predict.trust.review_below``.
The morning report lists failed cases first, then the others by increasing confidence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import training_fingerprint as tfp
from pipeline.geometry import Grid

ENTROPY_SAMPLES = 200_000
INPUT_CODES = ("spacing", "field_of_view", "hu_distribution")
AXES = ("R-L", "A-P", "S-I")


@dataclass
class Flag:
    code: str
    reason: str
    label: str | None = None

    @property
    def kind(self) -> str:
        return "unfamiliar input" if self.code in INPUT_CODES else "implausible result"

    def to_json(self) -> dict:
        return {"code": self.code, "kind": self.kind, "label": self.label, "reason": self.reason}

    def warning(self) -> str:
        return f"{self.kind}: {self.reason}"


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def input_flags(image: np.ndarray, grid: Grid, fingerprint: dict, options) -> tuple[list[Flag], dict]:
    """Flags for an input unlike the training inputs, and the measured figures."""
    flags: list[Flag] = []
    measured = tfp.grid_fingerprint(grid)
    margin = float(options.input_margin)
    for key, code, what in (("spacing_mm", "spacing", "voxel spacing"), ("extent_mm", "field_of_view",
                                                                        "field of view")):
        low, high = fingerprint[key]["min"], fingerprint[key]["max"]
        for axis, value in enumerate(measured[key]):
            if value < low[axis] / margin or value > high[axis] * margin:
                flags.append(Flag(code, f"{what} {value:g} mm along {AXES[axis]} is outside the training range "
                                        f"{low[axis]:g}-{high[axis]:g} mm by more than a factor {margin:g}"))
    fractions, read = tfp.body_hu_fractions(image, grid, float(fingerprint["body_threshold_hu"]))
    histogram = fingerprint["hu_histogram"]
    pooled = np.asarray(histogram["pooled"], dtype=float)
    spread = max(histogram.get("nearest_other_wasserstein_hu") or [0.0])
    limit = max(float(options.hu_distance_floor_hu), float(options.hu_spread_factor) * spread)
    distance = min(tfp.wasserstein_hu(fractions, case) for case in histogram["cases"]) if read else float("inf")
    unseen = float(fractions[pooled <= 0].sum()) if read else 1.0
    measured.update({"hu_wasserstein_hu": round(distance, 2) if math.isfinite(distance) else None,
                     "hu_limit_hu": round(limit, 2), "hu_unseen_fraction": round(unseen, 4), "hu_voxels_read": read})
    if distance > limit:
        text = ("no body voxels (none above the training's body threshold "
                f"{fingerprint['body_threshold_hu']:g} HU)") if not read else (
            f"body HU distribution is {distance:.0f} HU (Wasserstein) from the most similar training case's "
            f"(limit {limit:.0f} HU); {100 * unseen:.1f}% of body voxels lie in HU ranges no training case had")
        flags.append(Flag("hu_distribution", text))
    return flags, measured


def result_flags(labels: np.ndarray, volumes: dict, label_infos, fingerprint: dict, options,
                 grid: Grid | None = None, known_sizes: dict | None = None) -> tuple[list[Flag], dict]:
    """Flags for label volumes and component counts outside what training showed.

    ``known_sizes``: component voxel counts per label value already known for ``labels`` as they are (the
    clean-up's, :func:`pipeline.postprocessing.apply_rules`); the other present values are labelled here.
    """
    from pipeline.geometry import voxel_volume_ml

    flags: list[Flag] = []
    margin = float(options.volume_margin)
    trained = fingerprint["labels"]
    present = [info.value for info in label_infos if volumes.get(info.name, {}).get("voxels", 0) > 0]
    known = known_sizes or {}
    missing = [value for value in present if value not in known]
    sizes = {**known, **(tfp.component_sizes(labels, missing) if missing else {})}
    measured = {}
    for info in label_infos:
        reference = trained.get(info.name)
        volume = float(volumes.get(info.name, {}).get("volume_ml", 0.0) or 0.0)
        voxels = int(volumes.get(info.name, {}).get("voxels", 0) or 0)
        found = sizes.get(info.value, np.zeros(0, dtype=np.int64))
        span = reference.get("volume_ml") if reference else None
        # components smaller than a fraction of the smallest training volume are specks, not counted
        voxel_ml = voxel_volume_ml(grid) if grid is not None else (volume / voxels if voxels else 0.0)
        smallest_ml = float(options.component_min_fraction) * span["min"] if span else 0.0
        count = int(np.count_nonzero(found * voxel_ml >= smallest_ml)) if found.size else 0
        measured[info.name] = {"components": int(found.size), "components_counted": count,
                               "count_from_ml": round(smallest_ml, 4)}
        if reference is None:
            continue
        if volume <= 0:
            if reference["present_in"] == reference["cases"]:
                flags.append(Flag("label_missing", f"{info.name} is empty but was present in all "
                                                   f"{reference['cases']} training cases", info.name))
            continue
        if span is None:
            flags.append(Flag("volume_high", f"{info.name} is present ({volume:.1f} mL) but was absent from "
                                             f"every training case", info.name))
            continue
        if volume < span["min"] / margin:
            flags.append(Flag("volume_low", f"{info.name} volume {volume:.1f} mL is below 1/{margin:g} of the "
                                            f"smallest training volume ({span['min']:.1f} mL)", info.name))
        elif volume > span["max"] * margin:
            flags.append(Flag("volume_high", f"{info.name} volume {volume:.1f} mL is above {margin:g}× the "
                                             f"largest training volume ({span['max']:.1f} mL)", info.name))
        most = int(reference["components"]["max"]) if reference.get("components") else 0
        if count > most:
            flags.append(Flag("components", f"{info.name} has {count} connected components of at least "
                                            f"{smallest_ml:.2g} mL; no training case had more than {most}", info.name))
    return flags, measured


# ---------------------------------------------------------------------------------------------
# Uncertainty: entropy and ensemble agreement
# ---------------------------------------------------------------------------------------------

def foreground_entropy(probabilities: np.ndarray | None, classes: np.ndarray) -> float | None:
    """Mean normalised softmax entropy over the voxels whose predicted class is not background."""
    if probabilities is None or probabilities.shape[0] < 2:
        return None
    index = np.flatnonzero(classes.reshape(-1) != 0)
    if index.size == 0:
        return None
    if index.size > ENTROPY_SAMPLES:  # a regular subsample of the foreground estimates the mean well
        index = index[::math.ceil(index.size / ENTROPY_SAMPLES)]
    p = probabilities.reshape(probabilities.shape[0], -1)[:, index].astype(np.float64)  # [K, n]
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=0)
    return float(entropy.mean()) / math.log(probabilities.shape[0])


class MemberAgreement:
    """Counts, window by window, how far each ensemble member's labels agree with the ensemble's.

    Attached to a :class:`~pipeline.predict.inference.WindowPredictor` as its ``observer`` when it
    runs more than one member per window (folds × TTA mirrorings); it then sees every member's
    log-probabilities and the ensemble's, and adds up per member the foreground overlap on every
    second voxel along each axis (an eighth of the voxels, so the argmax is a small fraction of a
    network pass).
    """

    def __init__(self, window_predictor):
        self.window_predictor = window_predictor
        self.members = window_predictor.passes_per_window
        self.overlap = np.zeros(self.members)
        self.sizes = np.zeros(self.members)
        self._pending: list = []

    @classmethod
    def attach(cls, window_predictor) -> MemberAgreement | None:
        if window_predictor is None or window_predictor.passes_per_window < 2:
            return None
        observer = cls(window_predictor)
        window_predictor.observer = observer
        return observer

    def detach(self) -> None:
        self.window_predictor.observer = None

    @staticmethod
    def _classes(log_probs: torch.Tensor):
        """Argmax over classes of every second voxel per spatial axis.

        On the CPU in NumPy: single-threaded, so these small reductions never wait for the thread
        pool of the network's own operations.
        """
        sub = log_probs[:, :, ::2, ::2, ::2]
        if sub.device.type == "cpu":
            return np.argmax(sub.numpy(), axis=1)
        return sub.argmax(dim=1)

    def member(self, log_probs: torch.Tensor) -> None:
        self._pending.append(self._classes(log_probs))

    def ensemble(self, log_probs: torch.Tensor) -> None:
        ensemble = self._classes(log_probs)
        ensemble_size = float((ensemble != 0).sum())
        for n, classes in enumerate(self._pending):
            member_fg = classes != 0
            self.overlap[n] += float((member_fg & (classes == ensemble)).sum())
            self.sizes[n] += float(member_fg.sum()) + ensemble_size
        self._pending = []

    def dice(self) -> float | None:
        """Mean over members of the Dice with the ensemble (None when nothing was foreground)."""
        valid = self.sizes > 0
        if not valid.any():
            return None
        return float((2 * self.overlap[valid] / self.sizes[valid]).mean())


# ---------------------------------------------------------------------------------------------
# The score
# ---------------------------------------------------------------------------------------------

@dataclass
class Assessment:
    """One case's flags, uncertainty and confidence."""

    flags: list[Flag] = field(default_factory=list)
    entropy: float | None = None
    agreement: float | None = None
    members: int = 1
    confidence: float = 1.0
    needs_review: bool = False
    review_reasons: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    fingerprint: bool = True

    def to_json(self) -> dict:
        return {"confidence": round(self.confidence, 4), "needs_review": self.needs_review,
                "review_reasons": self.review_reasons, "flags": [f.to_json() for f in self.flags],
                "entropy": None if self.entropy is None else round(self.entropy, 4),
                "ensemble_dice": None if self.agreement is None else round(self.agreement, 4),
                "members": self.members, "training_fingerprint": self.fingerprint, "measured": self.measured}


def confidence_score(entropy: float | None, agreement: float | None, n_flags: int) -> float:
    """(1 - H) × A × 0.5 ** n_flags, with a missing term counting as no penalty (see module docstring)."""
    score = 1.0 - (entropy if entropy is not None else 0.0)
    score *= agreement if agreement is not None else 1.0
    return max(0.0, min(1.0, score * 0.5 ** n_flags))


def assess_case(image: np.ndarray, labels: np.ndarray, grid: Grid, volumes: dict, label_infos,
                fingerprint: dict | None, probabilities: np.ndarray | None, classes: np.ndarray,
                agreement: MemberAgreement | None, options, known_sizes: dict | None = None) -> Assessment:
    """Everything the morning report needs to rank one finished case (see module docstring).

    ``known_sizes``: see :func:`result_flags`."""
    assessment = Assessment(fingerprint=fingerprint is not None)
    if fingerprint is not None:
        input_found, input_measured = input_flags(image, grid, fingerprint, options)
        result_found, result_measured = result_flags(labels, volumes, label_infos, fingerprint, options, grid,
                                                     known_sizes)
        assessment.flags = input_found + result_found
        assessment.measured = {"input": input_measured, "labels": result_measured}
    assessment.entropy = foreground_entropy(probabilities, classes)
    if agreement is not None:
        assessment.agreement = agreement.dice()
        assessment.members = agreement.members
    assessment.confidence = confidence_score(assessment.entropy, assessment.agreement, len(assessment.flags))
    reasons = [flag.warning() for flag in assessment.flags]
    if assessment.confidence < float(options.review_below):
        reasons.append(f"low confidence {assessment.confidence:.2f} (below {float(options.review_below):g})")
    if fingerprint is None:
        assessment.measured["note"] = f"the model folder has no {tfp.FILE}: volumes and inputs not checked"
    assessment.review_reasons = reasons
    assessment.needs_review = bool(reasons)
    return assessment


def warnings_for(assessment: Assessment) -> list[str]:
    """The lines the case's warnings get: one per flag, and the low confidence when that alone asks for review."""
    return list(assessment.review_reasons)


# ---------------------------------------------------------------------------------------------
# The morning report's order and count
# ---------------------------------------------------------------------------------------------

def case_trust(row) -> dict:
    return (row.summary or {}).get("trust") or {}


def review_order(rows) -> list:
    """Failed cases first, then unfinished, then finished cases by increasing confidence (ties by id)."""
    def key(row):
        if row.status == "failed":
            return (0, 0.0, row.case_id)
        if row.status != "done":
            return (1, 0.0, row.case_id)
        confidence = case_trust(row).get("confidence")
        return (2, float(confidence) if confidence is not None else 1.0, row.case_id)
    return sorted(rows, key=key)


def review_summary(rows) -> dict:
    """The counts at the top of the morning report."""
    done = [row for row in rows if row.status == "done"]
    review = [row for row in done if case_trust(row).get("needs_review")]
    unfamiliar = [row for row in done if any(f.get("kind") == "unfamiliar input"
                                             for f in case_trust(row).get("flags", []))]
    summary = {"needs review": f"{len(review)} of {len(done)} finished case(s)", "unfamiliar inputs": len(unfamiliar)}
    if any(case_trust(row) and not case_trust(row).get("training_fingerprint", True) for row in done):
        summary["plausibility checks"] = (f"not done for cases predicted with a model folder without {tfp.FILE} "
                                          f"(trained before it existed): retrain to have them")
    return summary
