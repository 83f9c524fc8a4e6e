"""Typed options of the SGD fits: the one settings builder and the one learning-rate grid.

A method's options model (methods/registry.py) derives from these: the study config and
`lorafuse fit` validate a method's options against it (unknown keys and bad types are
errors), and a fit reads typed fields instead of looking keys up in a dict.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lorafuse.fit.data import ObjectiveName
from lorafuse.fit.settings import SGDSettings
from lorafuse.fit.sgd import LR_GRID


class Options(BaseModel):
    """Base of every method's options: no unknown keys, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoopOptions(Options):
    """The training loop's options (`fit.sgd.train`), the training data's cap and the
    training objective (`fit.data.Objective`). The loop's other settings (warm-up in
    steps, floor, decay, clipping, betas) keep `SGDSettings`' defaults in every fit."""

    epochs: int | None = Field(
        5, ge=1, description="passes over the data (null: until a plateau, needs max_steps)"
    )
    max_steps: int | None = Field(None, ge=1, description="step cap of every run")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup: float = Field(0.06, ge=0, le=1, description="warm-up, a fraction of the steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    eval_every: int | None = Field(
        None, ge=1, description="steps between validations (null: once per epoch)"
    )
    patience: int | None = Field(
        None, ge=1, description="stop after this many validations without improvement"
    )
    min_delta: float = Field(
        1e-3, ge=0, lt=1, description="relative improvement a validation must make to count"
    )
    seed: int = Field(0, ge=0, description="seed of the data order and the initialisation")
    max_examples_per_task: int | None = Field(
        None, ge=1, description="training examples per task (null: all)"
    )
    objective: ObjectiveName = Field(
        "task",
        description="training loss: task (task-balanced mean over examples) or token (the "
        "paper's mean over target tokens); validation is the evaluation's metric either way",
    )

    def settings(self, lr: float) -> SGDSettings:
        """The SGDSettings of one run at learning rate `lr` (LorafuseError if invalid)."""
        keys = ("epochs", "max_steps", "batch_size", "grad_accum", "warmup", "weight_decay",
                "eval_every", "patience", "min_delta", "seed")  # fmt: skip
        return SGDSettings(lr=lr, **{k: getattr(self, k) for k in keys})


class GridOptions(LoopOptions):
    """A loop whose learning rate is chosen on validation from a grid."""

    lr: float | None = Field(None, gt=0, description="one learning rate (when no lr_grid)")
    lr_grid: list[float] | None = Field(
        None, min_length=1, description="rates to try, the best on validation wins"
    )

    def grid(self) -> list[float]:
        """`lr_grid`, else [`lr`], else the paper's grid {1e-3, 1e-4, 1e-5}."""
        if self.lr_grid:
            return [float(x) for x in self.lr_grid]
        return [float(self.lr)] if self.lr is not None else list(LR_GRID)
