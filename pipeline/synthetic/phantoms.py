"""Synthetic CT phantoms (HU image + organ label map) and their export as real DICOM and NIfTI.

The anatomy is built in world coordinates (RAS+ mm: +x = patient's right, +y = anterior,
+z = superior) and then sampled on a voxel grid, so changing the grid's direction, spacing or
slice order never moves an organ in the patient. Labels: 1 = liver (patient's right, upper
abdomen), 2 = spleen (patient's left), 3 = kidneys (both, the left one higher). Everything
random is drawn from the seed in a fixed order, independent of the grid options.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import ConfigError
from pipeline.geometry import Grid, Volume, affine_from_parts

LABEL_NAMES = {1: "liver", 2: "spleen", 3: "kidneys"}
HU_MIN, HU_MAX = -1024, 3071


@dataclass
class PhantomOptions:
    """How synthetic CT phantoms are sampled: grid size, spacing, orientation and noise."""

    shape: int = field(default=192, metadata={"help": "In-plane size in voxels (rows = columns)."})
    slices: int = field(default=96, metadata={"help": "Number of slices."})
    inplane_spacing_min: float = field(default=0.6, metadata={"help": "Smallest in-plane pixel spacing (mm)."})
    inplane_spacing_max: float = field(default=1.0, metadata={"help": "Largest in-plane pixel spacing (mm)."})
    slice_spacing_min: float = field(default=1.25, metadata={"help": "Smallest slice spacing (mm)."})
    slice_spacing_max: float = field(default=5.0, metadata={"help": "Largest slice spacing (mm)."})
    random_origin: bool = field(default=True, metadata={"help": "Place the patient at a random table position."})
    direction: Literal["identity", "oblique", "random"] = field(
        default="identity", metadata={"help": "identity: standard axial DICOM (i → patient's left, j → posterior); "
                                              "oblique: tilted 10–25° about a random axis; random: any rotation."})
    feet_first: bool = field(default=False, metadata={"help": "Slices run from head to feet (k → inferior)."})
    noise_hu: float = field(default=15.0, metadata={"help": "Standard deviation of Gaussian noise (HU)."})
    blur_mm: float = field(default=0.6, metadata={"help": "Gaussian blur sigma (mm) before noise; 0 disables."})


@dataclass
class Ellipsoid:
    """A solid ellipsoid in anatomy coordinates (mm, RAS axes, origin at the anatomy centre)."""

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray  # columns are the ellipsoid's axes

    def contains(self, points: np.ndarray) -> np.ndarray:
        local = (points - self.centre.astype(np.float32)) @ (self.rotation / self.radii[None, :]).astype(np.float32)
        return np.einsum("...d,...d->...", local, local) <= 1.0

    def half_extent(self) -> np.ndarray:
        """Half-size of the axis-aligned box around the ellipsoid."""
        return np.sqrt(((self.rotation * self.radii[None, :]) ** 2).sum(axis=1))


@dataclass
class Anatomy:
    """The world-space phantom: where the patient is and the shapes of its tissues."""

    centre_ras: np.ndarray        # world position of the anatomy origin
    scale_mm: float               # body half-width
    body_radii: np.ndarray        # (x, y) semi-axes of the skin ellipse
    fat_mm: float
    spine: list[Ellipsoid]
    aorta: Ellipsoid
    lungs: list[Ellipsoid]
    rib_first_mm: float           # z centre of the lowest rib band
    rib_period_mm: float          # distance between rib bands
    rib_count: int
    rib_half_height_mm: float
    organs: dict[int, list[Ellipsoid]]  # label value → union of ellipsoids
    hu: dict[str, float]


@dataclass
class Phantom:
    """A sampled phantom: int16 HU image and uint8 label map on the same grid."""

    image: Volume
    label: Volume
    label_names: dict[int, str]
    anatomy: Anatomy
    seed: int
    options: PhantomOptions = field(default_factory=PhantomOptions)

    def render(self, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[Volume, Volume]:
        """Sample this phantom's anatomy, blur and noise on another grid (any affine, e.g. a gantry-tilted one)."""
        return render_anatomy(self.anatomy, Grid(shape, affine), self.options.noise_hu, self.options.blur_mm,
                              np.random.default_rng([self.seed, 5]))


# ---------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------

def _rotation(angles_deg) -> np.ndarray:
    """Rotation matrix from x, y, z Euler angles in degrees."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def anatomy_scale_mm(options: PhantomOptions) -> float:
    """Body half-width: 90 % of the smallest in-plane half field of view these options can draw.

    The organs stay within about 0.95 of this radius from the anatomy centre, so they are whole in
    a grid of any direction as long as the slices cover at least the in-plane field of view
    (``slices * slice_spacing_min >= shape * inplane_spacing_min``, true for the defaults). With
    fewer or thinner slices a scan may cut the organs at its top or bottom, as real scans do.
    """
    return 0.9 * 0.5 * options.shape * options.inplane_spacing_min


def build_anatomy(seed: int, options: PhantomOptions) -> Anatomy:
    """Draw the world-space anatomy of phantom ``seed`` (depends on the options' size bounds only)."""
    rng = np.random.default_rng([seed, 1])
    s = anatomy_scale_mm(options)

    def jitter(low=0.88, high=1.12, size=3):
        return rng.uniform(low, high, size)

    def shift(amount=0.04):
        return rng.uniform(-amount, amount, 3) * s

    def angles(x=8.0, y=8.0, z=15.0):
        return rng.uniform(-1, 1, 3) * np.array([x, y, z])

    centre = np.array([rng.uniform(-60, 60), rng.uniform(-80, 20), rng.uniform(-400, 200)])
    body = np.array([s * rng.uniform(0.95, 1.0), s * rng.uniform(0.70, 0.80)])
    z_unit = 0.8 * s  # organs span about ±z_unit along the body axis

    liver_main = Ellipsoid(np.array([0.30 * s, 0.02 * s, 0.05 * z_unit]) + shift(),
                           np.array([0.42 * s, 0.38 * s, 0.45 * z_unit]) * jitter(), _rotation(angles()))
    liver_left = Ellipsoid(liver_main.centre + np.array([-0.30 * s, 0.13 * s, 0.10 * z_unit]),
                           np.array([0.30 * s, 0.18 * s, 0.25 * z_unit]) * jitter(), _rotation(angles()))
    spleen = Ellipsoid(np.array([-0.60 * s, -0.12 * s, 0.25 * z_unit]) + shift(),
                       np.array([0.20 * s, 0.28 * s, 0.40 * z_unit]) * jitter(),
                       _rotation(angles() + np.array([0, 0, -30.0])))
    kidney_radii = np.array([0.19 * s, 0.21 * s, 0.40 * z_unit])
    right_kidney = Ellipsoid(np.array([0.38 * s, -0.36 * s, -0.45 * z_unit]) + shift(0.03),
                             kidney_radii * jitter(0.9, 1.05), _rotation(angles() + np.array([0, 0, -20.0])))
    left_kidney = Ellipsoid(np.array([-0.38 * s, -0.36 * s, -0.27 * z_unit]) + shift(0.03),
                            kidney_radii * jitter(0.95, 1.1), _rotation(angles() + np.array([0, 0, 20.0])))
    lungs = [Ellipsoid(np.array([side * 0.45 * s, -0.05 * s, 0.30 * z_unit + 1.6 * z_unit]) + shift(),
                       np.array([0.36 * s, 0.52 * s, 1.6 * z_unit]) * jitter(0.95, 1.05), _rotation(angles(3, 3, 5)))
             for side in (1, -1)]
    tall = 50.0 * s  # the spine and aorta run through the whole scan
    spine = [Ellipsoid(np.array([0.0, -0.62 * body[1], 0.0]), np.array([0.13 * s, 0.12 * s, tall]), np.eye(3)),
             Ellipsoid(np.array([0.0, -0.86 * body[1], 0.0]), np.array([0.04 * s, 0.06 * s, tall]), np.eye(3))]
    aorta = Ellipsoid(np.array([-0.10 * s, -0.22 * s, 0.0]), np.array([0.07 * s, 0.07 * s, tall]), np.eye(3))
    hu = {"air": -1000.0, "fat": rng.uniform(-110, -90), "soft": rng.uniform(35, 45), "lung": rng.uniform(-840, -780),
          "bone": rng.uniform(650, 850), "rib": rng.uniform(450, 600), "aorta": rng.uniform(160, 190),
          "liver": rng.uniform(92, 108), "spleen": rng.uniform(132, 148), "kidney_cortex": rng.uniform(190, 215),
          "kidney_medulla": rng.uniform(140, 160)}
    return Anatomy(centre_ras=centre, scale_mm=s, body_radii=body, fat_mm=0.08 * s, spine=spine, aorta=aorta,
                   lungs=lungs, rib_first_mm=(-0.2 + rng.uniform(-0.05, 0.05)) * z_unit,
                   rib_period_mm=0.25 * z_unit, rib_count=13, rib_half_height_mm=0.03 * z_unit,
                   organs={1: [liver_main, liver_left], 2: [spleen], 3: [right_kidney, left_kidney]}, hu=hu)


# ---------------------------------------------------------------------------------------------
# Grid and sampling
# ---------------------------------------------------------------------------------------------

def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def phantom_grid(seed: int, options: PhantomOptions, anatomy: Anatomy) -> Grid:
    """The voxel grid of phantom ``seed``: centred on the anatomy, spacing and direction drawn from the seed."""
    if options.shape < 8 or options.slices < 4:
        raise ConfigError(f"phantom shape and slices must be at least 8 and 4, got {options.shape} and "
                          f"{options.slices}. Use e.g. shape 192, slices 96.")
    for low, high, name in ((options.inplane_spacing_min, options.inplane_spacing_max, "inplane_spacing"),
                            (options.slice_spacing_min, options.slice_spacing_max, "slice_spacing")):
        if not 0 < low <= high:
            raise ConfigError(f"{name}_min must be positive and at most {name}_max, got {low} and {high}.")
    rng = np.random.default_rng([seed, 2])
    inplane = rng.uniform(options.inplane_spacing_min, options.inplane_spacing_max)
    slice_spacing = rng.uniform(options.slice_spacing_min, options.slice_spacing_max)
    oblique_axis = rng.normal(size=3)
    oblique_angle = rng.uniform(10.0, 25.0)
    random_rotation = _random_rotation(rng)
    jitter = rng.uniform(-3.0, 3.0, 3)

    axial = np.diag([-1.0, -1.0, 1.0])  # DICOM axial: i → patient's left, j → posterior (RAS columns)
    if options.direction == "identity":
        rotation = np.eye(3)
    elif options.direction == "oblique":
        axis = oblique_axis / np.linalg.norm(oblique_axis)
        rotation = _axis_angle(axis, math.radians(oblique_angle))
    elif options.direction == "random":
        rotation = random_rotation
    else:
        raise ConfigError(f"phantom direction must be identity, oblique or random, got '{options.direction}'.")
    direction = rotation @ axial
    if options.feet_first:
        direction[:, 2] = -direction[:, 2]
    spacing = np.array([inplane, inplane, slice_spacing])
    shape = np.array([options.shape, options.shape, options.slices])
    centre = anatomy.centre_ras + (jitter if options.random_origin else 0.0)
    origin = centre - direction @ (spacing * (shape - 1) / 2.0)
    return Grid(tuple(shape.tolist()), affine_from_parts(direction, spacing, origin))


def _axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _anatomy_points(grid: Grid, anatomy: Anatomy) -> np.ndarray:
    """Anatomy coordinates (mm, float32) of every voxel centre, shape grid.shape + (3,)."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in grid.shape)
    affine = grid.affine.astype(np.float32)
    offset = (affine[:3, 3] - anatomy.centre_ras.astype(np.float32))
    points = (i[:, None, None, None] * affine[:3, 0] + j[None, :, None, None] * affine[:3, 1]
              + k[None, None, :, None] * affine[:3, 2] + offset)
    return points


def _box(grid: Grid, anatomy: Anatomy, shape: Ellipsoid) -> tuple[slice, slice, slice] | None:
    """Index-space box of voxels that can lie inside ``shape`` (None when it misses the grid)."""
    half = shape.half_extent()
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
    world = corners + shape.centre + anatomy.centre_ras
    index = (np.linalg.inv(grid.affine) @ np.c_[world, np.ones(8)].T).T[:, :3]
    low = np.maximum(np.floor(index.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 1, grid.shape)
    if np.any(high <= low):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _paint(points: np.ndarray, grid: Grid, anatomy: Anatomy, shape: Ellipsoid, target: np.ndarray, value,
           where: np.ndarray | None = None) -> np.ndarray | None:
    """Set ``target`` to ``value`` inside ``shape``; return the box and in-box mask (for labels)."""
    box = _box(grid, anatomy, shape)
    if box is None:
        return None
    inside = shape.contains(points[box])
    if where is not None:
        inside &= where[box]
    target[box][inside] = value
    return box, inside


def render_anatomy(anatomy: Anatomy, grid: Grid, noise_hu: float, blur_mm: float,
                   rng: np.random.Generator) -> tuple[Volume, Volume]:
    """Sample ``anatomy`` at the voxel centres of ``grid``: (int16 HU image, uint8 label map)."""
    points = _anatomy_points(grid, anatomy)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    hu = anatomy.hu
    image = np.full(grid.shape, hu["air"], dtype=np.float32)
    label = np.zeros(grid.shape, dtype=np.uint8)
    radii = anatomy.body_radii.astype(np.float32)
    skin = (x / radii[0]) ** 2 + (y / radii[1]) ** 2 <= 1.0
    inner_radii = radii - np.float32(anatomy.fat_mm)
    inner = (x / inner_radii[0]) ** 2 + (y / inner_radii[1]) ** 2 <= 1.0
    image[skin] = hu["fat"]
    image[inner] = hu["soft"]
    rib_radii = radii - np.float32(1.6 * anatomy.fat_mm)
    band = np.abs(np.mod(z - anatomy.rib_first_mm + anatomy.rib_period_mm / 2, anatomy.rib_period_mm)
                  - anatomy.rib_period_mm / 2)
    in_rib_range = (z > anatomy.rib_first_mm - anatomy.rib_period_mm / 2) & (
        z < anatomy.rib_first_mm + (anatomy.rib_count - 0.5) * anatomy.rib_period_mm)
    ribs = (inner & ((x / rib_radii[0]) ** 2 + (y / rib_radii[1]) ** 2 > 1.0) & in_rib_range
            & (band <= anatomy.rib_half_height_mm) & ~((y > 0) & (np.abs(x) < 0.3 * anatomy.scale_mm)))
    del skin, band, in_rib_range
    for lung in anatomy.lungs:
        _paint(points, grid, anatomy, lung, image, hu["lung"], where=inner)
    image[ribs] = hu["rib"]
    del ribs, inner
    for part in anatomy.spine:
        _paint(points, grid, anatomy, part, image, hu["bone"])
    _paint(points, grid, anatomy, anatomy.aorta, image, hu["aorta"])
    organ_hu = {1: hu["liver"], 2: hu["spleen"], 3: hu["kidney_cortex"]}
    for value, parts in anatomy.organs.items():
        for part in parts:
            painted = _paint(points, grid, anatomy, part, image, organ_hu[value])
            if painted is None:
                continue
            box, inside = painted
            label[box][inside] = value
            if value == 3:  # renal medulla: the inner part of each kidney is less enhanced
                _paint(points, grid, anatomy, Ellipsoid(part.centre, part.radii * 0.55, part.rotation), image,
                       hu["kidney_medulla"])
    del points
    if blur_mm > 0:
        from scipy import ndimage

        image = ndimage.gaussian_filter(image, sigma=blur_mm / grid.spacing, mode="nearest", truncate=3.0)
    if noise_hu > 0:
        image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(noise_hu)
    image = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)
    return Volume(image, grid.affine.copy()), Volume(label, grid.affine.copy())


def make_phantom(seed: int, options: PhantomOptions | None = None) -> Phantom:
    """A CT phantom for ``seed``: same seed ⇒ same anatomy in world space whatever the grid options."""
    options = options or PhantomOptions()
    anatomy = build_anatomy(seed, options)
    grid = phantom_grid(seed, options, anatomy)
    image, label = render_anatomy(anatomy, grid, options.noise_hu, options.blur_mm, np.random.default_rng([seed, 4]))
    return Phantom(image=image, label=label, label_names=dict(LABEL_NAMES), anatomy=anatomy, seed=seed,
                   options=options)


def label_centroid_ras(label: Volume, value: int) -> np.ndarray:
    """World (RAS mm) centroid of the voxels equal to ``value``."""
    index = np.argwhere(np.asarray(label.array) == value)
    if len(index) == 0:
        raise ValueError(f"label value {value} is absent")
    return label.grid.world(index.mean(axis=0))


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def write_phantom_export(root: Path, cases: list[Phantom], case_ids: list[str] | None = None, dicom: bool = True,
                         nifti: bool = True, rtstruct: bool = False, series_options=None) -> list[dict]:
    """Write phantoms as a hospital-style export and/or NIfTI pairs; return each case's paths.

    DICOM: ``root/<case>/ST0001/SE0001/IM####.dcm`` (each case its own patient PHANTOM^NNN, study,
    series and frame of reference; ``series_options`` is a template SeriesWriteOptions) and, with
    ``rtstruct``, ``root/<case>/ST0001/SE0002/RS0001.dcm`` referencing that series. With a gantry
    tilt the anatomy is re-sampled on the tilted slices, so the DICOM shows the same patient as the
    untilted NIfTI (the reference a tilt-correcting reader should reproduce).
    NIfTI: ``root/nifti/<case>_image.nii.gz`` and ``<case>_label.nii.gz`` on the same grid.
    """
    from pydicom.uid import generate_uid

    from pipeline.synthetic.dicom import SeriesWriteOptions, tilted_affine, write_ct_series, write_rtstruct
    from pipeline.volume_io import save_nifti

    root = Path(root)
    case_ids = case_ids or [f"phantom_{n:03d}" for n in range(len(cases))]
    if len(case_ids) != len(cases) or len(set(case_ids)) != len(case_ids):
        raise ConfigError(f"case_ids must be {len(cases)} distinct names, one per phantom, got {case_ids}.")
    bad = [c for c in case_ids if c in ("nifti", "", ".", "..") or not all(ch.isalnum() or ch in "-_." for ch in c)]
    if bad:
        raise ConfigError(f"case_ids must be plain folder names (letters, digits, '-', '_', '.') other than "
                          f"'nifti', got {bad}.")
    template = series_options or SeriesWriteOptions()
    results = []
    for number, (case_id, phantom) in enumerate(zip(case_ids, cases)):
        entry: dict = {"case_id": case_id, "label_names": dict(phantom.label_names)}
        if dicom:
            options = dataclasses.replace(
                template, patient_name=f"PHANTOM^{number:03d}", patient_id=f"PHANTOM{number:03d}",
                study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid(),
                patient_position="FFS" if phantom.options.feet_first else "HFS", seed=template.seed + number)
            series_dir = root / case_id / "ST0001" / "SE0001"
            image, label = phantom.image, phantom.label
            if options.gantry_tilt_deg:
                image, label = phantom.render(tilted_affine(image.affine, options.gantry_tilt_deg), image.array.shape)
                image = Volume(image.array, phantom.image.affine)  # write_ct_series applies the tilt itself
            files = write_ct_series(image, series_dir, options)
            entry.update(patient_id=options.patient_id, dicom_dir=series_dir, dicom_files=files)
            if rtstruct:
                entry["rtstruct"] = write_rtstruct(label, files, root / case_id / "ST0001" / "SE0002" / "RS0001.dcm",
                                                   phantom.label_names)
        if nifti:
            entry["image_nifti"] = save_nifti(phantom.image, root / "nifti" / f"{case_id}_image.nii.gz")
            entry["label_nifti"] = save_nifti(phantom.label, root / "nifti" / f"{case_id}_label.nii.gz")
        results.append(entry)
    return results
