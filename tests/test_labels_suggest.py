"""Suggested labels from structure names: grouping rules, helper exclusion and the TG-263 table."""
from __future__ import annotations

import yaml

from pipeline.labels.names import LabelSpec, map_structures
from pipeline.labels.structures import Structure
from pipeline.labels.suggest import base_key, group_names, write_suggested
from pipeline.labels.tg263 import lookup, standard_name


def _rows(cases: dict[str, list[str]]) -> list[Structure]:
    return [Structure(case, "RTSTRUCT x", "RTSTRUCT", number, name, voxels=10, empty=False)
            for case, names in cases.items() for number, name in enumerate(names, start=1)]


def test_names_differing_by_case_spacing_or_number_group_and_co_occurring_ones_stay_apart():
    rows = _rows({"a": ["GTV", "Lung_L", "Lung_R", "Lung", "z_ring", "Couch Top"],
                  "b": ["gtv 2", "Lung L", "lung_r", "Lung"], "c": ["GTV Primary", "PTV_60"],
                  "d": ["GTV_1", "GTVp"], "e": ["GTV", "GTV Boost"]})
    groups, helpers = group_names(rows)
    by_key = {g.key: g for g in groups}
    assert set(by_key["gtv"].names) == {"GTV", "gtv 2", "GTV_1", "GTV Primary"}
    assert "gtv_boost" in by_key  # held with GTV in case e: another structure, kept apart
    # Lung_L / Lung_R occur with Lung in the same case: three structures, not one
    assert {"lung", "lung_l", "lung_r"} <= set(by_key)
    assert helpers == {"^z_": ["z_ring"], "couch": ["Couch Top"]}
    assert groups[0].key == "gtv" and groups[0].frequency == 5  # most frequent first
    assert base_key("PTV_60") == "ptv" and base_key("L5") == "l5" and base_key("GTV1") == "gtv"


def test_tg263_names_for_common_variants():
    assert lookup("spinal_cord") == "SpinalCord" and lookup("cord") == "SpinalCord"
    assert lookup("lt_parotid") == "Parotid_L" and lookup("parotid_r") == "Parotid_R"
    assert lookup("left_femoral_head") == "Femur_Head_L" and lookup("body") == "External"
    assert lookup("tumour_bed") is None
    assert standard_name(["Liver", "liver_2"]) == "Liver"


def test_suggested_file_is_a_loadable_dataset(tmp_path):
    from pipeline.dataset import load_dataset

    path = write_suggested(tmp_path, _rows({"a": ["Spinal Cord", "BODY", "z_x"], "b": ["spinal_cord", "Body"]}), 2,
                           tmp_path)
    dataset = load_dataset(path)
    names = {spec.name: spec for spec in dataset.foreground()}
    assert set(names) == {"SpinalCord", "External"}
    assert set(names["SpinalCord"].synonyms) == {"Spinal Cord", "spinal_cord"}
    assert dataset.exclude == ["^z_"] and all(spec.required for spec in names.values())
    assert yaml.safe_load(path.read_text())["source"] == str(tmp_path.resolve())


def test_mapping_reasons_missing_empty_ambiguous_and_optional():
    specs = [LabelSpec("GTV", 1, synonyms=["GTV Primary"]), LabelSpec("PTV", 2, regex=["^ptv"], required=False)]
    ok = map_structures(["GTV", "PTV_60", "BODY"], [False, False, False], specs)
    assert ok.left_out is None and ok.chosen == {1: 0, 2: 1} and ok.notes[2] == "matches no label"
    missing = map_structures(["PTV"], [False], specs)
    assert "no structure matches" in missing.left_out
    empty = map_structures(["GTV Primary", "PTV"], [True, False], specs)
    assert "is empty" in empty.left_out and "left out" in empty.notes[1]
    ambiguous = map_structures(["GTV", "gtv", "PTV"], [False, False, False], specs)
    assert "ambiguous" in ambiguous.left_out and ambiguous.chosen == {}
    optional = map_structures(["GTV"], [False], specs)
    assert optional.left_out is None and optional.chosen == {1: 0} and "optional" in optional.warnings[0]
    excluded = map_structures(["GTV", "ptv_eval"], [False, False], specs, exclude=["eval$"])
    assert excluded.notes[1] == "excluded by 'eval$'" and 2 not in excluded.chosen


def test_a_standard_name_that_another_group_uses_is_not_taken(tmp_path):
    from pipeline.dataset import load_dataset

    path = write_suggested(tmp_path, _rows({"a": ["Cord", "SpinalCord"], "b": ["Cord"]}), 2, tmp_path)
    specs = load_dataset(path).foreground()
    assert [s.name for s in specs] == ["Cord", "SpinalCord"]  # 'Cord' does not become SpinalCord
    assert map_structures(["Cord", "SpinalCord"], [False, False], specs).left_out is None
