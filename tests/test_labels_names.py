"""Structure names → label values (case, separators, synonyms) and merging masks into one label map."""
from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest

from pipeline.errors import ConfigError, InputError
from pipeline.labels.names import LabelSpec, map_names_to_values, merge_masks, normalise_name

GTV = LabelSpec(name="GTV_Mass", value=1, color=[255, 0, 0], synonyms=["GTV_Mass_CT"])
ORGANS = [LabelSpec("liver", 1, [200, 80, 60], ["Leber"]), LabelSpec("spleen", 2, [90, 60, 200], []),
          LabelSpec("kidneys", 3, [240, 200, 40], ["Kidney_L", "Kidney_R"])]


def test_names_match_case_separators_and_synonyms():
    assert normalise_name("  GTV Mass-CT ") == normalise_name("gtv_mass_ct") == "gtv_mass_ct"
    assert map_names_to_values(["gtv_mass_ct", "BODY"], [GTV]) == {"gtv_mass_ct": 1}
    assert map_names_to_values(["GTV Mass"], [GTV]) == {"GTV Mass": 1}
    mapping = map_names_to_values(["Kidney_R", "LIVER", "Couch", "kidney-l", "Spleen"], ORGANS)
    assert mapping == {"LIVER": 1, "Spleen": 2, "Kidney_R": 3, "kidney-l": 3}
    assert list(mapping.values()) == [1, 2, 3, 3]  # spec order, so later specs win when merged


def test_missing_label_lists_the_names_the_file_has():
    with pytest.raises(InputError, match=r"must contain a structure named 'spleen', got \['Leber', 'kidney_l'\]"):
        map_names_to_values(["Leber", "kidney_l"], ORGANS, source="RS.dcm")


def test_strict_matching_lists_the_known_names():
    with pytest.raises(InputError, match=r"\['Couch'\] must match a configured label, known names are "
                                         r"\['GTV_Mass', 'GTV_Mass_CT'\]"):
        map_names_to_values(["GTV_Mass", "Couch"], [GTV], strict=True)


def test_a_synonym_for_two_labels_is_a_config_error():
    with pytest.raises(ConfigError, match="must belong to one label"):
        map_names_to_values(["x"], [LabelSpec("liver", 1, [1, 2, 3], ["organ"]),
                                     LabelSpec("spleen", 2, [1, 2, 3], ["Organ"])])


def test_merge_masks_later_labels_win_and_overlaps_are_reported(caplog):
    shape = (6, 5, 4)
    liver = np.zeros(shape, bool)
    liver[1:4, 1:3, 1] = True
    kidney = np.zeros(shape, bool)
    kidney[3:5, 2:4, 1] = True
    kidney[0, 0, 3] = True
    with caplog.at_level(logging.WARNING):
        label = merge_masks({"kidney": kidney, "liver": liver, "unused": ~liver}, {"liver": 1, "kidney": 3})
    assert label.dtype == np.uint8
    assert label[3, 2, 1] == 3 and label[1, 1, 1] == 1 and label[0, 0, 3] == 3 and label[0, 0, 0] == 0
    assert int((label == 1).sum()) == 5 and int((label == 3).sum()) == 5
    assert "1 voxels of 'kidney' (value 3) overlap ['liver']" in caplog.text
    with pytest.raises(InputError, match="must share one shape"):
        merge_masks({"a": liver, "b": kidney[:, :, :2]}, {"a": 1, "b": 2})


@pytest.mark.shared_data
def test_every_sts_ct_structure_maps_to_gtv(shared_data):
    names = []
    for path in sorted((shared_data / "sts_ct").glob("STS_*/CT/mask/RS.dcm")):
        names += [roi.ROIName for roi in pydicom.dcmread(path, stop_before_pixels=True).StructureSetROISequence]
    assert len(names) == 20
    mapping = map_names_to_values(sorted(set(names)), [GTV], strict=True)
    assert mapping == {"GTV_Mass_CT": 1}
