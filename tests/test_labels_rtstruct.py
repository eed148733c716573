"""RTSTRUCT → voxel masks: the IBSI reference masks, round trips through our writer, holes and bad input."""
from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.errors import InputError
from pipeline.geometry import Volume, affine_from_parts, resample_to_grid
from pipeline.labels.rtstruct import fill_even_odd, rasterise_rtstruct, read_rtstruct
from pipeline.labels.rtstruct_write import voxel_edge_contours as label_contours
from pipeline.synthetic.dicom import SeriesWriteOptions, write_ct_series, write_rtstruct
from pipeline.synthetic.phantoms import LABEL_NAMES, PhantomOptions, make_phantom
from pipeline.volume_io import load_volume, sitk_to_volume

SMALL = dict(shape=56, slices=16, inplane_spacing_min=1.8, inplane_spacing_max=2.4, slice_spacing_min=3.0,
             slice_spacing_max=4.0)


def read_series(files_or_folder):
    reader = sitk.ImageSeriesReader()
    if isinstance(files_or_folder, list):
        reader.SetFileNames([str(f) for f in files_or_folder])
    else:
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(files_or_folder)))
    return sitk_to_volume(reader.Execute())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


STS_CASES = ["STS_001", "STS_002", "STS_004", "STS_005", "STS_008", "STS_010", "STS_014", "STS_019", "STS_022",
             "STS_023", "STS_025", "STS_026", "STS_028", "STS_032", "STS_035", "STS_041", "STS_043", "STS_047",
             "STS_050", "STS_051"]


@pytest.mark.shared_data
@pytest.mark.parametrize("case", STS_CASES)
def test_sts_rtstruct_matches_the_ibsi_reference_mask(shared_data, case):
    folder = shared_data / "sts_ct" / case
    image = read_series(folder / "CT" / "image")
    reference = load_volume(folder / "reference" / "CT_mask.nii.gz")
    assert reference.grid.difference(image.grid) is None
    masks = rasterise_rtstruct(folder / "CT" / "mask" / "RS.dcm", image.grid, ["GTV_Mass_CT"])
    mask = masks["GTV_Mass_CT"]
    assert mask.shape == image.grid.shape
    # measured: every one of the 20 cases matches the IBSI mask voxel for voxel (Dice 1.0)
    assert dice(mask, reference.array > 0) >= 0.98
    assert dice(mask, np.flip(reference.array > 0, axis=0)) < 0.98  # the comparison notices a flip


@pytest.mark.parametrize("direction,feet_first", [("identity", False), ("identity", True), ("oblique", False)])
def test_phantom_rtstruct_round_trips_exactly(tmp_path, direction, feet_first):
    phantom = make_phantom(2, PhantomOptions(**SMALL, direction=direction, feet_first=feet_first))
    files = write_ct_series(phantom.image, tmp_path / "ct")
    rtstruct = write_rtstruct(phantom.label, files, tmp_path / "rs.dcm", LABEL_NAMES)
    masks = rasterise_rtstruct(rtstruct, phantom.image.grid)
    for value, name in LABEL_NAMES.items():
        np.testing.assert_array_equal(masks[name], phantom.label.array == value)
    # the same contours on GDCM's slice order (k reversed for feet-first) land on the same voxels
    sorted_grid = read_series(tmp_path / "ct").grid
    liver = rasterise_rtstruct(rtstruct, sorted_grid, ["liver"])["liver"]
    back = resample_to_grid(liver.astype(np.uint8), sorted_grid, phantom.image.grid)
    np.testing.assert_array_equal(back, phantom.label.array == 1)


def test_rtstruct_references_the_series(tmp_path):
    phantom = make_phantom(1, PhantomOptions(**SMALL))
    dropped = int(np.argwhere(phantom.label.array == 1)[:, 2].mean())  # a slice through the liver goes missing
    files = write_ct_series(phantom.image, tmp_path / "ct", SeriesWriteOptions(drop_slices=[dropped]))
    path = write_rtstruct(Volume(phantom.label.array, phantom.label.affine), files, tmp_path / "rs.dcm",
                          {1: "Liver", 3: "Kidneys"})
    rs = pydicom.dcmread(path)
    headers = {h.SOPInstanceUID: h for h in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    first = next(iter(headers.values()))
    assert rs.Modality == "RTSTRUCT" and rs.SOPClassUID == pydicom.uid.RTStructureSetStorage
    assert rs.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian  # 4-byte lengths: big contours fit
    assert rs.StudyInstanceUID == first.StudyInstanceUID and rs.FrameOfReferenceUID == first.FrameOfReferenceUID
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence} == set(headers)
    assert [roi.ROIName for roi in rs.StructureSetROISequence] == ["Liver", "Kidneys"]
    dropped_z = float(phantom.label.grid.world([0, 0, dropped])[2])
    unreferenced = 0
    for roi_contour in rs.ROIContourSequence:
        for contour in roi_contour.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert contour.NumberOfContourPoints == len(points)
            if "ContourImageSequence" not in contour:  # a contour on the missing slice references no image
                assert np.allclose(points[:, 2], dropped_z, atol=1e-3)
                unreferenced += 1
                continue
            referenced = headers[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            assert np.allclose(points[:, 2], float(referenced.ImagePositionPatient[2]), atol=1e-3)
    expected = sum(len(label_contours(phantom.label.array[:, :, dropped] == v)) for v in (1, 3))
    assert unreferenced == expected >= 1
    # the contours still rasterise onto the full grid, the missing slice included
    liver = rasterise_rtstruct(path, phantom.image.grid, ["Liver"])["Liver"]
    np.testing.assert_array_equal(liver, phantom.label.array == 1)


def hollow_volume() -> Volume:
    """Two islands on slice 1, one of them a ring with a hole, and a thin diagonal bridge; asymmetric."""
    label = np.zeros((30, 24, 3), dtype=np.uint8)
    label[3:15, 4:18, 1] = 1
    label[6:11, 8:13, 1] = 0  # the hole
    label[19:26, 2:7, 1] = 1  # a second island
    for n in range(5):
        label[18 + n, 12 + n, 1] = 1  # pixels touching only at corners
    label[20:28, 15:22, 2] = 1
    return Volume(label, affine_from_parts(np.diag([-1.0, -1.0, 1.0]), [0.8, 1.1, 2.0], [40.0, 25.0, -10.0]))


def test_holes_islands_and_corner_touching_pixels_survive(tmp_path):
    volume = hollow_volume()
    files = write_ct_series(Volume(np.zeros(volume.array.shape, np.int16), volume.affine), tmp_path / "ct")
    path = write_rtstruct(volume, files, tmp_path / "rs.dcm", {1: "GTV"})
    contours = read_rtstruct(path)[0].contours
    assert len(contours) >= 4  # outer ring, hole, island, slice-2 block (plus diagonal pieces)
    mask = rasterise_rtstruct(path, volume.grid)["GTV"]
    np.testing.assert_array_equal(mask, volume.array == 1)
    assert not np.array_equal(mask, np.flip(volume.array == 1, axis=0))
    assert not np.array_equal(mask[:, :, 1].T[:24, :24], (volume.array == 1)[:24, :24, 1])


def test_scanline_fill_agrees_with_matplotlib():
    from matplotlib.path import Path

    rng = np.random.default_rng(3)
    centres = np.argwhere(np.ones((40, 30), dtype=bool)).astype(float)
    for _ in range(20):
        polygons = [rng.uniform(-3, 42, size=(rng.integers(3, 12), 2)) * [1.0, 0.75] for _ in range(2)]
        expected = np.zeros((40, 30), dtype=bool)
        for polygon in polygons:
            expected ^= Path(polygon).contains_points(centres).reshape(40, 30)
        np.testing.assert_array_equal(fill_even_odd((40, 30), polygons), expected)


def test_many_slices_at_once_equal_each_slice_alone(monkeypatch):
    """The batched scan-line fill (all slices of an ROI in one pass, in chunks) is voxel for voxel the fill of
    each slice alone, on an oblique grid, with vertices exactly on pixel rows and centres."""
    from pipeline.geometry import Grid, world_to_index
    from pipeline.labels import rtstruct

    rng = np.random.default_rng(11)
    direction = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    grid = Grid((37, 29, 9), affine_from_parts(direction, [0.9, 1.3, 2.5], [-20.0, 14.0, 31.0]))
    contours = []
    for k in [0, 2, 2, 3, 5, 5, 5, 8]:
        ij = np.round(rng.uniform(-3, 40, size=(int(rng.integers(3, 14)), 2)) * 2) / 2
        index = np.c_[ij, np.full(len(ij), float(k))]
        contours.append((grid.affine @ np.c_[index, np.ones(len(ij))].T).T[:, :3] * [-1.0, -1.0, 1.0])
    expected = np.zeros(grid.shape, dtype=bool)
    for k in range(grid.shape[2]):
        on_slice = [world_to_index(grid, c * [-1.0, -1.0, 1.0])[:, :2] for c in contours
                    if int(np.rint(world_to_index(grid, c * [-1.0, -1.0, 1.0])[:, 2].mean())) == k]
        if on_slice:
            expected[:, :, k] = fill_even_odd(grid.shape[:2], on_slice)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(rtstruct.rasterise_contours(contours, grid), expected)
    monkeypatch.setattr(rtstruct, "FILL_CHUNK_VOXELS", 1)  # one slice per chunk
    np.testing.assert_array_equal(rtstruct.rasterise_contours(contours, grid), expected)


def test_unknown_roi_name_lists_the_available_ones(tmp_path):
    volume = hollow_volume()
    files = write_ct_series(Volume(np.zeros(volume.array.shape, np.int16), volume.affine), tmp_path / "ct")
    path = write_rtstruct(volume, files, tmp_path / "rs.dcm", {1: "GTV_Mass"})
    assert set(rasterise_rtstruct(path, volume.grid, ["gtv_mass"])) == {"GTV_Mass"}
    with pytest.raises(InputError, match=r"must contain ROI\(s\) \['Liver'\], got \['GTV_Mass'\]"):
        rasterise_rtstruct(path, volume.grid, ["Liver"])


def test_non_rtstruct_and_off_grid_contours_are_rejected(tmp_path, caplog):
    volume = hollow_volume()
    files = write_ct_series(Volume(np.zeros(volume.array.shape, np.int16), volume.affine), tmp_path / "ct")
    path = write_rtstruct(volume, files, tmp_path / "rs.dcm", {1: "GTV"})
    with pytest.raises(InputError, match="must be an RTSTRUCT, got Modality 'CT'"):
        rasterise_rtstruct(files[0], volume.grid)
    tilted = Volume(volume.array, affine_from_parts(
        np.array([[-1.0, 0, 0], [0, -np.cos(0.3), np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]),
        [0.8, 1.1, 2.0], [40.0, 25.0, -10.0]))
    with pytest.raises(InputError, match="must lie in one image slice"):
        rasterise_rtstruct(path, tilted.grid)
    shifted = affine_from_parts(np.diag([-1.0, -1.0, 1.0]), [0.8, 1.1, 2.0], [40.0, 25.0, 20.0])
    with caplog.at_level(logging.WARNING):
        mask = rasterise_rtstruct(path, Volume(volume.array, shifted).grid)["GTV"]
    assert not mask.any() and "outside the image's slices" in caplog.text


def test_duplicate_roi_names_and_empty_rois(tmp_path, caplog):
    volume = hollow_volume()
    files = write_ct_series(Volume(np.zeros(volume.array.shape, np.int16), volume.affine), tmp_path / "ct")
    path = write_rtstruct(volume, files, tmp_path / "rs.dcm", {1: "GTV", 2: "Empty"})
    with caplog.at_level(logging.WARNING):
        masks = rasterise_rtstruct(path, volume.grid)
    assert not masks["Empty"].any() and "ROI 'Empty' has no closed contours" in caplog.text
    dataset = pydicom.dcmread(path)
    dataset.StructureSetROISequence[1].ROIName = "gtv"
    dataset.save_as(tmp_path / "dup.dcm")
    with pytest.raises(InputError, match="must name each ROI once, got 'gtv' for ROI numbers 1 and 2"):
        rasterise_rtstruct(tmp_path / "dup.dcm", volume.grid)
