"""Options of the predict stage (``predict:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MemoryOptions:
    """Where the sliding-window outputs are stitched and in what precision (decided before a case starts)."""

    stitch: Literal["auto", "full", "streaming"] = field(default="auto", metadata={
        "help": "full: keep every class's summed probabilities for the whole volume (needed for probability "
                "maps); streaming: finish slabs along the slice axis as soon as no later window touches them "
                "and argmax them at once (same result, a fraction of the memory); auto: full when it fits the "
                "budget, else streaming."})
    accumulate: Literal["auto", "fp32", "fp16", "bf16"] = field(default="auto", metadata={
        "help": "Precision of the stitching buffer. auto: fp32 when it fits the budget, else fp16."})
    budget_gb: float | None = field(default=None, metadata={
        "help": "Memory the stitching may use (GB). null = 50% of available RAM on the CPU, or "
                "gpu_fraction of free GPU memory."})
    network_budget_gb: float | None = field(default=None, metadata={
        "help": "Memory the model's networks may need (GB): weights of every fold plus the activations of one "
                "window, estimated from model.json before any network is built; a model above it is refused. "
                "null = the available RAM (CPU) or the GPU's total memory."})
    gpu_fraction: float = field(default=0.8, metadata={
        "help": "Share of the free GPU memory (torch.cuda.mem_get_info) a case may plan to use; when the "
                "volume's outputs do not fit, windows run on the GPU and are stitched on the CPU."})


@dataclass
class PostprocessOptions:
    """Per-class clean-up of the label map on the source grid, by label name ('*' = every label)."""

    model_decision: Literal["auto", "none"] = field(default="auto", metadata={
        "help": "auto: apply the clean-up the model folder's postprocessing.json decided from the cross-validation "
                "(per class: keep the largest connected component, or remove components under N mL, only where "
                "that raised the class's mean validation Dice, as nnU-Net does); applied on the source grid with "
                "its voxel volume, and what was done is named in each case's provenance and the report. A label "
                "named in keep_largest_component or min_component_ml below gets those settings instead of the "
                "decision. A model folder without postprocessing.json gets no decided clean-up (said in "
                "provenance). none: only the settings below."})
    keep_largest_component: list[str] = field(default_factory=list, metadata={
        "help": "Labels of which only the largest connected component (26-connectivity) is kept, e.g. [liver]."})
    min_component_ml: list[str] = field(default_factory=list, metadata={
        "help": "'name=mL' entries: connected components smaller than mL are removed, e.g. ['*=0.5', 'spleen=5']."})
    fill_holes: list[str] = field(default_factory=list, metadata={
        "help": "Labels whose enclosed holes (background fully surrounded in 3D) are filled, e.g. [kidneys]."})


@dataclass
class OutputOptions:
    """Which files each case gets besides the label NIfTI."""

    seg_nrrd: bool = field(default=True, metadata={
        "help": "Write <case>.seg.nrrd, a 3D Slicer segmentation with segment names, colours and terminology."})
    seg_nrrd_closed_surface: bool = field(default=False, metadata={
        "help": "Ask 3D Slicer to build closed surfaces (3D views) when it loads the .seg.nrrd: adds 'Closed "
                "surface' to its contained representations (Slicer computes them on loading)."})
    dicom_seg: bool = field(default=False, metadata={
        "help": "Write <case>.seg.dcm (DICOM SEG, highdicom) referencing the source images; DICOM inputs "
                "whose volume maps one-to-one onto the source images only."})
    dicom_seg_type: Literal["binary", "labelmap"] = field(default="binary", metadata={
        "help": "binary: one bit frame per segment and image (read by every viewer); labelmap: one frame of "
                "segment numbers per image (DICOM LABELMAP SEG; much smaller for many classes, newer readers only)."})
    rtstruct: bool = field(default=True, metadata={
        "help": "Write <case>.rtstruct.dcm (DICOM RTSTRUCT for planning systems) for DICOM CT inputs whose volume "
                "maps one-to-one onto the source images; contours on voxel edges."})
    rtstruct_holes: Literal["keyhole", "separate"] = field(default="keyhole", metadata={
        "help": "How RTSTRUCT contours draw holes: keyhole (each hole joined to its region by a zero-width "
                "channel along a voxel edge; read the same by every system, PS3.3 C.8.8.6.3) or separate (a hole "
                "is its own contour inside the outer one, for systems that combine nested contours by XOR)."})
    probabilities: Literal["none", "nifti", "npz"] = field(default="none", metadata={
        "help": "Also write the class probabilities: a 4D NIfTI (x, y, z, class; uint8 scaled by 1/255, as NIfTI "
                "has no float16) or a compressed .npz (float16, with the affine and class names)."})
    probabilities_grid: Literal["model", "source"] = field(default="model", metadata={
        "help": "Grid of the probability maps: model (as computed, its own affine; cheap) or source "
                "(linearly resampled onto the image grid; costs time and memory)."})
    thumbnails: bool = field(default=True, metadata={
        "help": "Write <case>.thumb.png (axial, coronal, sagittal overlays) for the morning report."})
    compresslevel: int = field(default=1, metadata={"help": "gzip level of .nii.gz and .seg.nrrd (1 fast, 9 small)."})


@dataclass
class ReportOptions:
    """What the morning report flags."""

    volume_range_ml: list[str] = field(default_factory=list, metadata={
        "help": "'name=min:max' plausible volumes in mL per label, e.g. ['liver=800:3500', 'spleen=50:1500']."})
    default_volume_range_ml: list[float] = field(default_factory=lambda: [0.1, 20000.0], metadata={
        "help": "Plausible [min, max] volume in mL for labels without their own range (a deliberately broad "
                "default). A present label outside it is flagged."})
    warn_border: bool = field(default=True, metadata={
        "help": "Flag labels that touch the image border (the organ may be cut off by the field of view)."})


@dataclass
class TrustOptions:
    """Plausibility flags and the per-case confidence of the morning report (pipeline/predict/trust.py)."""

    enabled: bool = field(default=True, metadata={
        "help": "Check every case against the model folder's training_fingerprint.json and rank the morning "
                "report by confidence, least trustworthy first."})
    volume_margin: float = field(default=2.0, metadata={
        "help": "A label volume below the smallest training volume / margin, or above the largest x margin, "
                "is flagged."})
    component_min_fraction: float = field(default=0.1, metadata={
        "help": "Predicted components smaller than this fraction of the label's smallest training volume are "
                "not counted against the training's component counts (specks are not a second organ)."})
    input_margin: float = field(default=2.0, metadata={
        "help": "A spacing or image extent (per axis) below the training minimum / margin, or above the "
                "maximum x margin, is flagged as an unfamiliar input."})
    hu_distance_floor_hu: float = field(default=10.0, metadata={
        "help": "Smallest Wasserstein distance (HU) between the case's body HU histogram and the most similar "
                "training case's that is flagged as an unfamiliar input."})
    hu_spread_factor: float = field(default=2.0, metadata={
        "help": "The HU flag's limit is max(hu_distance_floor_hu, factor x the training set's spread: the largest "
                "distance of a training case to its most similar other training case)."})
    review_below: float = field(default=0.5, metadata={
        "help": "A case whose confidence is below this needs review even without a flag."})


@dataclass
class PredictConfig:
    """Inference and output settings."""

    overlap: float = field(default=0.5, metadata={"help": "Sliding-window overlap between patches (0-1)."})
    batch_size: int = field(default=4, metadata={"help": "3D patches per forward pass."})
    batch_size_2d: int = field(default=16, metadata={"help": "Slices (2D patches) per forward pass of a 2D model."})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "Autocast precision of the network pass (pipeline/precision.py; the choice and its reason go into "
                "report.json and each provenance). auto = fp32 on every device: measured against fp32 on a CPU "
                "with native bf16, bf16 labels agreed to a per-class Dice of 0.9977-0.9993 on the demo model but "
                "only 0.857 on one of 4 held-out CTs of an sts_ct GTV model (pooled 0.9969; 0.05% of voxels "
                "changed), below the 0.995 that auto requires (bench/README.md, Precision). bf16 is opt-in: "
                "0.8-1.4x the speed of fp32 for the demo network, 1.6-2.5x for a spleen-size UNet at 96^3, on "
                "CPUs with AVX512-BF16/AMX and GPUs of compute capability >= 8 (emulated, many times slower, "
                "elsewhere). fp16 is opt-in too (demo model agreement 0.9996; emulated on the CPU)."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto uses CUDA when present, else the CPU."})
    optimize_network: bool = field(default=True, metadata={
        "help": "Fold batch norms into convolutions, use a channels-last layout and a faster instance norm on "
                "the CPU; checked against the unmodified network at load time and skipped if they disagree."})
    folds: list[int] | None = field(default=None, metadata={
        "help": "Folds of the model folder to ensemble (e.g. [0] for one fold's network); null = every fold."})
    tta: bool = field(default=False, metadata={
        "help": "Mirroring test-time augmentation: average the predictions over all combinations of flips "
                "along tta_axes (2^n forward passes per patch)."})
    tta_axes: list[str] = field(default_factory=lambda: ["AP", "SI"], metadata={
        "help": "Axes of the model grid mirrored by TTA: any of LR, AP, SI. LR is left out by default: a model "
                "trained without left-right flips (as for lateralised labels) gets worse when mirrored over it."})
    reassembly: Literal["auto", "refined", "nearest"] = field(default="auto", metadata={
        "help": "How labels get back to the source grid. nearest: argmax on the model grid, then nearest "
                "neighbour (cheapest; boundaries move by up to half a model voxel). refined: the labels that "
                "resampling every class's probabilities linearly to the source grid and taking the argmax would "
                "give (MONAI Invertd style), interpolating only in cells that straddle a boundary; needs the "
                "whole volume's probabilities in memory. auto: refined when they fit the memory budget."})
    refuse_implausible: bool = field(default=True, metadata={
        "help": "Fail a case whose image does not look like CT in HU (e.g. 8-bit display values, MR), holds NaN "
                "or infinite voxels, has non-orthonormal direction cosines (a sheared grid), or is too short for "
                "the model (min_slices, min_patch_coverage), instead of segmenting it with the problem named in "
                "its warnings."})
    min_slices: int = field(default=3, metadata={
        "help": "A case with fewer slices is implausible (see refuse_implausible)."})
    max_extent_mm: float = field(default=2000.0, metadata={
        "help": "A case whose field of view exceeds this along any axis is implausible (a spacing in the wrong "
                "unit, a damaged header): no CT scans a body 2 m wide or long."})
    min_patch_coverage: float = field(default=0.25, metadata={
        "help": "3D models: a case shorter along the body axis than this share of the model's patch extent "
                "(patch slices x target spacing) is implausible: the network would see mostly padding."})
    full_paths: bool = field(default=False, metadata={
        "help": "Name inputs by their full paths in the ledger, reports, provenance and logs. Off by default: "
                "export folders are often named after the patient, so full paths go only to the owner-only "
                "private/inputs.json and everything else uses case ids and file names relative to the case's "
                "folder."})
    shard_by: Literal["index", "hash"] = field(default="index", metadata={
        "help": "How --shard i/n splits the sorted cases: index (case k goes to shard k mod n; balanced, every "
                "shard must see the same inputs) or hash (by case id; stable when inputs are added)."})
    stale_minutes: float = field(default=30.0, metadata={
        "help": "A case claimed by a process on another machine that has not reported a heartbeat for this long "
                "is stale: a run with --take-stale or --retry-failed takes it over (on this machine a dead process "
                "is detected at once)."})
    ledger_mode: Literal["auto", "local", "shared"] = field(default="auto", metadata={
        "help": "local: one ledger.sqlite in WAL mode, for processes on one host. shared: one ledger file per "
                "host and shard under ledger/ plus claim files, for hosts sharing a network folder (SQLite's WAL "
                "does not work over NFS/SMB). auto: shared when the output folder is on a network file system "
                "(/proc/mounts: nfs, cifs, lustre, gpfs, beegfs, fuse.*, ...)."})
    take_stale: bool = field(default=False, metadata={
        "help": "Take over cases whose claim from another host went stale (no heartbeat for stale_minutes), e.g. "
                "after a node died mid-case. Also done by --retry-failed; the CLI flag is --take-stale."})
    host_name: str = field(default="", metadata={
        "help": "This machine's name in the ledger and claim files (default: the host name). Set it when "
                "several nodes report the same host name, e.g. containers."})
    send_to: list[str] = field(default_factory=list, metadata={
        "help": "Peers of pacs.peers (by name) that each finished case's DICOM results (SEG, RTSTRUCT) are sent "
                "to, by C-STORE or STOW-RS; a failed send leaves the case done and is retried by 'ctseg send'."})
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    outputs: OutputOptions = field(default_factory=OutputOptions)
    report: ReportOptions = field(default_factory=ReportOptions)
    trust: TrustOptions = field(default_factory=TrustOptions)
