"""Seeded DICOM corruption campaign: each damaged series is refused naming the file, corrected and named, or unaffected.

Each trial damages one file of a clean series (a bad tag value, truncation, random header bytes) on
the first, a middle or the last slice, runs the ingest path (scan → select → assemble →
plausibility, the functions ``ctseg ingest`` calls) and classifies the outcome:

- ``refused``: the case is refused and the reason names the damaged file;
- ``corrected``: a volume came out that differs from the clean one, and its warnings name the file;
- ``unaffected``: the volume is identical to the clean one (voxels and affine).

Everything else is a defect: ``silent`` (a different volume whose warnings do not name the file),
``refused_unnamed`` (a refusal that does not say which file) or ``crash`` (an exception that is not
an input refusal). The campaign asserts that there are none, on synthetic phantoms (every kind of
damage, default suite) and on a real series from ../shared/data/sts_ct (a subset in the default
suite, every kind marked slow). It runs once with the default ``on_damaged: refuse`` and once with
``exclude``.
"""
from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.dicom.assemble import AssemblyOptions, assemble_series
from pipeline.dicom.header import read_header
from pipeline.dicom.plausibility import PlausibilityOptions, check_training_volume
from pipeline.dicom.scan import scan_export
from pipeline.dicom.select import SelectionRules, select_series
from pipeline.errors import InputError

from helpers.dicom_phantoms import phantom_volume, write_phantom

SHAPE = (40, 36, 14)


@dataclass
class Outcome:
    status: str                      # "ok" or "refused"
    volumes: list = field(default_factory=list)
    text: str = ""                   # every reason and warning, for the "named" check
    skipped: list = field(default_factory=list)  # the scan's skipped files with their reasons


def ingest_folder(folder: Path, options: AssemblyOptions) -> Outcome:
    """What ``ctseg ingest`` does with a folder, case by case, without writing files."""
    scan = scan_export(folder, workers=1)
    decisions = select_series(scan.series, SelectionRules())
    # what a case says: selection reasons, refusals and warnings (the scan's list of skipped files is not
    # the case's warning, so it does not count as naming a file)
    texts = [d.reason for d in decisions] + scan.warnings
    volumes = []
    for decision in decisions:
        if not decision.selected:
            continue
        try:
            assembled = assemble_series(decision.series, options)
            warnings = list(assembled.warnings) + check_training_volume(
                assembled.volume, "case", PlausibilityOptions())
            volumes.append((assembled.volume, warnings))
            texts += warnings
        except InputError as exc:
            texts.append(str(exc))
    return Outcome("ok" if volumes else "refused", volumes, "\n".join(texts),
                   [f"{s.path.name}: {s.reason}" for s in scan.skipped])


def classify(clean, outcome: Outcome, damaged_name: str) -> str:
    named = damaged_name in outcome.text
    if outcome.status == "refused":
        return "refused" if named else "refused_unnamed"
    (reference,) = clean.volumes
    main = max(outcome.volumes, key=lambda v: v[0].array.size)
    same = (main[0].array.shape == reference[0].array.shape and np.array_equal(main[0].array, reference[0].array)
            and np.allclose(main[0].affine, reference[0].affine, atol=1e-6))
    extra = [v for v in outcome.volumes if v is not main]
    if same and not extra:
        return "unaffected"
    return "corrected" if named else "silent"


# ---------------------------------------------------------------------------------------------
# Kinds of damage: each changes one file in place (rng for the random ones)
# ---------------------------------------------------------------------------------------------

def _set(**values):
    def apply(path: Path, rng) -> None:
        dataset = pydicom.dcmread(path)
        for keyword, value in values.items():
            if value is None:
                del dataset[keyword]
            elif isinstance(value, str) and keyword in dataset:
                dataset[keyword]._value = value  # written as stored, like a broken exporter would
            elif callable(value):
                setattr(dataset, keyword, value(dataset))
            else:
                setattr(dataset, keyword, value)
        dataset.save_as(path)
    return apply


def _move(axis: int, by):
    def position(dataset):
        values = [float(v) for v in dataset.ImagePositionPatient]
        spacing = float(dataset.SliceThickness or 2.0)
        values[axis] += by * spacing if isinstance(by, float) and abs(by) < 10 else by
        return values
    return _set(ImagePositionPatient=position)


def _add_padding_value(path: Path, rng) -> None:
    """PixelPaddingValue on one slice only, equal to its lowest stored value (that pixel would become air)."""
    dataset = pydicom.dcmread(path)
    vr = "SS" if dataset.PixelRepresentation else "US"
    dataset.add_new("PixelPaddingValue", vr, int(dataset.pixel_array.min()))
    dataset.save_as(path)


def _truncate(fraction=None, size=None):
    def apply(path: Path, rng) -> None:
        data = path.read_bytes()
        keep = size if size is not None else int(len(data) * fraction)
        path.write_bytes(data[:max(0, keep)])
    return apply


def _random_header_bytes(count: int):
    def apply(path: Path, rng) -> None:
        header = read_header(path)
        end = header.slices[0].pixel.pixel_offset or 1024
        data = bytearray(path.read_bytes())
        for position in rng.integers(132, end, size=count):
            data[int(position)] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
    return apply


def _destroy_preamble(path: Path, rng) -> None:
    data = bytearray(path.read_bytes())
    data[128:132] = b"XXXX"
    path.write_bytes(bytes(data))


def _transfer_syntax_big_endian(path: Path, rng) -> None:
    """The meta header says Explicit VR Big Endian while the data set stays little endian (same length)."""
    data = path.read_bytes()
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    old = syntax.encode() + (b"\x00" if len(syntax) % 2 else b"")
    new = (b"1.2.840.10008.1.2.2" + b"\x00") if len(old) == 20 else b"1.2.840.10008.1.2.2"[:len(old)]
    path.write_bytes(data.replace(old, new, 1))


DAMAGE = {
    "slope_zero": _set(RescaleSlope="0"), "slope_nan": _set(RescaleSlope="NaN"),
    "slope_text": _set(RescaleSlope="abc"), "slope_two": _set(RescaleSlope="2"),
    "slope_negative": _set(RescaleSlope="-1"), "slope_missing": _set(RescaleSlope=None),
    "slope_infinite": _set(RescaleSlope="inf"),
    "intercept_nan": _set(RescaleIntercept="NaN"), "intercept_text": _set(RescaleIntercept="x-1024"),
    "intercept_missing": _set(RescaleIntercept=None), "intercept_other": _set(RescaleIntercept="-24"),
    "intercept_infinite": _set(RescaleIntercept="-inf"),
    "rows_plus_one": _set(Rows=lambda d: d.Rows + 1), "columns_minus_one": _set(Columns=lambda d: d.Columns - 1),
    "rows_columns_65535": _set(Rows=65535, Columns=65535),
    "bits_allocated_8": _set(BitsAllocated=8), "bits_stored_12": _set(BitsStored=12, HighBit=11),
    "pixel_representation_flipped": _set(PixelRepresentation=lambda d: 1 - d.PixelRepresentation),
    "samples_per_pixel_3": _set(SamplesPerPixel=3), "photometric_rgb": _set(PhotometricInterpretation="RGB"),
    "photometric_monochrome1": _set(PhotometricInterpretation="MONOCHROME1"),
    "padding_value_added": _add_padding_value,
    "position_10m_sideways": _move(0, 10_000.0), "position_100m_sideways": _move(0, 100_000.0),
    "position_1000m_sideways": _move(0, 1_000_000.0), "position_off_line": _move(1, 0.7),
    "position_slightly_off_line": _move(1, 0.2),
    "position_nudged_along": _move(2, 0.3), "position_10m_along": _move(2, 10_000.0),
    "position_text": _set(ImagePositionPatient="abc\\0\\0"),
    "orientation_damaged": _set(ImageOrientationPatient=[0.9, 0, 0, 0, 1, 0]),
    "orientation_other": _set(ImageOrientationPatient=[0, 1, 0, 1, 0, 0]),
    "pixel_spacing_doubled": _set(PixelSpacing=lambda d: [2 * float(v) for v in d.PixelSpacing]),
    "series_uid_changed": _set(SeriesInstanceUID="1.2.3.4.5.6.7"),
    "study_uid_changed": _set(StudyInstanceUID="1.2.3.4.5.6.8"),
    "patient_id_changed": _set(PatientID="SOMEONE_ELSE"),
    "sop_class_secondary_capture": _set(SOPClassUID="1.2.840.10008.5.1.4.1.1.7"),
    "modality_mr": _set(Modality="MR"),
    "transfer_syntax_big_endian": _transfer_syntax_big_endian,
    "truncated_half": _truncate(fraction=0.5), "truncated_header": _truncate(size=300),
    "truncated_to_zero": _truncate(size=0), "truncated_last_byte": _truncate(fraction=None, size=-1),
    "preamble_destroyed": _destroy_preamble,
}
RANDOM_DAMAGE = {f"random_header_bytes_{n}": _random_header_bytes(n) for n in (1, 4, 16)}


def _apply(kind: str, path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    if kind == "truncated_last_byte":
        path.write_bytes(path.read_bytes()[:-1])
        return
    (DAMAGE | RANDOM_DAMAGE)[kind](path, rng)


# ---------------------------------------------------------------------------------------------
# Campaign
# ---------------------------------------------------------------------------------------------

def _trial_folder(source: Path, target: Path, damaged: Path) -> Path:
    """A copy of the series folder: the damaged file copied, every other one linked (fast, read-only)."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            if path.name == damaged.name:
                shutil.copyfile(path, target / path.name)
            else:
                os.symlink(path, target / path.name)
    return target / damaged.name


def run_campaign(source: Path, scratch: Path, kinds: list[str], options: AssemblyOptions, seeds=(0,)) -> Counter:
    clean = ingest_folder(source, options)
    assert clean.status == "ok" and len(clean.volumes) == 1, clean.text
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix == ".dcm")
    by_position = sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                    .ImagePositionPatient[2]))
    edges = {"first": by_position[0], "middle": by_position[len(by_position) // 2], "last": by_position[-1]}
    results: Counter = Counter()
    defects = []
    for kind in kinds:
        for where, original in edges.items():
            for seed in (seeds if kind.startswith("random") else (0,)):
                folder = scratch / f"{kind}-{where}-{seed}"
                damaged = _trial_folder(source, folder, original)
                _apply(kind, damaged, seed)
                try:
                    outcome = ingest_folder(folder, options)
                    verdict = classify(clean, outcome, damaged.name)
                except Exception as exc:  # noqa: BLE001 - a crash is a defect of the campaign's subject
                    outcome, verdict = Outcome("crash", text=f"{type(exc).__name__}: {exc}"), "crash"
                results[verdict] += 1
                if verdict not in ("refused", "corrected", "unaffected"):
                    defects.append(f"{kind} on the {where} slice (seed {seed}): {verdict}: {outcome.text[:400]}")
                shutil.rmtree(folder)
    assert not defects, "\n".join(defects)
    return results


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean") / "series"
    write_phantom(folder, phantom_volume(shape=SHAPE))
    return folder


def _oblique_feet_first() -> np.ndarray:
    angle = np.radians(20.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return rotation @ np.diag([-1.0, -1.0, -1.0])  # k runs feet-wards, tilted 20° about x


@pytest.fixture(scope="module")
def oblique_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean_oblique") / "series"
    write_phantom(folder, phantom_volume(shape=SHAPE, direction=_oblique_feet_first()), patient_position="FFS")
    return folder


@pytest.mark.parametrize("geometry,on_damaged", [("axial", "refuse"), ("axial", "exclude"),
                                                 ("oblique_feet_first", "refuse")])
def test_synthetic_campaign_is_never_silently_different(phantom_series, oblique_series, tmp_path, geometry,
                                                         on_damaged):
    source = phantom_series if geometry == "axial" else oblique_series
    results = run_campaign(source, tmp_path, list(DAMAGE) + list(RANDOM_DAMAGE),
                           AssemblyOptions(on_damaged=on_damaged, workers=1), seeds=range(10))
    trials = sum(results.values())
    assert trials == 3 * len(DAMAGE) + 3 * 10 * len(RANDOM_DAMAGE)
    # the damage that changes HU or loses a slice is never "unaffected": it is refused or named
    assert results["refused"] + results["corrected"] >= 3 * 30, results
    print(f"{geometry} on_damaged={on_damaged}: {trials} trials: {dict(results)}")


def test_default_refuses_the_issue_findings_naming_file_and_tag(phantom_series, tmp_path):
    """The exact findings of issue 10: each is refused by default, naming the file and what is wrong."""
    expectations = {"slope_zero": "RescaleSlope is 0", "slope_nan": "RescaleSlope is not finite",
                    "slope_text": "RescaleSlope is not a number", "intercept_nan": "RescaleIntercept is not finite",
                    "slope_two": "must use one RescaleSlope/RescaleIntercept",
                    "bits_allocated_8": "BitsAllocated", "position_10m_sideways": "off the line",
                    "position_1000m_sideways": "off the line", "truncated_half": "truncated",
                    "rows_columns_65535": "Rows 65535"}
    files = sorted(phantom_series.glob("*.dcm"))
    for kind, fragment in expectations.items():
        for original in (files[len(files) // 2], files[-1]):
            folder = tmp_path / f"{kind}-{original.stem}"
            damaged = _trial_folder(phantom_series, folder, original)
            _apply(kind, damaged, 0)
            outcome = ingest_folder(folder, AssemblyOptions(workers=1))
            assert outcome.status == "refused", (kind, outcome.text)
            reason = [line for line in outcome.text.splitlines() if damaged.name in line]
            assert reason and any(fragment in line for line in reason), (kind, outcome.text)


def test_excluded_damaged_middle_slice_is_interpolated_and_named(phantom_series, tmp_path):
    files = sorted(phantom_series.glob("*.dcm"))
    damaged = _trial_folder(phantom_series, tmp_path / "t", files[7])
    _apply("truncated_half", damaged, 0)
    outcome = ingest_folder(tmp_path / "t", AssemblyOptions(on_damaged="exclude", workers=1))
    (volume, warnings), = outcome.volumes
    assert volume.array.shape == SHAPE  # the gap rules filled the one missing slice
    assert any(f"left out damaged file {damaged.name}" in w for w in warnings)
    assert any("1 missing slice(s) interpolated" in w for w in warnings)
    # an excluded last slice shortens the volume, and the warning says which file
    damaged = _trial_folder(phantom_series, tmp_path / "u", files[-1])
    _apply("truncated_half", damaged, 0)
    (volume, warnings), = ingest_folder(tmp_path / "u", AssemblyOptions(on_damaged="exclude", workers=1)).volumes
    assert volume.array.shape == SHAPE[:2] + (SHAPE[2] - 1,)
    assert any(f"left out damaged file {damaged.name}" in w for w in warnings)


def test_memory_budget_refuses_with_the_size_needed(tmp_path):
    write_phantom(tmp_path / "big", phantom_volume(shape=(256, 256, 14)))
    (decision,) = [d for d in select_series(scan_export(tmp_path / "big").series, SelectionRules()) if d.selected]
    # 14 slices of 256x256 int16 = 1.75 MB; with the resampled and the stored copy about 5 MB
    with pytest.raises(InputError, match=r"must fit the memory budget of 2 MB, got an estimated 5 MB \(14 slices "
                                         r"of 256x256 pixels"):
        assemble_series(decision.series, AssemblyOptions(memory_budget_mb=2, workers=1))
    assert assemble_series(decision.series, AssemblyOptions(memory_budget_mb=8, workers=1)).volume.array.shape == \
        (256, 256, 14)


STS_KINDS_FAST = ["slope_zero", "intercept_nan", "bits_allocated_8", "position_10m_sideways", "truncated_half",
                  "series_uid_changed", "random_header_bytes_4", "rows_columns_65535"]


@pytest.mark.shared_data
def test_real_series_campaign_subset(shared_data, tmp_path):
    results = run_campaign(shared_data / "sts_ct" / "STS_002" / "CT" / "image", tmp_path, STS_KINDS_FAST,
                           AssemblyOptions(workers=1), seeds=range(2))
    assert sum(results.values()) == 3 * (len(STS_KINDS_FAST) - 1) + 3 * 2
    print(f"sts_ct STS_002 subset: {dict(results)}")


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("on_damaged", ["refuse", "exclude"])
def test_real_series_campaign_every_kind(shared_data, tmp_path, on_damaged):
    results = run_campaign(shared_data / "sts_ct" / "STS_002" / "CT" / "image", tmp_path,
                           list(DAMAGE) + list(RANDOM_DAMAGE), AssemblyOptions(on_damaged=on_damaged, workers=1),
                           seeds=range(8))
    print(f"sts_ct STS_002 on_damaged={on_damaged}: {sum(results.values())} trials: {dict(results)}")


def test_duplicate_copy_is_unaffected_when_identical_and_refused_when_different(phantom_series, tmp_path):
    clean = ingest_folder(phantom_series, AssemblyOptions(workers=1))
    files = sorted(phantom_series.glob("*.dcm"))
    damaged = _trial_folder(phantom_series, tmp_path / "same", files[5])
    shutil.copyfile(damaged, damaged.with_name("copy_of_slice.dcm"))
    assert classify(clean, ingest_folder(tmp_path / "same", AssemblyOptions(workers=1)), "copy") == "unaffected"
    damaged = _trial_folder(phantom_series, tmp_path / "different", files[5])
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF  # one pixel of the copy differs: which of the two is right is unknown
    damaged.with_name("copy_of_slice.dcm").write_bytes(bytes(data))
    outcome = ingest_folder(tmp_path / "different", AssemblyOptions(workers=1))
    assert outcome.status == "refused" and "copy_of_slice.dcm" in outcome.text and "different content" in outcome.text


def test_key_image_saved_as_its_own_series_leaves_the_series_alone(phantom_series, tmp_path):
    """A copy of one slice saved as a new series (a PACS key image) is not a lost slice: unaffected."""
    clean = ingest_folder(phantom_series, AssemblyOptions(workers=1))
    files = sorted(phantom_series.glob("*.dcm"))
    _trial_folder(phantom_series, tmp_path / "t", files[0])
    key = pydicom.dcmread(files[6])
    key.SeriesInstanceUID, key.SOPInstanceUID = "1.2.3.4.5.6.9", "1.2.3.4.5.6.10"
    key.save_as(tmp_path / "t" / "key_image.dcm")
    assert classify(clean, ingest_folder(tmp_path / "t", AssemblyOptions(workers=1)), "key_image") == "unaffected"


def test_damaged_file_of_another_known_series_does_not_refuse_this_one(phantom_series, tmp_path):
    """A truncated file of another series in the same folder is that series' loss: this one is unaffected."""
    clean = ingest_folder(phantom_series, AssemblyOptions(workers=1))
    files = sorted(phantom_series.glob("*.dcm"))
    _trial_folder(phantom_series, tmp_path / "t", files[0])
    other = write_phantom(tmp_path / "other", phantom_volume(shape=(40, 36, 3)), series_uid="1.2.3.4.77",
                          series_number=9, file_prefix="OT")
    for path in other[:2]:
        shutil.copyfile(path, tmp_path / "t" / path.name)
    truncated = tmp_path / "t" / other[2].name
    truncated.write_bytes(other[2].read_bytes()[:-500])
    outcome = ingest_folder(tmp_path / "t", AssemblyOptions(workers=1))
    assert classify(clean, outcome, truncated.name) == "unaffected"
    assert any(line.startswith(f"{truncated.name}: truncated") for line in outcome.skipped)  # listed, with reason
