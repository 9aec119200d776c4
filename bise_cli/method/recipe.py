"""A training recipe: the optimiser, schedule and budget of one training loop, as one validated object.

`TrainRecipe` is built once from a config section (`train`, `finetune`, `baselines.softcon`, ...) by
`TrainRecipe.from_section` and passed whole to `fit`, LfF and the contrastive baselines, instead of nine
settings unpacked by hand at every call. Construction validates it: a bad value is one line naming the setting.
This module does not import torch, so the config validator can build recipes without it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from bise_cli.core.errors import BiseError, check_choice

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "multistep", "cosine", "linear")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainRecipe:
    """How one model trains. `name` is the config section it came from (it prefixes every error)."""

    epochs: int
    batch_size: int
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "none"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    name: str = field(default="train", compare=False)

    def __post_init__(self):
        # Lists from YAML become a tuple: the recipe is immutable and hashable.
        object.__setattr__(self, "milestones", tuple(self.milestones or ()))
        self.validate()

    def validate(self) -> TrainRecipe:
        """This recipe, or a one-line BiseError naming the first bad setting and its value."""
        n = self.name
        if not _is_int(self.epochs) or self.epochs < 0:
            raise BiseError(f"{n}.epochs must be an integer >= 0, got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise BiseError(f"{n}.batch_size must be an integer >= 1, got {self.batch_size!r}")
        check_choice(f"{n}.optimizer", self.optimizer, OPTIMIZERS)
        check_choice(f"{n}.scheduler", self.scheduler, SCHEDULERS)
        if not _is_number(self.lr) or self.lr <= 0:
            raise BiseError(f"{n}.lr must be a number > 0, got {self.lr!r}")
        for key in ("momentum", "weight_decay"):
            value = getattr(self, key)
            if not _is_number(value) or value < 0:
                raise BiseError(f"{n}.{key} must be a number >= 0, got {value!r}")
        if not _is_number(self.gamma) or self.gamma <= 0:
            raise BiseError(f"{n}.gamma must be a number > 0, got {self.gamma!r}")
        if any(not _is_int(m) or m < 0 for m in self.milestones):
            raise BiseError(f"{n}.milestones must be a list of epochs (integers >= 0) or auto, "
                            f"got {list(self.milestones)!r}")
        return self

    @classmethod
    def from_section(cls, section: dict, name: str, **overrides) -> TrainRecipe:
        """The recipe of config section `section` (called `name` in errors); keys that are not recipe fields
        (e.g. finetune.select_best) belong to the caller. `overrides` replace section values (a resolved
        `milestones: auto`, a fixed optimiser)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        values = {k: v for k, v in section.items() if k in fields}
        values.update(overrides)
        missing = sorted({"epochs", "batch_size"} - set(values))
        if missing:
            raise BiseError(f"{name} has no {' and no '.join(missing)}: a training recipe needs both")
        milestones = values.get("milestones")
        if milestones is not None and not isinstance(milestones, (list, tuple)):
            raise BiseError(f"{name}.milestones must be a list of epochs or auto, got {milestones!r}")
        return cls(**values, name=name)
