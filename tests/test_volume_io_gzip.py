"""The one gzip writer (volume_io.parallel_gzip): a standard gzip stream from ISA-L or zlib, read back by anyone."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipeline import volume_io
from pipeline.geometry import Volume
from pipeline.volume_io import gzip_backend, load_volume, parallel_gzip, save_nifti


def _payload() -> bytes:
    """CT-like int16 voxels (smooth + noise) with long runs of air, 3 MB: several chunks."""
    rng = np.random.default_rng(0)
    body = (np.cumsum(rng.normal(0, 3, size=(1 << 20) + 12345)) + rng.normal(0, 8, size=(1 << 20) + 12345))
    data = np.concatenate([np.full(1 << 19, -1000.0), body]).astype(np.int16)
    return data.tobytes()


@pytest.mark.parametrize("backend", ["isal", "zlib"])
@pytest.mark.parametrize("level", [0, 1, 2, 6])
def test_output_is_one_standard_gzip_stream_whatever_the_library(monkeypatch, backend, level):
    if backend == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setattr(volume_io, "_isal_zlib", None)
    data = _payload()
    compressed = parallel_gzip(data, level=level, threads=3, chunk_bytes=1 << 20)
    assert compressed[:3] == b"\x1f\x8b\x08"
    assert gzip.decompress(compressed) == data  # the stdlib reader: one member, CRC and length right
    expected = "isal" if backend == "isal" and level in (1, 2) else "zlib"
    assert gzip_backend(level) == expected
    if level == 0:
        assert len(compressed) > len(data)  # level 0 keeps zlib's meaning: stored, not compressed


def test_isal_serves_the_default_level_when_installed():
    pytest.importorskip("isal")
    assert gzip_backend(1) == "isal" and gzip_backend(9) == "zlib"


def test_nifti_written_through_isal_reads_back_with_nibabel(tmp_path):
    import nibabel as nib

    array = np.random.default_rng(1).integers(-1024, 2000, size=(40, 33, 21)).astype(np.int16)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    path = save_nifti(Volume(array, affine), tmp_path / "ct.nii.gz")
    image = nib.load(str(path))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), array)
    np.testing.assert_allclose(image.affine, affine)
    np.testing.assert_array_equal(load_volume(path).array, array)
    assert load_volume(path).array.dtype == np.int16
    gzip.decompress(path.read_bytes())  # and the stdlib reads the file as plain gzip


def _written_by_nibabel(tmp_path, name, image):
    import nibabel as nib

    path = tmp_path / name
    nib.save(image, str(path))  # nibabel's own gzip writer (zlib, another encoder than ours)
    return path


@pytest.mark.parametrize("kind", ["nifti1_int16", "nifti1_scaled", "nifti2_float", "nifti1_big_endian",
                                  "nifti1_extension", "nifti1_4d_singleton", "nifti1_tiny"])
def test_isal_reader_gives_what_nibabel_reads(tmp_path, monkeypatch, kind):
    """The ISA-L fast path of load_volume returns nibabel's own array and affine, scaling and byte order included."""
    pytest.importorskip("isal")
    import nibabel as nib

    rng = np.random.default_rng(2)
    array = rng.integers(-1024, 3000, size=(31, 22, 13)).astype(np.int16)
    affine = np.array([[-0.8, 0, 0.1, 12.0], [0, 0.9, 0, -30.0], [0, 0, -2.5, 40.0], [0, 0, 0, 1.0]])
    if kind == "nifti2_float":
        image = nib.Nifti2Image(array.astype(np.float32) * 0.5, affine)
    else:
        image = nib.Nifti1Image(array, affine)
        if kind == "nifti1_scaled":  # stored values x slope + intercept (some exporters store CT so)
            image.header.set_slope_inter(0.5, -1024.0)
        if kind == "nifti1_big_endian":
            image = nib.Nifti1Image(array.astype(">i2"), affine, nib.Nifti1Header(endianness=">"))
        if kind == "nifti1_extension":  # a header extension moves the voxels beyond the 540 bytes read first
            image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 700))
        if kind == "nifti1_4d_singleton":
            image = nib.Nifti1Image(array[..., None], affine)
        if kind == "nifti1_tiny":  # all voxels arrive with the first 540 bytes
            image = nib.Nifti1Image(array[:3, :2, :2], affine)
    path = _written_by_nibabel(tmp_path, f"{kind}.nii.gz", image)
    expected = nib.load(str(path))
    expected_array = np.asanyarray(expected.dataobj)
    while expected_array.ndim > 3 and expected_array.shape[-1] == 1:  # load_volume drops trailing singletons
        expected_array = expected_array[..., 0]
    served = []  # what the decompress-into-the-array path gave (None: it handed the file to nibabel)
    into_array = volume_io._unscaled_nifti_into_array
    monkeypatch.setattr(volume_io, "_unscaled_nifti_into_array", lambda *a: served.append(into_array(*a)) or served[-1])
    volume = load_volume(path)
    assert len(served) == 1 and (served[0] is None) == (kind == "nifti1_scaled")  # scaled voxels: nibabel's own
    np.testing.assert_array_equal(volume.array, expected_array)
    assert volume.array.dtype == expected_array.dtype and volume.array.flags.writeable
    np.testing.assert_allclose(volume.affine, expected.affine)


def test_truncated_gzip_is_refused_with_the_file_named(tmp_path):
    pytest.importorskip("isal")
    from pipeline.errors import InputError

    array = np.random.default_rng(3).integers(-1024, 2000, size=(40, 33, 21)).astype(np.int16)
    path = save_nifti(Volume(array, np.eye(4)), tmp_path / "ct.nii.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="ct.nii.gz could not be read"):
        load_volume(path)


@pytest.mark.parametrize("reader", ["isal_c_reader", "igzip_file"])
@pytest.mark.parametrize("damage", ["short_voxels", "crc"])
def test_a_complete_gzip_with_too_few_voxels_or_a_bad_checksum_is_refused(tmp_path, monkeypatch, damage, reader):
    """The voxels are decompressed straight into the array: a stream that ends early, or whose CRC is wrong,
    must still be refused with the file named (the check of a whole-file read), by either reader."""
    pytest.importorskip("isal")
    from pipeline.errors import InputError

    if reader == "igzip_file":
        monkeypatch.delattr(volume_io._isal_zlib, "_GzipReader")

    array = np.random.default_rng(5).integers(-1024, 2000, size=(40, 33, 21)).astype(np.int16)
    path = save_nifti(Volume(array, np.eye(4)), tmp_path / "ct.nii.gz")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    if damage == "short_voxels":  # a well-formed gzip stream of a file cut inside its voxel data
        path.write_bytes(gzip.compress(bytes(raw[: len(raw) - 1000])))
        match = "ct.nii.gz ends 1000 bytes before its voxel data does"
    else:
        stream = bytearray(gzip.compress(bytes(raw)))
        stream[-8] ^= 0xFF  # the trailer's CRC-32
        path.write_bytes(bytes(stream))
        match = "ct.nii.gz could not be read"
    with pytest.raises(InputError, match=match):
        load_volume(path)


@pytest.mark.parametrize("reader", ["isal_c_reader", "igzip_file"])
def test_our_own_files_are_decompressed_straight_into_their_array(tmp_path, monkeypatch, reader):
    """save_nifti writes slope 1, intercept 0; such a file never goes through nibabel's copy from bytes."""
    pytest.importorskip("isal")
    import nibabel as nib

    if reader == "igzip_file":
        monkeypatch.delattr(volume_io._isal_zlib, "_GzipReader")

    array = np.asfortranarray(np.random.default_rng(6).integers(-1024, 2000, size=(30, 20, 9)).astype(np.int16))
    path = save_nifti(Volume(array, np.diag([0.7, 0.7, 2.0, 1.0])), tmp_path / "ct.nii.gz")

    def refuse(*args, **kwargs):
        raise AssertionError("handed to nibabel's from_bytes")

    monkeypatch.setattr(nib.Nifti1Image, "from_bytes", refuse)
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.array.dtype == np.int16 and volume.array.flags.writeable
