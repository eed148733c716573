"""A small table of AAPM TG-263 standard structure names, and the lookup from common variants.

TG-263 (AAPM Task Group 263, "Standardizing nomenclatures in radiation oncology", 2018) is the
nomenclature planning systems and registries use. This table holds only the report's primary names
for common targets and organs at risk, typed in here by hand from the published list (not generated
from or checked against a machine-readable copy, so verify a name before relying on it); it covers:

- targets GTV, GTVp, GTVn, CTV, ITV, PTV (dose or number suffixes are not standardised here);
- the body outline External;
- unpaired organs: Bladder, Bone_Mandible, Bowel, Bowel_Large, Bowel_Small, Brain, Brainstem,
  Duodenum, Esophagus, Heart, Larynx, Liver, Lungs, OpticChiasm, Pancreas, Pituitary, Prostate,
  Rectum, SeminalVes, SpinalCanal, SpinalCord, Spleen, Stomach, Trachea;
- paired organs with ``_L`` / ``_R``: Breast, Cochlea, Eye, Femur_Head, Glnd_Submand, Kidney, Lens,
  Lung, OpticNrv, Parotid.

Anything else gets no suggestion (the name found is kept). The variants below are common spellings
seen in exports (``spinal cord``, ``Cord``, ``Lt Parotid``, ``BODY``), matched after
:func:`pipeline.labels.suggest.base_key` (case, separators and numeric suffix ignored).
"""
from __future__ import annotations

UNPAIRED = {
    "GTV": ["gtv"], "GTVp": ["gtvp", "gtv_p", "gtv_primary", "gtv_prim"], "GTVn": ["gtvn", "gtv_n", "gtv_nodal",
                                                                                   "gtv_node", "gtv_ln"],
    "CTV": ["ctv"], "ITV": ["itv"], "PTV": ["ptv"],
    "External": ["external", "body", "outline", "ext", "body_outline", "skin_contour"],
    "Bladder": ["bladder", "urinary_bladder"], "Bone_Mandible": ["mandible", "bone_mandible"],
    "Bowel": ["bowel", "bowel_bag", "bowelbag"], "Bowel_Large": ["large_bowel", "bowel_large", "colon"],
    "Bowel_Small": ["small_bowel", "bowel_small", "smallbowel"], "Brain": ["brain"],
    "Brainstem": ["brainstem", "brain_stem"], "Duodenum": ["duodenum"], "Esophagus": ["esophagus", "oesophagus"],
    "Heart": ["heart"], "Larynx": ["larynx"], "Liver": ["liver"], "Lungs": ["lungs", "lung_total", "both_lungs",
                                                                            "lungs_total", "lung_both"],
    "OpticChiasm": ["optic_chiasm", "chiasm", "opticchiasm"], "Pancreas": ["pancreas"], "Pituitary": ["pituitary"],
    "Prostate": ["prostate"], "Rectum": ["rectum"], "SeminalVes": ["seminal_vesicles", "seminal_vesicle", "sv",
                                                                    "seminalves"],
    "SpinalCanal": ["spinal_canal", "spinalcanal"], "SpinalCord": ["spinal_cord", "spinalcord", "cord"],
    "Spleen": ["spleen"], "Stomach": ["stomach"], "Trachea": ["trachea"],
}
PAIRED = {
    "Breast": ["breast"], "Cochlea": ["cochlea"], "Eye": ["eye", "globe"],
    "Femur_Head": ["femur_head", "femoral_head", "femurhead", "head_of_femur", "fem_head"],
    "Glnd_Submand": ["submandibular", "submandibular_gland", "smg", "glnd_submand"], "Kidney": ["kidney"],
    "Lens": ["lens"], "Lung": ["lung"], "OpticNrv": ["optic_nerve", "opticnerve", "opticnrv"], "Parotid": ["parotid"],
}
_SIDES = {"l": "L", "lt": "L", "left": "L", "r": "R", "rt": "R", "right": "R"}

_UNPAIRED_BY_KEY = {variant: standard for standard, variants in UNPAIRED.items() for variant in variants}
_PAIRED_BY_KEY = {variant: standard for standard, variants in PAIRED.items() for variant in variants}


def lookup(key: str) -> str | None:
    """The TG-263 name of a normalised key (``spinal_cord``, ``lt_parotid``, ``parotid_l``), or None."""
    if key in _UNPAIRED_BY_KEY:
        return _UNPAIRED_BY_KEY[key]
    words = key.split("_")
    for side_first in (True, False):
        side, rest = (words[0], words[1:]) if side_first else (words[-1], words[:-1])
        if side in _SIDES and rest:
            organ = _PAIRED_BY_KEY.get("_".join(rest))
            if organ is not None:
                return f"{organ}_{_SIDES[side]}"
    return None


def standard_name(names: list[str]) -> str | None:
    """The TG-263 name of the first of ``names`` (most frequent first) that the table knows, or None."""
    from pipeline.labels.suggest import base_key

    for name in names:
        found = lookup(base_key(name))
        if found is not None:
            return found
    return None
