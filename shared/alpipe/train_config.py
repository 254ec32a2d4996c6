"""How the model is retrained each round, and the stopping rules (no torch needed).

TrainOptions states every training knob once: its default, its bounds and its help. The API takes it as a
project's `training` (alpipe.schemas), `alpipe simulate` makes its training flags from it (alpipe.cli), and
TrainConfig, what the training code reads, is built from its fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, field, make_dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError


class TrainOptions(BaseModel):
    """How the model is (re)trained each round."""

    model_config = ConfigDict(extra="forbid", strict=True)

    stop: str = Field("no_improvement", description="stopping rule: no_improvement (held-out accuracy) or epochs:N")
    # 3 stops too early on few labels.
    patience: int = Field(5, ge=1, description="epochs without improvement before stopping")
    max_epochs: int = Field(30, ge=1, le=1000, description="cap for no_improvement")
    holdout: Literal["labeled", "test"] = Field(
        "labeled", description="no_improvement watches a validation split carved from the labels (default) "
                               "or the test set (the tutorial's exact behaviour)")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    # A validation split of 2 or 3 images stops training on noise; below this many held-out images
    # the labeled set is used whole and trained for small_set_epochs instead.
    min_val_size: int = Field(10, ge=1, description="fewer held-out labels than this: train small_set_epochs")
    small_set_epochs: int = Field(12, ge=1)
    # With 20 labels one pass is a single SGD step; an "epoch" covers at least this many samples
    # so that early stopping compares models that have actually moved.
    min_epoch_samples: int = Field(256, ge=1, description="an epoch covers at least this many samples")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(32, ge=2)
    warm_start: bool = True
    augment: bool = True  # small random shifts: cheap, and they help most when labels are few


def check_train_options(values: dict, *, spell: Callable[[str], str] = "training option {}".format) -> None:
    """A UserError for the first value out of TrainOptions' bounds, naming it as spell(field) (the CLI
    names its flag); an unknown stopping rule is one too."""
    if "stop" in values:
        fixed_epochs(values["stop"])
    try:
        TrainOptions.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        where = spell(".".join(str(part) for part in error["loc"]))
        raise UserError(f"{where}: {error['msg']}, got {error['input']!r}") from None


class _Checked:
    """What TrainConfig adds to TrainOptions' fields: checks at construction, as_dict."""

    def __post_init__(self) -> None:
        check_train_options(asdict(self))

    def as_dict(self) -> dict:
        return asdict(self)


# The training code takes a frozen dataclass (ExperimentConfig nests it; asdict and replace work on it). Its fields
# and defaults are TrainOptions', so they are written once; a value out of TrainOptions' bounds is a UserError.
TrainConfig = make_dataclass(
    "TrainConfig",
    [(name, info.annotation, field(default=info.default)) for name, info in TrainOptions.model_fields.items()],
    bases=(_Checked,), frozen=True,
    # make_dataclass's module= is Python 3.12+; the module makes it picklable.
    namespace={"__module__": __name__,
               "__doc__": "How the model is (re)trained each round: TrainOptions' fields, frozen and checked."})


def fixed_epochs(stop: str) -> int | None:
    """N for an 'epochs:N' rule, None for 'no_improvement'; a UserError for anything else."""
    if stop == "no_improvement":
        return None
    match = re.fullmatch(r"epochs:(\d+)", stop)
    if not match or int(match.group(1)) < 1:
        raise UserError(f"unknown stopping rule {stop!r}; use 'no_improvement' or 'epochs:N' (N >= 1)")
    return int(match.group(1))
