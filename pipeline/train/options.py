"""Options of the train stage (``train:`` in the config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AugmentConfig:
    """Random augmentation of training patches (MONAI dictionary transforms on cached arrays)."""

    enabled: bool = field(default=True, metadata={"help": "Apply the augmentations below at all."})
    flip_axes: list[int] = field(default_factory=lambda: [1, 2], metadata={
        "help": "Model-grid axes (0 = R-L, 1 = A-P, 2 = S-I) that may be mirrored, each with flip_prob. The "
                "R-L axis 0 is left out by default: CT labels are often side-specific (liver on the patient's "
                "right, spleen on the left), and a left-right mirror would teach the network that either side "
                "is plausible. Add 0 only for side-symmetric tasks (e.g. 'kidneys' as one class). In 2d mode "
                "axis 2 is the slice axis and is ignored."})
    flip_prob: float = field(default=0.5, metadata={"help": "Probability of mirroring along each flip axis."})
    affine_prob: float = field(default=0.2, metadata={"help": "Probability of a random rotation and zoom."})
    rotate_degrees: float = field(default=15.0, metadata={
        "help": "Largest random rotation (degrees) about each axis (3d) or in-plane (2d)."})
    scale_range: float = field(default=0.15, metadata={"help": "Random zoom of ± this fraction."})
    intensity_shift: float = field(default=0.03, metadata={
        "help": "Largest random intensity offset (network input units), applied with prob 0.5. Keep it small "
                "for CT: with the default window 0.03 is 15 HU, and organs can differ by only 40 HU."})
    noise_std: float = field(default=0.03, metadata={
        "help": "Standard deviation of Gaussian noise (network input units), applied with prob 0.2."})


@dataclass
class TrainConfig:
    """Network, sampling and optimisation settings."""

    mode: Literal["3d", "2d"] = field(default="3d", metadata={
        "help": "3d: train on 3D patches; 2d: train slice-wise on axial slices of the cached 3D volumes."})
    context_slices: int = field(default=0, metadata={
        "help": "2d mode: neighbouring slices on each side given as extra input channels (2.5D); the "
                "network sees 2n+1 channels. Slices beyond the volume repeat its edge slice."})
    network: Literal["UNet", "DynUNet", "SegResNet", "ClassicUNet"] = field(default="UNet", metadata={
        "help": "Network architecture (MONAI UNet/DynUNet/SegResNet, or the paper U-Net with 'same' padding)."})
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata={
        "help": "Feature widths per resolution level (SegResNet uses only the first and doubles it per level)."})
    norm: Literal["instance", "batch"] = field(default="instance", metadata={"help": "Normalisation layers."})
    num_res_units: int = field(default=2, metadata={
        "help": "UNet: residual units per level; DynUNet: > 0 uses residual blocks."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability inside the network."})
    deep_supervision: bool = field(default=True, metadata={
        "help": "DynUNet: add loss terms on lower-resolution heads (weights halve per level)."})
    patch_size: list[int] | None = field(default=None, metadata={
        "help": "Patch size in voxels (3 values for 3d, 2 for 2d). null = planned to fit the memory budget "
                "(plan.json). Smaller images are padded up to it."})
    batch_size: int | None = field(default=None, metadata={
        "help": "Patches per optimisation step (per process under torchrun). null = planned (plan.json)."})
    foreground_ratio: float = field(default=0.5, metadata={
        "help": "Share of patches centred on a labelled voxel, the class drawn uniformly so that small organs "
                "are seen as often as large ones (the rest are centred anywhere in the cropped volume)."})
    batch_dice: bool = field(default=False, metadata={
        "help": "Dice term of the DiceCE loss computed over the whole batch instead of per patch (nnU-Net's "
                "batch Dice): a patch without foreground then no longer contributes a Dice of its own that only "
                "an empty prediction satisfies. Measured on sts_ct in bench/README.md."})
    dice_include_background: bool = field(default=True, metadata={
        "help": "Include the background class in the Dice term (the cross-entropy term always includes it). "
                "nnU-Net leaves it out."})
    max_steps: int | Literal["auto"] = field(default="auto", metadata={
        "help": "Optimisation steps per fold. auto = as many as fit train.time_budget_minutes on this machine: a "
                "short warm-up measures the step rate of the planned network, patch and batch (and one validation), "
                "and the count is fixed in step_plan.json and model.json, so that a rerun trains the same number "
                "(pipeline/train/budget.py)."})
    time_budget_minutes: float = field(default=60.0, metadata={
        "help": "With max_steps auto: training minutes PER FOLD, validations included, the warm-up not (a 5-fold "
                "cross-validation takes about 5x this). On a GPU the same budget gives many more steps."})
    val_every: int | Literal["auto"] = field(default="auto", metadata={
        "help": "Validate (sliding window over whole validation volumes) and save checkpoint_last every N steps; "
                "auto = 10 validations per fold."})
    checkpoint_minutes: float = field(default=10.0, metadata={
        "help": "Also save checkpoint_last.pt every this many minutes of training (besides every validation), so "
                "that a crash or a killed job loses at most this much; 0 = only at validations. Not part of the "
                "stage hash."})
    val_overlap: float = field(default=0.25, metadata={"help": "Sliding-window overlap during validation."})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={
        "help": "adamw, or sgd with Nesterov momentum 0.99 (nnU-Net's choice)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=1e-5, metadata={"help": "Weight decay."})
    schedule: Literal["poly", "cosine", "constant"] = field(default="poly", metadata={
        "help": "Learning-rate schedule over max_steps: poly (1 - t)^0.9, cosine, or constant."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps."})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "Autocast precision of training (pipeline/precision.py; the choice and its reason go into "
                "report.json and model.json). auto: bf16 on CPUs with native bf16 (AVX512-BF16/AMX; measured "
                "1.25x the steps/s of fp32 at the same Dice, bench/README.md) and on CUDA GPUs with native bf16 "
                "(compute capability >= 8), fp16 with a GradScaler on older GPUs (V100, T4), otherwise fp32 "
                "(bf16 is emulated, so slower, on other CPUs). fp16 is refused on the CPU."})
    channels_last: bool | None = field(default=None, metadata={
        "help": "Channels-last memory layout. null = per device: on the CPU (several times faster 3D convolutions "
                "there), not on CUDA (InstanceNorm copies a channels-last tensor to contiguous at every layer, "
                "pytorch/pytorch#59168). Not part of the stage hash."})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the network for the training steps: 1.1-1.2x the steps per second of a 3D UNet at "
                "96^3 on a 2-core CPU (bench/README.md), after a compilation of about a minute the first time "
                "(needs a C++ compiler on CPU). Worth it for long runs; validation and checkpoints use the plain "
                "network."})
    folds: int = field(default=1, metadata={
        "help": "1 = a single train/validation split (validation_fraction); k > 1 = k-fold cross-validation."})
    train_folds: list[int] | None = field(default=None, metadata={
        "help": "Train only these folds (0-based) in this invocation; null = all. Folds finished earlier with the "
                "same settings are kept, so a cross-validation can run in parts; the model folder lists every "
                "finished fold, and the stage counts as done when all folds are. Not part of the stage hash."})
    validation_fraction: float = field(default=0.2, metadata={"help": "Share of cases held out when folds = 1."})
    deterministic: bool = field(default=False, metadata={
        "help": "Seeded, deterministic algorithms (monai set_determinism, torch.use_deterministic_algorithms): "
                "on the CPU the same config gives bit-identical weights; can be slower. On CUDA a few kernels "
                "(DiceCE's NLL loss, interpolate and MaxPool3d backward) have no deterministic version: each one "
                "used is logged and listed in the fold's nondeterministic_ops, and repeats can differ slightly."})
    steps_per_run: int | None = field(default=None, metadata={
        "help": "Stop after this many steps in one invocation (the schedule still spans max_steps); "
                "'ctseg train --resume' continues. For training in time slots. Not part of the stage hash."})
    loader_workers: int | None = field(default=None, metadata={
        "help": "DataLoader worker processes preparing patches. null = 0 on the CPU (extra workers compete with "
                "the training threads there) and a few on CUDA (up to 8, leaving two cores per rank), with pinned "
                "memory so that the copies to the GPU overlap the step. Not part of the stage hash."})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads; null = torch's default (all cores), or under torchrun the cores divided by "
                "the processes per node (torchrun itself sets one thread). Not part of the stage hash."})
    ddp_timeout_minutes: int = field(default=60, metadata={
        "help": "Under torchrun: how long a rank waits at a collective (e.g. for the others' validation) before "
                "the run stops with a timeout error. Not part of the stage hash."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto uses CUDA when present, else the CPU."})
    augment: AugmentConfig = field(default_factory=AugmentConfig)
