"""The training recipe object (bise_cli.method.recipe) and the run's one autocast context (bise_cli.core.precision):
a bad recipe value is one line naming it, and every training loop runs its forward passes inside the context."""

from __future__ import annotations

import pytest
import torch

from bise_cli.baselines import contrastive as con
from bise_cli.baselines.ffw import FFWSettings, run_ffw
from bise_cli.baselines.lff import train_lff
from bise_cli.core.errors import BiseError
from bise_cli.core.precision import FP32, autocast
from bise_cli.data.base import Split
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.train import fit, freeze
from bise_cli.models.mlp import MLP


@pytest.mark.parametrize(("changes", "message"), [
    ({"epochs": -1}, "finetune.epochs must be an integer >= 0, got -1"),
    ({"batch_size": 0}, "finetune.batch_size must be an integer >= 1, got 0"),
    ({"lr": 0}, "finetune.lr must be a number > 0, got 0"),
    ({"momentum": -0.5}, "finetune.momentum must be a number >= 0, got -0.5"),
    ({"optimizer": "rmsprop"}, "unknown finetune.optimizer 'rmsprop'"),
    ({"scheduler": "step"}, "unknown finetune.scheduler 'step'"),
    ({"milestones": [2, -1]}, "finetune.milestones must be a list of epochs"),
    ({"milestones": 3}, "finetune.milestones must be a list of epochs or auto, got 3"),
])
def test_a_bad_recipe_value_is_one_line_naming_it(changes, message):
    section = {"epochs": 2, "batch_size": 8, "lr": 0.1, "select_best": True, **changes}
    with pytest.raises(BiseError) as info:
        TrainRecipe.from_section(section, "finetune")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_recipe_ignores_its_callers_keys_and_needs_a_budget():
    recipe = TrainRecipe.from_section({"epochs": 2, "batch_size": 8, "milestones": [1], "select_best": True}, "ft")
    assert (recipe.epochs, recipe.milestones, recipe.optimizer) == (2, (1,), "sgd")
    with pytest.raises(BiseError, match="ft has no batch_size"):
        TrainRecipe.from_section({"epochs": 2}, "ft")
    auto = con.contrastive_recipe({"epochs": 9, "batch_size": 4, "lr": 1e-3, "milestones": "auto"}, "softcon")
    assert (auto.optimizer, auto.scheduler, auto.milestones) == ("adam", "multistep", (3, 6))


def test_the_autocast_context_is_reusable_and_fp32_is_null():
    amp = autocast("bf16", "cpu")
    for _ in range(2):  # one object, entered again and again (and nested), as every loop of a run does
        with amp, amp:
            assert torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_enabled("cpu")
    with FP32:
        assert not torch.is_autocast_enabled("cpu")
    assert autocast("fp32", "cuda:0") == autocast("fp32", torch.device("cuda")) and not FP32.enabled


def _problem(n: int = 48) -> Split:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    b = torch.where(torch.rand(n, generator=g) < 0.8, y, 1 - y)
    x = torch.randn(n, 4, generator=g) + (2 * b - 1).unsqueeze(1).float()
    return Split(x, y, b)


def _recording(model: torch.nn.Module, seen: list[bool]) -> torch.nn.Module:
    """`model`, noting for every forward pass with gradients whether autocast was on (the training steps)."""
    def hook(_module, _inputs):
        if torch.is_grad_enabled():
            seen.append(torch.is_autocast_enabled("cpu"))
    model.classifier.register_forward_pre_hook(hook)
    return model


def _model() -> torch.nn.Module:
    return MLP(2, in_features=4, hidden=[8], double_scale=False)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_every_training_loop_runs_inside_the_runs_autocast(precision):
    amp, split, recipe = autocast(precision, "cpu"), _problem(), TrainRecipe(epochs=1, batch_size=16, lr=0.01)
    loops = {
        "fit": lambda seen: fit(_recording(_model(), seen), split, recipe, amp=amp),
        "lff": lambda seen: train_lff(lambda: _recording(_model(), seen), split, recipe, amp=amp),
        "contrastive": lambda seen: con.train_contrastive(
            _recording(_model(), seen), split, con.contrastive_recipe(
                {"epochs": 1, "batch_size": 16, "lr": 1e-3, "milestones": "auto"}, "softcon"),
            pair_weights=lambda index: con.biascon_pair_weights(split.b[index]),
            sampler_weights=torch.ones(len(split)), contrastive_batch_size=8, ce_weight=0.01, temperature=0.07,
            ratio=0, amp=amp),
        "ffw": lambda seen: run_ffw(_recording(freeze(_model()), seen), split, split, num_bias=2,
                                    settings=FFWSettings(batch_size=16, eval_batch_size=16, max_epochs=1,
                                                         head_max_epochs=1, head_patience=0, t_patience=0),
                                    amp=amp),
    }
    for name, loop in loops.items():
        seen: list[bool] = []
        loop(seen)
        assert seen and all(on == amp.enabled for on in seen), (name, seen)
