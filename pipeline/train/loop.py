"""Training one fold: optimiser, schedule, mixed precision, validation, checkpoints and exact resume.

``checkpoint_last.pt`` holds the full state (network, optimiser, scheduler, grad scaler, step,
python/numpy/torch RNG states and the curve history) and is written at every validation, every
``train.checkpoint_minutes`` of training and when a run stops early; ``checkpoint_best.pt`` the same
at the best validation. Both load with
``torch.load(weights_only=True)``. Because training patches are a function of the step (see
:mod:`pipeline.train.data`), a resumed run continues with exactly the batches, random states and
optimiser moments of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import atomic
from pipeline.errors import ConfigError, CtsegError, InputError
from pipeline.evaluate.metrics import dice_per_class
from pipeline.models import build_network
from pipeline.precision import Precision
from pipeline.predict.inference import WindowPredictor, sliding_window_predict
from pipeline.predict.model import Predictor
from pipeline.predict.options import PredictConfig
from pipeline.train.budget import resolved_options
from pipeline.train.data import CaseArrays, PatchDataset, SamplingSpec, batches, derived_seed
from pipeline.train.options import TrainConfig
from pipeline.train.progress import History, Scalars, mean_dice, plot_progress
from pipeline.train.runtime import Runtime, rng_state, seed_everything, set_rng_state

log = logging.getLogger("ctseg")

CHECKPOINT_FORMAT = "ctseg-checkpoint/1"
CUDA_LOSS_SYNC_STEPS = 20  # on CUDA the loss is copied to the host (a sync) once per this many steps


@dataclass
class FoldJob:
    """Everything one fold's training needs."""

    fold: int
    folder: Path
    options: TrainConfig
    seed: int
    stage_hash: str
    network_spec: dict
    sampling: SamplingSpec
    batch_size: int
    class_names: list[str]
    train_cases: list[CaseArrays]
    val_cases: list[tuple[str, np.ndarray, np.ndarray]]  # (id, image, label) unpadded
    resume: bool
    intensity: dict | None = None  # the plan's intensity mapping: validation pads with air as predict does


def lr_factor(step: int, options: TrainConfig) -> float:
    """Learning-rate multiplier after ``step`` completed steps."""
    if options.warmup_steps and step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    t = min(1.0, step / max(1, options.max_steps))
    if options.schedule == "poly":
        return (1.0 - t) ** 0.9
    if options.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def make_optimizer(network: torch.nn.Module, options: TrainConfig) -> torch.optim.Optimizer:
    if options.optimizer == "sgd":
        return torch.optim.SGD(network.parameters(), lr=options.learning_rate, momentum=0.99, nesterov=True,
                               weight_decay=options.weight_decay)
    return torch.optim.AdamW(network.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)


def make_loss(spatial_dims: int, options: TrainConfig):
    """DiceCE on softmax outputs (Dice per patch or over the batch, with or without the background class, as
    ``options`` say); a deep-supervision stack ``[B, heads, C, ...]`` is weighted 1, ½, ¼, …"""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=options.batch_dice,
                         include_background=options.dice_include_background)
    deep = DeepSupervisionLoss(dice_ce, weight_mode="exp")

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        output = output.float()
        if output.dim() == spatial_dims + 3:  # DynUNet in training mode stacks its heads in dim 1
            return deep(list(torch.unbind(output, dim=1)), target)
        return dice_ce(output, target)
    return loss


def channels_last_crashes(spec: dict, device: torch.device) -> bool:
    """True for the one case where channels-last training crashes: the backward pass of a 2D DynUNet
    with residual blocks segfaults on the CPU (torch 2.13; its forward pass is fine)."""
    return (device.type == "cpu" and spec["name"] == "DynUNet" and int(spec["spatial_dims"]) == 2
            and bool(spec.get("kwargs", {}).get("res_block")))


def weights_checksum(network: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save(path: Path, data) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save(data, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors have many types
        raise InputError(f"{path} must be a ctseg checkpoint, got a load error ({type(exc).__name__}: {exc}). "
                         f"Delete it to start the fold over.") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} must be a {CHECKPOINT_FORMAT} checkpoint. Delete it to start the fold over.")
    return state


class LossLog:
    """Training losses kept on the device and copied to the host every ``every`` steps, in one sync.

    Each host copy waits for the GPU to finish the queued steps; per step that would stall the queue
    twice (the finiteness check and the value). A non-finite loss is still refused, naming its step,
    at the next copy: before any validation or checkpoint (the loop flushes first).
    """

    def __init__(self, every: int, fold: int):
        self.every = max(1, int(every))
        self.fold = fold
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor) -> list[tuple[int, float]]:
        self.pending.append((step, loss.detach()))
        return self.flush() if len(self.pending) >= self.every else []

    def flush(self) -> list[tuple[int, float]]:
        if not self.pending:
            return []
        steps = [step for step, _ in self.pending]
        values = torch.stack([loss.float() for _, loss in self.pending]).tolist()
        self.pending = []
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise CtsegError(f"training loss must stay finite, got {value} at step {step} of fold {self.fold}. "
                                 f"Lower train.learning_rate, or use train.precision=fp32.")
        return list(zip(steps, values))


@dataclass
class ValidationWindow:
    """The predict stage's sliding window (:mod:`pipeline.predict.inference`) over the network being trained.

    Same window placement, Gaussian blending, 2D/2.5D slices and memory plan as ``ctseg predict``, in the
    training run's precision and memory layout, without test-time augmentation.
    """

    predictor: Predictor
    window: WindowPredictor
    options: PredictConfig

    @classmethod
    def for_job(cls, network: torch.nn.Module, job: FoldJob, runtime: Runtime, channels_last: bool) -> ValidationWindow:
        spec = {"mode": job.sampling.mode, "patch_size": list(job.sampling.patch_size),
                "context_slices": job.sampling.context_slices, "network": job.network_spec,
                "plan": {"intensity": job.intensity} if job.intensity else {}}
        num_classes = len(job.class_names) + 1
        predictor = Predictor(folder=job.folder, spec=spec, spec_sha256=job.stage_hash, networks=[network],
                              class_values=list(range(num_classes)), labels=[], device=runtime.device,
                              optimisation={"layout": "channels_last"} if channels_last else {})
        precision = Precision(requested=job.options.precision, name=runtime.precision,
                              device_type=runtime.device.type, stage="train", reason=runtime.precision_reason)
        options = PredictConfig(overlap=job.options.val_overlap, batch_size=job.batch_size,
                                batch_size_2d=job.batch_size, tta=False)
        return cls(predictor, WindowPredictor(predictor, precision), options)

    def labels(self, image: np.ndarray) -> np.ndarray:
        """Channel index of the winning class for every voxel of ``image`` (model grid, network input scale)."""
        return sliding_window_predict(image, self.predictor, self.options, window_predictor=self.window).classes


class FoldTrainer:
    """Trains one fold on this process (one rank under torchrun)."""

    def __init__(self, job: FoldJob, runtime: Runtime):
        self.job = job
        self.runtime = runtime
        if job.options.max_steps == "auto":
            raise ValueError("FoldJob options need max_steps as a number, got 'auto': plan it first "
                             "(pipeline.train.budget, as the train stage does)")
        job.options = options = resolved_options(job.options, None)  # val_every auto: 10 validations
        seed_everything(derived_seed(job.seed, "init", job.fold), options.deterministic)
        self.dims = job.sampling.spatial_dims
        self.memory_format = runtime.memory_format(self.dims)
        if channels_last_crashes(job.network_spec, runtime.device):
            self.memory_format = torch.contiguous_format
        self.network = build_network(job.network_spec).to(runtime.device, memory_format=self.memory_format)
        self.model = self.network
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # the wrapper broadcasts rank 0's initial weights, so every rank starts identical
            self.model = DistributedDataParallel(self.network, device_ids=ids)
        if options.compile:
            # the compiled module shares the network's parameters: checkpoints and validation use the network
            self.model = torch.compile(self.model)
        self.optimizer = make_optimizer(self.network, options)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, options))
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
        self.loss = make_loss(self.dims, options)
        self.history = History()
        self.step = 0
        self.best_val_cases: dict = {}
        self.nondeterministic_ops: list[str] = []
        self.validated_here: list[str] = []  # this rank's share of the validation cases (all without torchrun)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "stage_hash": self.job.stage_hash, "fold": self.job.fold,
                "step": self.step, "max_steps": self.job.options.max_steps, "network_spec": self.job.network_spec,
                "model": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.runtime.device), "history": self.history.to_json(),
                "best_val_cases": self.best_val_cases}

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state.get("stage_hash") != self.job.stage_hash or state.get("fold") != self.job.fold:
            raise ConfigError(f"--resume must continue a checkpoint of the same configuration, got {path} from a "
                              f"different train config, seed or preprocessing. Run without --resume to start over "
                              f"(or with --force to clear the old run).")
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.runtime.device)
        self.history = History.from_json(state["history"])
        self.best_val_cases = state.get("best_val_cases", {})
        self.step = int(state["step"])

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> tuple[list[float], dict]:
        """Mean Dice per class over the validation cases, and each case's Dice.

        Under torchrun every rank validates its share of the cases (every world_size-th one) and the
        shares are gathered, so no rank waits at a collective for the whole validation set.
        """
        job, runtime = self.job, self.runtime
        self.network.eval()
        mine = job.val_cases[runtime.rank::runtime.world_size] if runtime.distributed else job.val_cases
        self.validated_here = [case_id for case_id, _, _ in mine]
        per_case = {}
        window = ValidationWindow.for_job(self.network, job, runtime,
                                          channels_last=self.memory_format != torch.contiguous_format)
        for case_id, image, label in mine:
            per_case[case_id] = dice_per_class(window.labels(image), label, len(job.class_names) + 1)
        self.network.train()
        if runtime.distributed:
            shares: list = [None] * runtime.world_size
            torch.distributed.all_gather_object(shares, per_case)
            merged = {case_id: scores for share in shares for case_id, scores in share.items()}
            per_case = {case_id: merged[case_id] for case_id, _, _ in job.val_cases}  # the single-process order
        table = np.array(list(per_case.values()), dtype=np.float64)
        with np.errstate(all="ignore"):
            means = [float(np.nanmean(column)) if np.isfinite(column).any() else float("nan") for column in table.T]
        return means, per_case

    @contextlib.contextmanager
    def surface_nondeterminism(self, active: bool):
        """In deterministic mode, log (once each, on the ctseg logger) torch's warnings about kernels without a
        deterministic version: the CLI routes library warnings to a logger that shows them only with --debug."""
        if not (active and self.job.options.deterministic):
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            text = str(warning.message)
            if "deterministic" not in text:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
                continue
            operation = text.split(" does not have a deterministic implementation")[0].strip()[:120]
            if operation not in self.nondeterministic_ops:
                self.nondeterministic_ops.append(operation)
                log.warning("train: train.deterministic=true, but %s has no deterministic kernel on %s: runs with "
                            "the same seed can differ (exact repeats hold on the CPU)", operation,
                            self.runtime.device.type)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        job, options, runtime = self.job, self.job.options, self.runtime
        folder = job.folder
        last = folder / "checkpoint_last.pt"
        if job.resume and last.is_file():
            self.restore(last)
            log.info("train fold %d: resumed at step %d from %s", job.fold, self.step, last)
        elif job.resume:
            log.info("train fold %d: no checkpoint to resume, starting at step 0", job.fold)
        start = self.step
        stop = options.max_steps if not options.steps_per_run else min(options.max_steps,
                                                                        start + options.steps_per_run)
        scalars = Scalars(folder / "tensorboard", enabled=runtime.is_main, resume_step=start)
        dataset = PatchDataset(job.train_cases, job.sampling, options, job.seed, job.fold, runtime.rank)
        bar = _progress_bar(runtime.is_main, options.max_steps, start, f"fold {job.fold}")
        losses = LossLog(1 if runtime.device.type == "cpu" else CUDA_LOSS_SYNC_STEPS, job.fold)

        def record(flushed: list[tuple[int, float]]) -> None:
            for done, value in flushed:
                point = self.history.add_loss(done, value)
                scalars.add("train/loss", value, done)
                if point is not None and bar is not None:
                    bar.set_postfix(loss=f"{point:.3f}", best_dice=f"{max(self.history.best_score, 0):.3f}")

        self.network.train()
        began = time.perf_counter()
        cpu_began = time.process_time()
        # on CUDA "compute" is the time to queue a step; the GPU's own time shows up where the host waits
        timing = {"data": 0.0, "compute": 0.0, "validation": 0.0}
        interval = float(options.checkpoint_minutes) * 60.0
        saved = time.monotonic()
        mark = time.perf_counter()
        first_validation = True
        for step, images, labels in batches(dataset, start + 1, stop, job.batch_size, runtime.loader_workers,
                                            pin_memory=runtime.pin_memory):
            timing["data"] += time.perf_counter() - mark
            mark = time.perf_counter()
            with self.surface_nondeterminism(step == start + 1):
                loss = self.train_step(images, labels)
            timing["compute"] += time.perf_counter() - mark
            self.step = step
            record(losses.add(step, loss))
            scalars.add("train/lr", self.optimizer.param_groups[0]["lr"], step)
            if step % options.val_every == 0 or step == options.max_steps:
                record(losses.flush())
                mark = time.perf_counter()
                with self.surface_nondeterminism(first_validation):
                    self.validate_and_save(scalars)
                first_validation = False
                timing["validation"] += time.perf_counter() - mark
                saved = time.monotonic()
            elif interval and time.monotonic() - saved >= interval:
                if runtime.is_main:
                    _save(last, self.state())  # a crash now loses at most checkpoint_minutes of training
                saved = time.monotonic()
            if bar is not None:
                bar.update(1)
            mark = time.perf_counter()
        record(losses.flush())
        seconds = time.perf_counter() - began
        if runtime.distributed:
            # DDP keeps parameters identical; batch-norm running statistics are updated per rank after
            # each forward pass, so make rank 0's the common ones (as DDP does before each forward)
            for buffer in self.network.buffers():
                torch.distributed.broadcast(buffer, src=0)
        if bar is not None:
            bar.close()
        if self.step < options.max_steps and runtime.is_main and self.step > start:
            _save(last, self.state())  # stopped by steps_per_run: keep the exact state for --resume
        scalars.close()
        steps_done = self.step - start
        return {"fold": job.fold, "step": self.step, "complete": self.step >= options.max_steps,
                "steps_this_run": steps_done, "seconds": round(seconds, 2),
                "seconds_by_part": {k: round(v, 2) for k, v in timing.items()},
                "cpu_seconds": round(time.process_time() - cpu_began, 2),
                "steps_per_second": round(steps_done / seconds, 3) if seconds > 0 and steps_done else None,
                "best_step": self.history.best_step, "best_mean_dice": round(self.history.best_score, 5),
                "best_dice": dict(zip(job.class_names, self.history.val_dice[self.history.val_steps.index(
                    self.history.best_step)])) if self.history.best_step in self.history.val_steps else {},
                "final_loss": self.history.loss_values[-1] if self.history.loss_values else None,
                "val_cases": self.best_val_cases, "weights_sha256": weights_checksum(self.network),
                "nondeterministic_ops": self.nondeterministic_ops, "validated_on_this_rank": self.validated_here}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        images = images.to(runtime.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(runtime.device, non_blocking=True).long()
        self.optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            try:
                output = self.model(images)
            except Exception as exc:
                if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise
                raise ConfigError(f"train.compile needs torch.compile to work on this machine, got "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}. Set train.compile=false "
                                  f"(on CPU it also needs a C++ compiler such as gcc).") from exc
        loss = self.loss(output, labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()  # a device tensor: the host reads it in LossLog, not every step

    def validate_and_save(self, scalars: Scalars) -> None:
        job, runtime = self.job, self.runtime
        dice, per_case = self.validate()  # every rank: its share of the cases, gathered
        if runtime.is_main:
            is_best = self.history.add_validation(self.step, dice)
            for name, value in zip(job.class_names, dice):
                scalars.add(f"val/dice_{name}", value, self.step)
            scalars.add("val/mean_dice", mean_dice(dice), self.step)
            log.info("train fold %d step %d: validation Dice %s (mean %.4f)", job.fold, self.step,
                     ", ".join(f"{n} {d:.3f}" for n, d in zip(job.class_names, dice)), mean_dice(dice))
            if is_best:
                self.best_val_cases = {case: dict(zip(job.class_names, scores)) for case, scores in per_case.items()}
                state = self.state()
                _save(job.folder / "checkpoint_best.pt", state)
                _save(job.folder / "model_best.pt", state["model"])
            _save(job.folder / "checkpoint_last.pt", self.state())
            plot_progress(self.history, job.class_names, job.folder / "progress.png", f"fold {job.fold}")
        if runtime.distributed:
            torch.distributed.barrier()


def _progress_bar(enabled: bool, total: int, initial: int, description: str):
    """The fold's step counter (pipeline.progress): validation lines print above the bar, not into it."""
    if not enabled:
        return None
    from pipeline.progress import Progress

    return Progress(total, f"train {description}", unit="step", initial=initial)
