"""Coded concepts of labels: SNOMED CT category, type and modifier, and the RT ROI Interpreted Type.

One place decides what a label *is*, and the DICOM SEG, the RTSTRUCT and the .seg.nrrd
``TerminologyEntry`` all read it from here. A label in ``dataset.yaml`` may give its codes::

    - name: GTV_Mass
      value: 1
      category: {value: "49755003", scheme: SCT, meaning: Morphologically Abnormal Structure}
      type: {value: "4147007", scheme: SCT, meaning: Mass}
      rt_type: GTV

Whatever is not given comes from :data:`DEFAULTS`, a small table of common organs and targets
matched on the label's name (case, spaces, ``-``/``_`` and a left/right token ignored, a few German
names included), and otherwise:

- names starting with GTV, CTV or ITV, or containing tumour/mass/lesion: "Morphologically Abnormal
  Structure / Mass" (SCT 49755003 / 4147007; Slicer's older lists call 49755003 "Morphologically
  Altered Structure") with RT type GTV or CTV;
- names starting with PTV: "Tissue / Tissue" with RT type PTV (a planning volume is a margin, not
  a tissue or a lesion; SNOMED has no code DICOM lists for it);
- anything else: "Tissue / Tissue" (SCT 85756007) with RT type ORGAN.

The codes' values and meanings are those of DICOM PS3.16 (CID 7150/7151) as pydicom lists them;
``tests/test_labels_codes.py`` checks the table against pydicom's code dictionary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# RT ROI Interpreted Type (3006,00A4), the defined terms of PS3.3 C.8.8.8
RtRoiType = Literal["EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR", "BOLUS", "AVOIDANCE",
                    "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL",
                    "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION",
                    "CONTROL", "DOSE_MEASUREMENT"]


@dataclass(frozen=True)
class CodeSpec:
    """One coded concept (a DICOM code sequence item): code value, coding scheme and meaning."""

    value: str = field(default="", metadata={"help": "Code value, e.g. 10200004 (SNOMED CT 'Liver')."})
    meaning: str = field(default="", metadata={"help": "Code meaning as the scheme words it, e.g. Liver."})
    scheme: str = field(default="SCT", metadata={"help": "Coding scheme designator: SCT (SNOMED CT), DCM, ..."})


@dataclass(frozen=True)
class Concept:
    """What a label is: segmented property category, type, optional type modifier, and RT ROI type."""

    category: CodeSpec
    type: CodeSpec
    modifier: CodeSpec | None = None
    rt_type: str = "ORGAN"
    source: str = "default"  # "dataset" when every part came from the dataset description, else what filled it


def _sct(value: str, meaning: str) -> CodeSpec:
    return CodeSpec(value, meaning, "SCT")


ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
TISSUE = _sct("85756007", "Tissue")
ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")
MASS = _sct("4147007", "Mass")
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")

# normalised name (see pipeline.labels.names.normalise_name, laterality removed) -> structure type
_ORGANS = {
    ("liver", "leber"): _sct("10200004", "Liver"),
    ("spleen", "milz"): _sct("78961009", "Spleen"),
    ("kidney", "kidneys", "niere", "nieren"): _sct("64033007", "Kidney"),
    ("pancreas", "pankreas"): _sct("15776009", "Pancreas"),
    ("stomach", "magen"): _sct("69695003", "Stomach"),
    ("esophagus", "oesophagus", "ösophagus", "speiseröhre"): _sct("32849002", "Esophagus"),
    ("spinal_cord", "spinalcord", "cord", "rückenmark", "myelon"): _sct("2748008", "Spinal cord"),
    ("heart", "herz"): _sct("80891009", "Heart"),
    ("lung", "lungs", "lunge"): _sct("39607008", "Lung"),
    ("bladder", "urinary_bladder", "blase", "harnblase"): _sct("89837001", "Bladder"),
    ("rectum",): _sct("34402009", "Rectum"),
    ("prostate", "prostata"): _sct("41216001", "Prostate"),
    ("brain", "gehirn"): _sct("12738006", "Brain"),
    ("aorta",): _sct("15825003", "Aorta"),
    ("parotid", "parotid_gland", "parotis"): _sct("45289007", "Parotid gland"),
    ("gallbladder", "gall_bladder", "gallenblase"): _sct("28231008", "Gallbladder"),
    ("duodenum",): _sct("38848004", "Duodenum"),
    ("colon",): _sct("71854001", "Colon"),
    ("small_bowel", "small_intestine", "dünndarm"): _sct("30315005", "Small intestine"),
    ("trachea",): _sct("44567001", "Trachea"),
    ("mandible", "unterkiefer"): _sct("91609006", "Mandible"),
    ("femur",): _sct("71341001", "Femur"),
    ("femoral_head", "femur_head", "head_of_femur", "femurkopf"): _sct("2812003", "Femoral head"),
    ("eye", "auge"): _sct("81745001", "Eye"),
    ("lens", "linse"): _sct("78076003", "Lens"),
    ("optic_nerve", "sehnerv"): _sct("18234004", "Optic nerve"),
    ("optic_chiasm", "chiasm", "chiasma"): _sct("244453006", "Optic chiasm"),
    ("thyroid", "thyroid_gland", "schilddrüse"): _sct("69748006", "Thyroid"),
    ("adrenal", "adrenal_gland", "nebenniere"): _sct("23451007", "Adrenal gland"),
    ("uterus",): _sct("35039007", "Uterus"),
    ("breast", "brust", "mamma"): _sct("76752008", "Breast"),
    ("larynx",): _sct("4596009", "Larynx"),
    ("pharynx",): _sct("54066008", "Pharynx"),
    ("sacrum",): _sct("54735007", "Sacrum"),
    ("bone", "knochen"): _sct("272673000", "Bone"),
    ("muscle", "muskel"): _sct("71616004", "Muscle"),
}
DEFAULTS: dict[str, CodeSpec] = {name: code for names, code in _ORGANS.items() for name in names}
_LEFT_TOKENS = {"left", "l", "lt", "links", "li", "sin"}
_RIGHT_TOKENS = {"right", "r", "rt", "rechts", "re", "dex"}
_LESION = re.compile(r"(tumou?r|mass|lesion|metast|nodule|knoten)")


def default_concept(name: str) -> Concept:
    """The concept the table and the naming rules give a label called ``name`` (see module docstring)."""
    from pipeline.labels.names import normalise_name

    key = normalise_name(name)
    tokens = key.split("_")
    modifier = None
    if len(tokens) > 1 and tokens[-1] in _LEFT_TOKENS | _RIGHT_TOKENS:
        modifier = LEFT if tokens[-1] in _LEFT_TOKENS else RIGHT
        tokens = tokens[:-1]
    elif len(tokens) > 1 and tokens[0] in {"left", "right", "links", "rechts"}:
        modifier = LEFT if tokens[0] in {"left", "links"} else RIGHT
        tokens = tokens[1:]
    base = "_".join(tokens)
    if base in DEFAULTS:
        return Concept(ANATOMICAL_STRUCTURE, DEFAULTS[base], modifier, "ORGAN", "default table")
    if key in ("body", "external", "skin", "outline", "körper", "haut"):
        return Concept(TISSUE, TISSUE, None, "EXTERNAL", "default (external contour)")
    for prefix, rt_type in (("gtv", "GTV"), ("ctv", "CTV"), ("itv", "CTV")):
        if key.startswith(prefix):
            return Concept(ABNORMAL_STRUCTURE, MASS, None, rt_type, f"default ({prefix.upper()}-like name)")
    if key.startswith("ptv"):
        return Concept(TISSUE, TISSUE, None, "PTV", "default (PTV-like name)")
    if _LESION.search(key):
        return Concept(ABNORMAL_STRUCTURE, MASS, None, "GTV", "default (lesion-like name)")
    return Concept(TISSUE, TISSUE, None, "ORGAN", "default (unknown name)")


def label_concept(name: str, codes: dict | None = None) -> Concept:
    """The label's concept: what the dataset description gave (``codes``: category/type/modifier/rt_type,
    as CodeSpec or plain dicts), the rest from :func:`default_concept`."""
    codes = {k: v for k, v in (codes or {}).items() if v not in (None, "", {})}
    default = default_concept(name)
    if not codes:
        return default

    def code(key: str) -> CodeSpec | None:
        value = codes.get(key)
        if value is None or isinstance(value, CodeSpec):
            return value
        return CodeSpec(str(value.get("value", "")), str(value.get("meaning", "")), str(value.get("scheme", "SCT")))

    given_type = code("type")
    concept = Concept(
        category=code("category") or default.category,
        type=given_type or default.type,
        # a modifier the name implies belongs to the default type; a given type keeps only a given modifier
        modifier=code("modifier") or (None if given_type else default.modifier),
        rt_type=str(codes.get("rt_type") or default.rt_type),
        source="dataset" if {"category", "type", "rt_type"} <= set(codes) else f"dataset + {default.source}")
    return concept


CODE_KEYS = ("category", "type", "modifier", "rt_type")


def codes_json(holder) -> dict:
    """The coded-concept fields of a label spec or label dict, as plain JSON (only those set)."""
    out = {}
    for key in CODE_KEYS:
        value = holder.get(key) if isinstance(holder, dict) else getattr(holder, key, None)
        if value in (None, "", {}):
            continue
        if isinstance(value, CodeSpec):
            value = {"value": value.value, "scheme": value.scheme, "meaning": value.meaning}
        out[key] = value
    return out


def slicer_terminology(concept: Concept) -> str:
    """Slicer's ``TerminologyEntry``: context~category~type~modifier~anatomic context~region~region modifier."""
    def item(code: CodeSpec | None) -> str:
        return "^^" if code is None else f"{code.scheme}^{code.value}^{code.meaning}"

    return "~".join(["Segmentation category and type - DICOM master list", item(concept.category),
                     item(concept.type), item(concept.modifier), "Anatomic codes - DICOM master list", "^^", "^^"])
