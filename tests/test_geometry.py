"""Grids and resampling: exact round trips on asymmetric, oblique and feet-first grids."""
import numpy as np
import pytest

from pipeline.geometry import (
    Grid,
    Volume,
    affine_from_parts,
    canonical_grid,
    crop_grid,
    regrid_spacing,
    resample_to_grid,
    world_to_index,
)
from pipeline.volume_io import load_volume, save_nifti, sitk_to_volume, volume_to_sitk


def _rotation_x(degrees):
    t = np.deg2rad(degrees)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


GRIDS = {
    "identity": affine_from_parts(np.eye(3), [0.7, 0.8, 2.5], [-50, 20, 100]),
    "feet_first": affine_from_parts(np.diag([-1.0, -1.0, -1.0]), [0.9, 0.9, 3.0], [80, 60, -10]),
    "oblique": affine_from_parts(_rotation_x(16.5) @ np.diag([1.0, -1.0, 1.0]), [0.6, 0.75, 1.25], [3, -7, 11]),
    "transposed": affine_from_parts(np.array([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0]]), [1.0, 2.0, 0.5], [0, 0, 0]),
}


def _asymmetric(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 5, size=shape).astype(np.uint8)


@pytest.mark.parametrize("name", GRIDS)
def test_canonical_grid_keeps_every_voxel_in_place(name):
    grid = Grid((11, 7, 5), GRIDS[name])
    canonical = canonical_grid(grid)
    labels = _asymmetric(grid.shape)
    moved = resample_to_grid(labels, grid, canonical)
    assert sorted(moved.shape) == sorted(grid.shape)
    assert np.array_equal(resample_to_grid(moved, canonical, grid), labels)
    # the voxel at canonical index (1, 2, 3) is the source voxel at the same world point
    source_index = np.rint(world_to_index(grid, canonical.world([1, 2, 3])[None]))[0].astype(int)
    assert moved[1, 2, 3] == labels[tuple(source_index)]
    direction = canonical.direction
    assert np.all(np.diag(direction) > 0.5)  # axes now point roughly R, A, S


@pytest.mark.parametrize("name", GRIDS)
def test_regrid_keeps_field_of_view_and_maps_back(name):
    grid = Grid((20, 16, 10), GRIDS[name])  # even sizes: the 2x grid nests exactly
    coarse = regrid_spacing(grid, grid.spacing * 2)
    extent = np.asarray(grid.shape) * grid.spacing
    assert np.allclose(np.asarray(coarse.shape) * coarse.spacing, extent)
    # the outer edge (half a voxel before voxel 0) is the same world point on both grids
    assert np.allclose(grid.world([-0.5, -0.5, -0.5]), coarse.world([-0.5, -0.5, -0.5]))
    block = np.zeros(grid.shape, np.uint8)
    block[4:12, 2:10, 2:8] = 3
    there = resample_to_grid(block, grid, coarse)
    back = resample_to_grid(there, coarse, grid)
    assert np.array_equal(back, block)


def test_linear_resampling_reproduces_a_linear_ramp():
    grid = Grid((30, 20, 10), GRIDS["oblique"])
    i, j, k = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    ramp = (2.0 * i + 3.0 * j - 1.0 * k).astype(np.float32)
    fine = regrid_spacing(grid, grid.spacing / 2)
    up = resample_to_grid(ramp, grid, fine, order=1)
    inner = up[2:-2, 2:-2, 2:-2]
    fi, fj, fk = np.meshgrid(*[np.arange(n) for n in fine.shape], indexing="ij")
    expected = 2.0 * (fi / 2 - 0.25) + 3.0 * (fj / 2 - 0.25) - (fk / 2 - 0.25)
    assert np.allclose(inner, expected[2:-2, 2:-2, 2:-2], atol=1e-4)


def test_crop_then_uncrop_is_exact():
    grid = Grid((12, 10, 8), GRIDS["feet_first"])
    labels = _asymmetric(grid.shape, seed=3)
    sub = crop_grid(grid, [2, 3, 1], [9, 8, 7])
    cropped = resample_to_grid(labels, grid, sub)
    assert np.array_equal(cropped, labels[2:9, 3:8, 1:7])
    back = resample_to_grid(cropped, sub, grid)
    assert np.array_equal(back[2:9, 3:8, 1:7], cropped) and back[0].sum() == 0


@pytest.mark.parametrize("name", ["feet_first", "transposed"])
def test_linear_resampling_onto_a_sub_box_equals_the_same_box_of_the_full_result(name):
    """Linear resampling reads only the source voxels a crop needs, with the same values, edges and fill."""
    grid = Grid((23, 17, 9), GRIDS[name])
    image = np.random.default_rng(5).normal(size=grid.shape).astype(np.float32)
    target = regrid_spacing(canonical_grid(grid), canonical_grid(grid).spacing * np.array([1.3, 0.7, 1.9]))
    full = resample_to_grid(image, grid, target, order=1, fill=-7.0)
    for start, stop in [([2, 3, 1], [6, 11, 4]), ([0, 0, 0], [4, 5, 2]), ([3, 1, 2], list(target.shape))]:
        stop = np.minimum(stop, target.shape)
        sub = crop_grid(target, start, stop)
        part = resample_to_grid(image, grid, sub, order=1, fill=-7.0)
        np.testing.assert_allclose(part, full[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]], atol=1e-5)
    # a box that reaches beyond the source: the voxels outside get the fill value, the rest agree
    beyond = Grid((6, 6, 6), target.affine.copy())
    beyond.affine[:3, 3] = target.world([-3, -3, -3])
    padded = resample_to_grid(image, grid, beyond, order=1, fill=-7.0)
    assert (padded == -7.0).any()
    np.testing.assert_allclose(padded[3:, 3:, 3:], full[:3, :3, :3], atol=1e-5)


def test_general_path_for_rotated_grids():
    grid = Grid((16, 16, 16), GRIDS["identity"])
    rotated = Grid((16, 16, 16), affine_from_parts(_rotation_x(30), grid.spacing, grid.origin))
    labels = np.zeros(grid.shape, np.uint8)
    labels[6:10, 6:10, 6:10] = 1
    out = resample_to_grid(labels, grid, rotated)
    assert out.shape == rotated.shape and 0 < out.sum() < 200


@pytest.mark.parametrize("name", GRIDS)
def test_nifti_and_itk_round_trip_keep_geometry(tmp_path, name):
    volume = Volume(_asymmetric((9, 8, 7)).astype(np.int16), GRIDS[name])
    path = save_nifti(volume, tmp_path / "v.nii.gz")
    loaded = load_volume(path)
    assert np.array_equal(loaded.array, volume.array)
    assert loaded.grid.difference(volume.grid) is None
    import nibabel as nib

    header = nib.load(str(path)).header
    assert header["qform_code"] == 1 and header["sform_code"] == 1
    assert np.allclose(nib.load(str(path)).get_qform(), volume.affine, atol=1e-5)
    via_itk = sitk_to_volume(volume_to_sitk(volume))
    assert np.array_equal(via_itk.array, volume.array) and via_itk.grid.difference(volume.grid) is None


def _linear_reference(image, src, dst, fill):
    """Independent float64 reference: scipy map_coordinates at every destination voxel's source index, edges
    clamped within half a voxel of the source and ``fill`` beyond (resample_to_grid's documented rule)."""
    from scipy import ndimage

    from pipeline.geometry import index_mapping

    matrix = index_mapping(src, dst)
    index = np.indices(dst.shape).reshape(3, -1).astype(np.float64)
    coords = matrix[:3, :3] @ index + matrix[:3, 3:4]
    shape = np.asarray(src.shape)[:, None]
    outside = ((coords < -0.5) | (coords > shape - 0.5)).any(axis=0)
    values = ndimage.map_coordinates(image.astype(np.float64), np.clip(coords, 0, shape - 1), order=1,
                                     mode="nearest")
    values[outside] = fill
    return values.reshape(dst.shape)


def _resampling_targets(grid: Grid, scale, crop_stop, beyond_shape) -> tuple[Grid, Grid, Grid]:
    """Destinations for a linear resampling test: the canonical grid at ``scale`` × its spacing, a crop of it
    (the body crop), and a grid of ``beyond_shape`` that starts outside the source."""
    canonical = canonical_grid(grid)
    target = regrid_spacing(canonical, canonical.spacing * np.array(scale))
    cropped = crop_grid(target, [2, 3, 1], np.minimum(crop_stop, target.shape))
    beyond = Grid(beyond_shape, target.affine.copy())
    beyond.affine[:3, 3] = target.world([-4, -2, -3])
    return target, cropped, beyond


@pytest.mark.parametrize("name", GRIDS)
@pytest.mark.parametrize("layout", ["C", "F"])
def test_linear_resampling_from_int16_in_either_memory_order_equals_float64_reference(name, layout):
    """The linear path works in the source's memory order straight from the stored type (int16 CT): the
    result matches an independent float64 reference to float32 rounding, for C- and Fortran-ordered input
    (nibabel's), a target box smaller than the source (the body crop) and one reaching beyond it."""
    grid = Grid((29, 19, 11), GRIDS[name])
    image = np.random.default_rng(9).integers(-1024, 1500, size=grid.shape).astype(np.int16)
    image = np.asfortranarray(image) if layout == "F" else np.ascontiguousarray(image)
    for dst in _resampling_targets(grid, [1.7, 0.6, 1.3], [14, 25, 8], (9, 9, 9)):
        out = resample_to_grid(image, grid, dst, order=1, fill=-1000.0, out_dtype=np.float32)
        assert out.dtype == np.float32 and out.shape == dst.shape and out.flags.c_contiguous
        np.testing.assert_allclose(out, _linear_reference(image, grid, dst, -1000.0), rtol=0, atol=2e-3)
    beyond = _resampling_targets(grid, [1.7, 0.6, 1.3], [14, 25, 8], (9, 9, 9))[2]
    assert (resample_to_grid(image, grid, beyond, order=1, fill=-1000.0) == -1000.0).any()


@pytest.mark.parametrize("name", GRIDS)
@pytest.mark.parametrize("layout", ["C", "F"])
def test_linear_resampling_in_threaded_slabs_is_identical_to_one_pass(monkeypatch, name, layout):
    """Large grids are resampled in slabs along the first pass's axis, one thread each: bit-identical output."""
    from pipeline import geometry

    grid = Grid((37, 23, 17), GRIDS[name])
    image = np.random.default_rng(4).integers(-1024, 1500, size=grid.shape).astype(np.int16)
    image = np.asfortranarray(image) if layout == "F" else np.ascontiguousarray(image)
    for dst in _resampling_targets(grid, [0.7, 1.1, 0.9], [30, 20, 14], (21, 13, 11)):
        monkeypatch.setattr(geometry, "PARALLEL_VOXELS", 1 << 60)
        one = resample_to_grid(image, grid, dst, order=1, fill=-1000.0, out_dtype=np.float32)
        monkeypatch.setattr(geometry, "PARALLEL_VOXELS", 1)
        for cores in (2, 3, 64):  # 64 cores: more slabs than some axes have points
            monkeypatch.setattr(geometry.torchrun, "cores_per_process", lambda cores=cores: cores)
            threaded = resample_to_grid(image, grid, dst, order=1, fill=-1000.0, out_dtype=np.float32)
            assert threaded.flags.c_contiguous and threaded.dtype == np.float32
            np.testing.assert_array_equal(threaded, one)


def test_threads_for_array_work_are_the_process_share_of_its_cores(monkeypatch):
    """Resampling and the clean-up use the cores this process may run on, shared out among torchrun's local ranks."""
    from pipeline import torchrun

    monkeypatch.setattr(torchrun, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert torchrun.cores_per_process() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert torchrun.cores_per_process() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert torchrun.cores_per_process() == 1
