"""The DICOM CT series writer: geometry, pixel encoding and deliberate export defects, read back by real readers."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.errors import ConfigError, InputError
from pipeline.geometry import Volume, affine_from_parts, lps_to_ras, resample_to_grid
from pipeline.synthetic.dicom import TRANSFER_SYNTAXES, SeriesWriteOptions, tilted_affine, write_ct_series
from pipeline.synthetic.jpeg_lossless import encode_jpeg_lossless_sv1
from pipeline.synthetic.phantoms import PhantomOptions, make_phantom
from pipeline.volume_io import sitk_to_volume

SMALL = dict(shape=48, slices=12, inplane_spacing_min=2.0, inplane_spacing_max=2.6, slice_spacing_min=4.0,
             slice_spacing_max=6.0)


def small_phantom(seed=0, **overrides):
    return make_phantom(seed, PhantomOptions(**{**SMALL, **overrides}))


def read_with_sitk(folder_or_files):
    """Read a series with SimpleITK: given a folder, GDCM sorts the files along the slice normal."""
    if isinstance(folder_or_files, list):
        names = [str(f) for f in folder_or_files]
    else:
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder_or_files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return sitk_to_volume(reader.Execute())


def asymmetric_volume(shape=(40, 34, 5)) -> Volume:
    """A volume whose every voxel differs, on a grid with three different spacings."""
    values = np.arange(np.prod(shape)).reshape(shape) % 3000 - 1000
    affine = affine_from_parts(np.diag([-1.0, -1.0, 1.0]), [0.7, 0.9, 2.5], [12.5, -30.0, 101.0])
    return Volume(values.astype(np.int16), affine)


@pytest.mark.parametrize("direction,feet_first", [("identity", False), ("identity", True), ("oblique", False),
                                                  ("random", True)])
def test_phantom_series_round_trips_through_simpleitk(tmp_path, direction, feet_first):
    phantom = small_phantom(3, direction=direction, feet_first=feet_first)
    options = SeriesWriteOptions(patient_position="FFS" if feet_first else "HFS")
    files = write_ct_series(phantom.image, tmp_path, options)
    assert len(files) == phantom.image.array.shape[2]
    in_written_order = read_with_sitk(files)  # files in k order: exactly our grid, feet-first included
    assert in_written_order.grid.difference(phantom.image.grid) is None
    np.testing.assert_array_equal(in_written_order.array, phantom.image.array)
    sorted_by_gdcm = read_with_sitk(tmp_path)  # GDCM's own order: k may run the other way, voxels stay put
    assert np.linalg.det(sorted_by_gdcm.grid.direction) > 0
    same_place = resample_to_grid(sorted_by_gdcm.array, sorted_by_gdcm.grid, phantom.image.grid, order=0)
    np.testing.assert_array_equal(same_place, phantom.image.array)
    if feet_first:
        assert sorted_by_gdcm.grid.difference(phantom.image.grid) is not None


def test_slice_header_follows_the_array_convention(tmp_path):
    volume = asymmetric_volume()
    files = write_ct_series(volume, tmp_path)
    raw = files[0].read_bytes()
    assert raw[128:132] == b"DICM"
    first = pydicom.dcmread(files[0])
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert (first.Rows, first.Columns) == (34, 40)  # rows run along j, columns along i
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.9, 0.7])  # (between rows, between columns)
    assert [float(v) for v in first.ImageOrientationPatient] == pytest.approx([1, 0, 0, 0, 1, 0])
    assert [float(v) for v in first.ImagePositionPatient] == pytest.approx([-12.5, 30.0, 101.0])
    assert (first.BitsAllocated, first.BitsStored, first.HighBit, first.PixelRepresentation) == (16, 16, 15, 1)
    assert float(first.SpacingBetweenSlices) == pytest.approx(2.5)
    assert float(first.RescaleIntercept) == -1024 and float(first.RescaleSlope) == 1
    hu = first.pixel_array.astype(np.int32) + int(first.RescaleIntercept)
    np.testing.assert_array_equal(hu, volume.array[:, :, 0].T)
    last = pydicom.dcmread(files[-1])
    assert float(last.ImagePositionPatient[2]) == pytest.approx(101.0 + 4 * 2.5)
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert len(uids) == len(files)
    assert {pydicom.dcmread(f).SeriesInstanceUID for f in files} == {first.SeriesInstanceUID}


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("unsigned,bits,intercept", [(False, 16, -1024.0), (True, 12, -1024.0), (False, 12, 0.0)])
def test_every_transfer_syntax_decodes_to_the_same_hu(tmp_path, syntax, unsigned, bits, intercept):
    volume = asymmetric_volume((40, 36, 3))
    volume.array[:] = np.clip(volume.array, -1024, 2047)
    options = SeriesWriteOptions(transfer_syntax=syntax, unsigned=unsigned, bits_stored=bits,
                                 rescale_intercept=intercept)
    files = write_ct_series(volume, tmp_path, options)
    first = pydicom.dcmread(files[0])
    assert first.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    assert (first.BitsStored, first.PixelRepresentation) == (bits, 0 if unsigned else 1)
    decoded = np.stack([pydicom.dcmread(f).pixel_array.astype(np.int32) for f in files], axis=-1)
    np.testing.assert_array_equal(decoded.transpose(1, 0, 2) + int(intercept), volume.array)
    back = read_with_sitk(tmp_path)  # GDCM decodes every syntax independently of pydicom's plugins
    np.testing.assert_array_equal(back.array, volume.array)


@pytest.mark.parametrize("kind", ["constant", "full_range_noise", "ramp"])
def test_jpeg_lossless_encoder_is_lossless_on_extreme_frames(kind):
    from pydicom.pixels.decoders import JPEGLosslessSV1Decoder

    rng = np.random.default_rng(1)
    frame = {"constant": np.full((17, 23), 1234, dtype=np.uint16),
             "full_range_noise": rng.integers(0, 65536, size=(31, 29)).astype(np.uint16),
             "ramp": (np.arange(64 * 48).reshape(64, 48) * 21 % 65536).astype(np.uint16)}[kind]
    codestream = encode_jpeg_lossless_sv1(frame, 16)
    assert codestream[:2] == b"\xFF\xD8" and codestream[-2:] == b"\xFF\xD9"
    assert JPEGLosslessSV1Decoder.is_available
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
    dataset.Rows, dataset.Columns = frame.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    dataset.PixelData = pydicom.encaps.encapsulate([codestream])
    dataset["PixelData"].VR = "OB"
    np.testing.assert_array_equal(dataset.pixel_array, frame)


def test_gantry_tilt_tilts_columns_but_steps_slices_along_z(tmp_path):
    volume = asymmetric_volume((36, 32, 4))
    files = write_ct_series(volume, tmp_path, SeriesWriteOptions(gantry_tilt_deg=-18.5))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    angle = np.radians(18.5)
    # same layout as the real Philips tilted series: column cosine (0, cos, -sin) with GantryDetectorTilt -18.5
    np.testing.assert_allclose(orientation, [1, 0, 0, 0, np.cos(angle), -np.sin(angle)], atol=1e-9)
    assert float(headers[0].GantryDetectorTilt) == -18.5
    steps = np.diff([[float(v) for v in h.ImagePositionPatient] for h in headers], axis=0)
    np.testing.assert_allclose(steps, [[0, 0, 2.5]] * 3, atol=1e-9)
    # the sheared affine tilted_affine() reports is exactly where the DICOM puts every pixel
    sheared_lps = lps_to_ras(tilted_affine(volume.affine, -18.5))
    h = headers[2]
    row, column = orientation[:3], orientation[3:]
    spacing = [float(v) for v in h.PixelSpacing]
    dicom_world = np.array([float(v) for v in h.ImagePositionPatient]) + 7 * spacing[1] * row + 5 * spacing[0] * column
    np.testing.assert_allclose((sheared_lps @ [7, 5, 2, 1])[:3], dicom_world, atol=1e-6)


def test_dropped_duplicated_and_shuffled_slices(tmp_path):
    volume = asymmetric_volume((32, 32, 6))
    options = SeriesWriteOptions(drop_slices=[2], duplicate_slices=[4], shuffle_instance_numbers=True, seed=5,
                                 file_naming="shuffled")
    files = write_ct_series(volume, tmp_path, options)
    headers = [pydicom.dcmread(f) for f in files]
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    assert z == pytest.approx([101.0, 103.5, 108.5, 111.0, 111.0, 113.5])  # slice 2 missing, slice 4 twice
    assert len({h.SOPInstanceUID for h in headers}) == 6
    numbers = [int(h.InstanceNumber) for h in headers]
    assert sorted(numbers) == list(range(1, 7)) and numbers != sorted(numbers)
    assert sorted(f.name for f in files) == [f"IM{n:04d}.dcm" for n in range(1, 7)]
    assert [f.name for f in files] != sorted(f.name for f in files)
    np.testing.assert_array_equal(headers[3].pixel_array, headers[4].pixel_array)


@pytest.mark.parametrize("naming,expected", [("sequential", "IM0001.dcm"), ("no_suffix", "IM0001")])
def test_file_naming(tmp_path, naming, expected):
    files = write_ct_series(asymmetric_volume((32, 32, 2)), tmp_path, SeriesWriteOptions(file_naming=naming))
    assert files[0].name == expected and files[0].exists()


def test_two_series_share_a_folder_with_prefixes(tmp_path):
    first = write_ct_series(asymmetric_volume((32, 32, 2)), tmp_path, SeriesWriteOptions(file_prefix="A"))
    second = write_ct_series(asymmetric_volume((32, 32, 3)), tmp_path, SeriesWriteOptions(file_prefix="B"))
    assert [f.name for f in first] == ["A0001.dcm", "A0002.dcm"] and second[2].name == "B0003.dcm"
    series = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in first + second}
    assert len(series) == 2 and len(list(tmp_path.iterdir())) == 5


def test_sop_uid_file_names(tmp_path):
    files = write_ct_series(asymmetric_volume((32, 32, 2)), tmp_path, SeriesWriteOptions(file_naming="sop_uid"))
    assert files[0].name == pydicom.dcmread(files[0]).SOPInstanceUID + ".dcm"


def test_pixel_padding_outside_the_reconstruction_circle(tmp_path):
    volume = Volume(np.full((40, 40, 2), 50, dtype=np.int16), np.eye(4))
    files = write_ct_series(volume, tmp_path, SeriesWriteOptions(pixel_padding_value=-2000, rescale_intercept=0))
    header = pydicom.dcmread(files[0])
    assert header.PixelPaddingValue == -2000
    pixels = header.pixel_array
    assert pixels[0, 0] == -2000 and pixels[20, 20] == 50 and pixels[0, 20] == 50


def test_identity_uids_and_patient(tmp_path):
    options = SeriesWriteOptions(patient_name="PHANTOM^007", patient_id="PH007", study_uid="1.2.3.4",
                                 series_uid="1.2.3.4.5", frame_of_reference_uid="1.2.3.4.6", series_number=7,
                                 convolution_kernel="B30f", image_type="DERIVED\\SECONDARY\\AXIAL")
    header = pydicom.dcmread(write_ct_series(asymmetric_volume((32, 32, 2)), tmp_path, options)[0])
    assert (str(header.PatientName), header.PatientID) == ("PHANTOM^007", "PH007")
    assert (header.StudyInstanceUID, header.SeriesInstanceUID, header.FrameOfReferenceUID) == \
        ("1.2.3.4", "1.2.3.4.5", "1.2.3.4.6")
    assert header.SeriesNumber == 7 and header.ConvolutionKernel == "B30f"
    assert list(header.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]


def test_bad_inputs_give_clear_errors(tmp_path):
    volume = asymmetric_volume((32, 32, 2))
    volume.array[0, 0, 0] = -3000
    with pytest.raises(InputError, match=r"must lie within HU \[-1024, 64511\].*got \[-3000"):
        write_ct_series(volume, tmp_path / "a", SeriesWriteOptions(unsigned=True))
    with pytest.raises(ConfigError, match="bits_stored must be 12 or 16, got 8"):
        write_ct_series(asymmetric_volume((32, 32, 2)), tmp_path / "b", SeriesWriteOptions(bits_stored=8))
    with pytest.raises(ConfigError, match="at least 32×32 pixels"):
        write_ct_series(asymmetric_volume((20, 40, 2)), tmp_path / "c",
                        SeriesWriteOptions(transfer_syntax="jpeg2000_lossless"))
    with pytest.raises(ConfigError, match=r"drop_slices must hold slice indices in \[0, 1\], got \[5\]"):
        write_ct_series(asymmetric_volume((32, 32, 2)), tmp_path / "d", SeriesWriteOptions(drop_slices=[5]))
    sheared = asymmetric_volume((32, 32, 2))
    sheared.affine[:3, 1] += sheared.affine[:3, 0]
    with pytest.raises(InputError, match="perpendicular i and j axes"):
        write_ct_series(sheared, tmp_path / "e")
    with pytest.raises(ConfigError, match="transfer_syntax must be one of"):
        write_ct_series(asymmetric_volume((32, 32, 2)), tmp_path / "f", SeriesWriteOptions(transfer_syntax="jpeg"))
    assert not list(tmp_path.rglob("*.partial-*"))
