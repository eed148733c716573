"""Training curves: the history kept in checkpoints, TensorBoard scalars and ``progress.png``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import atomic

LOSS_EVERY = 10  # steps averaged into one point of the loss curve


@dataclass
class History:
    """Loss points and validation results of one fold (plain data: stored in every checkpoint)."""

    loss_steps: list[int] = field(default_factory=list)
    loss_values: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_dice: list[list[float]] = field(default_factory=list)  # per validation: Dice per class
    best_step: int = 0
    best_score: float = -1.0
    pending: list[float] = field(default_factory=list)

    def add_loss(self, step: int, value: float) -> float | None:
        """Record a step's loss; returns the mean of the last LOSS_EVERY steps when a point is complete."""
        self.pending.append(float(value))
        if len(self.pending) < LOSS_EVERY:
            return None
        mean = sum(self.pending) / len(self.pending)
        self.loss_steps.append(step)
        self.loss_values.append(mean)
        self.pending = []
        return mean

    def add_validation(self, step: int, dice: list[float]) -> bool:
        """Record a validation; True when its mean foreground Dice is the best so far."""
        self.val_steps.append(step)
        self.val_dice.append([float(d) for d in dice])
        score = mean_dice(dice)
        if score > self.best_score:
            self.best_score, self.best_step = score, step
            return True
        return False

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> History:
        return cls(**data)


def mean_dice(dice: list[float]) -> float:
    values = [d for d in dice if not math.isnan(d)]
    return sum(values) / len(values) if values else 0.0


class Scalars:
    """TensorBoard scalars of one fold, written only by the main process."""

    def __init__(self, folder: Path, enabled: bool, resume_step: int = 0):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events an interrupted run logged after its last checkpoint
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else None)

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and not math.isnan(value):
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def plot_progress(history: History, class_names: list[str], path: Path, title: str) -> None:
    """Write the loss and Dice curves to ``path`` (PNG, atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(history.loss_steps, history.loss_values, color="tab:blue")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel(f"training loss (mean of {LOSS_EVERY} steps)")
    loss_ax.set_title("Dice + cross-entropy loss")
    loss_ax.grid(alpha=0.3)
    for index, name in enumerate(class_names):
        dice_ax.plot(history.val_steps, [d[index] for d in history.val_dice], marker="o", label=name)
    if history.val_steps:
        dice_ax.plot(history.val_steps, [mean_dice(d) for d in history.val_dice], "k--", label="mean")
    dice_ax.set_ylim(0, 1)
    dice_ax.set_xlabel("step")
    dice_ax.set_ylabel("validation Dice")
    dice_ax.set_title(f"best mean {history.best_score:.3f} at step {history.best_step}")
    dice_ax.grid(alpha=0.3)
    dice_ax.legend(loc="lower right", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    with atomic.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)
