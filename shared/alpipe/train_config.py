"""How the model is retrained each round, and the stopping rules (no torch needed)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """How the model is (re)trained each round."""

    stop: str = "no_improvement"  # "no_improvement" or "epochs:N"
    patience: int = 5  # epochs without held-out improvement before stopping (3 stops too early on few labels)
    max_epochs: int = 30
    holdout: str = "labeled"  # "labeled": validation carved from labels; "test": the tutorial's way
    val_fraction: float = 0.2
    # A validation split of 2 or 3 images stops training on noise; below this many held-out images
    # the labeled set is used whole and trained for small_set_epochs instead.
    min_val_size: int = 10
    small_set_epochs: int = 12
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    # With 20 labels one pass is a single SGD step; an "epoch" covers at least this many samples
    # so that early stopping compares models that have actually moved.
    min_epoch_samples: int = 256
    warm_start: bool = True
    augment: bool = True  # small random shifts: cheap, and they help most when labels are few

    def __post_init__(self):
        fixed_epochs(self.stop)  # validates the rule
        if self.holdout not in ("labeled", "test"):
            raise UserError(f"holdout must be 'labeled' or 'test', got {self.holdout!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.patience < 1 or self.max_epochs < 1:
            raise UserError("patience and max_epochs must be at least 1")

    def as_dict(self) -> dict:
        return asdict(self)


def fixed_epochs(stop: str) -> int | None:
    """N for an 'epochs:N' rule, None for 'no_improvement'; a UserError for anything else."""
    if stop == "no_improvement":
        return None
    match = re.fullmatch(r"epochs:(\d+)", stop)
    if not match or int(match.group(1)) < 1:
        raise UserError(f"unknown stopping rule {stop!r}; use 'no_improvement' or 'epochs:N' (N >= 1)")
    return int(match.group(1))
