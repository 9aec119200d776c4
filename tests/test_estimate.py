"""The run-level cost estimate: positive figures per stage from timed batches, the global RNG untouched (a run
draws the same numbers with it), and the one-line GPU-work notice on a CPU with the alternatives."""

from __future__ import annotations

import torch

from bise_cli.run import pipeline
from bise_cli.run.estimate import estimate_run, report

from conftest import TINY_OVERRIDES, compose_config


def test_estimate_is_positive_per_stage_and_leaves_the_rng_alone():
    cfg = compose_config(TINY_OVERRIDES)
    bundle = pipeline.load_data(cfg)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    estimate = estimate_run(cfg, bundle, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    assert estimate["estimated_seconds"] > 0 and estimate["seconds_per_sample"] > 0
    # The smoke preset's stages: vanilla, the search (for the mask stages), both fine-tunings, every evaluation.
    assert set(estimate["per_stage"]) == {"vanilla", "bise", "bise_ft", "reweighted_ft", "evaluation"}
    assert all(seconds > 0 for seconds in estimate["per_stage"].values())
    assert abs(sum(estimate["per_stage"].values()) - estimate["estimated_seconds"]) < 0.5


def test_estimate_scales_with_the_epochs_at_a_given_speed(monkeypatch):
    # The measured speed is fixed here (timings on a shared machine differ between calls): twice the vanilla
    # epochs is exactly twice the vanilla estimate, and the other stages do not move.
    cfg = compose_config(TINY_OVERRIDES)
    bundle = pipeline.load_data(cfg)
    monkeypatch.setattr("bise_cli.run.estimate.seconds_per_sample", lambda *args: (0.01, 64, 0.001))
    estimate = estimate_run(cfg, bundle, torch.device("cpu"))["per_stage"]
    longer = {**cfg, "train": {**cfg["train"], "epochs": 2 * cfg["train"]["epochs"]}}
    doubled = estimate_run(longer, bundle, torch.device("cpu"))["per_stage"]
    assert doubled["vanilla"] == 2 * estimate["vanilla"] > 0
    assert {k: v for k, v in doubled.items() if k != "vanilla"} == {k: v for k, v in estimate.items() if k != "vanilla"}


def test_no_probe_epochs_time_no_probe_steps(monkeypatch):
    cfg = compose_config(TINY_OVERRIDES)
    cfg = {**cfg, "leakage_probe": {**cfg["leakage_probe"], "epochs": 0}}
    bundle = pipeline.load_data(cfg)

    def never(*args):
        raise AssertionError("timed a probe that has no epochs")

    monkeypatch.setattr("bise_cli.run.estimate.probe_step_seconds", never)
    assert estimate_run(cfg, bundle, torch.device("cpu"))["estimated_seconds"] > 0


def test_gpu_work_on_a_cpu_is_said_in_one_line_with_the_alternatives():
    estimate = {"estimated_seconds": 69000.0, "per_stage": {"vanilla": 62000.0, "bise": 7000.0},
                "seconds_per_sample": 0.0129, "timed_batch_size": 256}
    lines = report(estimate, {"gpu_work": True}, torch.device("cpu"))
    assert lines[0].startswith("estimated wall time of this run on cpu: 19.2 h (vanilla 17.2 h, bise 1.9 h;")
    assert lines[1] == ("this is GPU work running on a CPU: about 19.2 h; on a machine with a GPU use device=cuda, "
                        "or try experiment=quickstart (a reduced run of about 3 minutes)")
    assert len(report({**estimate, "estimated_seconds": 60.0}, {"gpu_work": False}, torch.device("cpu"))) == 1
    assert len(report(estimate, {"gpu_work": True}, torch.device("cuda"))) == 1
    # Unmarked but far beyond a CPU's reach: said too.
    assert len(report(estimate, {"gpu_work": False}, torch.device("cpu"))) == 2
