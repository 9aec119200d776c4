"""The README's path for users, at a tiny scale: a manifest of PNG files and a state dict trained by plain
PyTorch (bise_cli.examples.own_model), then `experiment=example/own_model` (dataset=table, backbone=torchvision,
vanilla_checkpoint=), then the ONNX export and the model card."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from bise_cli.examples import own_model
from bise_cli.reporting.export import export_run
from bise_cli.run import pipeline

from conftest import compose_config

TINY = ["pruning.tau_period=1", "pruning.tau_min=0.3", "pruning.head_pretrain_epochs=1",
        "pruning.head_refine_epochs=1", "finetune.epochs=1", "leakage_probe.epochs=1", "latency.repeats=1",
        "latency.warmup=0", "bootstrap.n=0"]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "example_own_model"
    # The embedded digits (the shipped IDX files are not needed); rho 0.7 keeps every (digit, colour) group.
    own_model.main(["--out", str(out), "--train", "400", "--val", "100", "--test", "100", "--epochs", "1",
                    "--rho", "0.7", "--mnist", str(out / "no-mnist-here")])
    return out


def test_step_one_writes_a_manifest_of_pngs_and_a_plain_torchvision_state_dict(user_files):
    with open(user_files / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [400, 100, 100]
    assert all((user_files / r["path"]).is_file() for r in rows)
    train = [r for r in rows if r["split"] == "train"]
    aligned = sum(own_model.COLOUR_NAMES.index(r["background"]) == int(r["digit"]) for r in train)
    assert aligned == sum(round(0.7 * sum(int(r["digit"]) == d for r in train)) for d in range(10))
    groups = {(r["digit"], r["background"]) for r in train}
    assert len(groups) == 100  # every class has >= 9 conflicting digits: each colour group is non-empty
    state = torch.load(user_files / "user_resnet18.pt", weights_only=True)
    assert "fc.weight" in state and state["fc.weight"].shape == (10, 512)  # the plain model's keys, no wrapper


def test_preset_runs_bise_on_the_users_model_and_exports_it(user_files):
    root = user_files.parent
    cfg = compose_config(["experiment=example/own_model", f"output_root={root}", *TINY])
    records = pipeline.run(cfg, root / "run")
    by_stage = {r["stage"]: r for r in records}
    assert list(by_stage) == ["vanilla", "bise", "bise_ft", "reweighted_ft", "random", "magnitude"]
    assert "train_seconds" not in by_stage["vanilla"]  # the user's weights, evaluated as given
    assert by_stage["vanilla"]["data_source"].endswith("manifest.csv")
    card = json.loads((root / "run" / "model_card.json").read_text())
    assert card["data"]["bias_value_names"]["background"] == list(own_model.COLOUR_NAMES)
    assert card["performance"]["vanilla"]["group_accuracy"]["background"] == by_stage["vanilla"]["group_acc"]
    result = export_run(root / "run", "onnx")
    assert result["check"]["max_abs_diff"] <= 1e-4, result  # onnxruntime's logits equal the pruned model's
