"""Coded label concepts: the default table, naming rules, dataset.yaml codes, and their way into predict."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.sr.codedict import codes as pydicom_codes

from pipeline.dataset import load_dataset
from pipeline.errors import ConfigError
from pipeline.labels.codes import (
    ABNORMAL_STRUCTURE,
    ANATOMICAL_STRUCTURE,
    DEFAULTS,
    LEFT,
    MASS,
    RIGHT,
    TISSUE,
    CodeSpec,
    default_concept,
    label_concept,
    slicer_terminology,
)
from pipeline.predict.model import _labels


def _pydicom_meanings() -> dict[str, set[str]]:
    meanings: dict[str, set[str]] = {}
    for keyword in dir(pydicom_codes.SCT):
        try:
            code = getattr(pydicom_codes.SCT, keyword)
        except (AttributeError, KeyError):
            continue
        if not hasattr(code, "value"):  # the dictionary's own methods
            continue
        meanings.setdefault(str(code.value), set()).add(str(code.meaning).lower())
    return meanings


def test_every_table_code_is_the_snomed_code_pydicom_lists_with_that_meaning():
    meanings = _pydicom_meanings()
    table = set(DEFAULTS.values()) | {ANATOMICAL_STRUCTURE, TISSUE, ABNORMAL_STRUCTURE, MASS, LEFT, RIGHT}
    for code in table:
        assert code.scheme == "SCT"
        assert code.meaning.lower() in meanings.get(code.value, set()), code


@pytest.mark.parametrize("name,category,type_,modifier,rt_type", [
    ("liver", "91723000", "10200004", None, "ORGAN"),
    ("Kidney_L", "91723000", "64033007", "7771000", "ORGAN"),
    ("right parotid", "91723000", "45289007", "24028007", "ORGAN"),
    ("Rückenmark", "91723000", "2748008", None, "ORGAN"),
    ("Ösophagus", "91723000", "32849002", None, "ORGAN"),
    ("GTV_Mass", "49755003", "4147007", None, "GTV"),
    ("CTV_high", "49755003", "4147007", None, "CTV"),
    ("PTV 60", "85756007", "85756007", None, "PTV"),
    ("liver metastasis", "49755003", "4147007", None, "GTV"),  # not a table name: the lesion rule applies
    ("BODY", "85756007", "85756007", None, "EXTERNAL"),
    ("Strukturen_X", "85756007", "85756007", None, "ORGAN"),
])
def test_default_concepts(name, category, type_, modifier, rt_type):
    concept = default_concept(name)
    assert (concept.category.value, concept.type.value) == (category, type_)
    assert (concept.modifier.value if concept.modifier else None) == modifier
    assert concept.rt_type == rt_type


def test_given_codes_override_the_defaults_part_by_part():
    concept = label_concept("kidney_left", {"rt_type": "AVOIDANCE"})
    assert concept.type.value == "64033007" and concept.modifier == LEFT and concept.rt_type == "AVOIDANCE"
    concept = label_concept("kidney_left", {"type": {"value": "1", "meaning": "Thing", "scheme": "99X"}})
    assert concept.type == CodeSpec("1", "Thing", "99X") and concept.modifier is None  # given type: no implied L
    assert concept.category == ANATOMICAL_STRUCTURE and concept.source.startswith("dataset + ")


def test_slicer_terminology_entry():
    entry = slicer_terminology(default_concept("kidney_left"))
    assert entry == ("Segmentation category and type - DICOM master list~SCT^91723000^Anatomical Structure~"
                     "SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")


def test_dataset_codes_reach_the_predictor(tmp_path: Path):
    yaml_text = """
name: t
labels:
  - {name: background, value: 0}
  - name: Tumour
    value: 1
    category: {value: "49755003", meaning: Morphologically Abnormal Structure}
    type: {value: "4147007", meaning: Mass}
    rt_type: GTV
  - {name: liver, value: 2, rt_type: AVOIDANCE}
source: x
"""
    (tmp_path / "dataset.yaml").write_text(yaml_text, encoding="utf-8")
    description = load_dataset(tmp_path / "dataset.yaml")
    labels_json = description.label_json()
    assert labels_json[1]["type"] == {"value": "4147007", "scheme": "SCT", "meaning": "Mass"}
    assert labels_json[2] == {"name": "liver", "value": 2, "color": [255, 0, 0], "synonyms": [],
                              "rt_type": "AVOIDANCE"}
    infos = _labels({"labels": labels_json[1:]}, [0, 1, 2])  # as model.json holds them
    assert infos[0].concept.type == MASS and infos[0].concept.rt_type == "GTV"
    assert infos[1].concept.type.meaning == "Liver" and infos[1].concept.rt_type == "AVOIDANCE"


def test_bad_codes_are_refused_with_the_label_named(tmp_path: Path):
    (tmp_path / "dataset.yaml").write_text(
        "name: t\nlabels:\n  - {name: liver, value: 1, type: {value: '10200004'}}\nsource: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="label 'liver' type must give value, meaning and scheme"):
        load_dataset(tmp_path / "dataset.yaml")
    (tmp_path / "dataset.yaml").write_text(
        "name: t\nlabels:\n  - {name: liver, value: 1, rt_type: ORGANS}\nsource: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="rt_type"):
        load_dataset(tmp_path / "dataset.yaml")
