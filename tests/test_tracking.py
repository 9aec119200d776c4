"""logger=tensorboard|mlflow: the config, per-epoch curves and final metrics of every stage reach the tracker,
also for a run found finished; a missing backend fails before any work."""

from __future__ import annotations

import sys

import pytest

from bise_cli.core.errors import BiseError
from bise_cli.reporting.tracking import check_tracker, stage_histories
from bise_cli.run import pipeline

from conftest import TINY_OVERRIDES, compose_config

STAGES = "stages=[vanilla,bise,bise_ft]"


def _cfg(tmp_path, *extra):
    return compose_config([*TINY_OVERRIDES, f"output_root={tmp_path / 'outputs'}", STAGES, *extra])


def test_mlflow_receives_config_curves_and_metrics_and_a_finished_run_is_sent_again(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # an extra of `make install`, so the suite runs this
    run_dir = tmp_path / "run"
    records = pipeline.run(_cfg(tmp_path), run_dir)  # logger=none: nothing tracked
    assert not (tmp_path / "outputs" / "mlruns").exists()

    # The finished run is not recomputed when a logger is added: its folder is sent as it is.
    monkeypatch.setattr(pipeline, "recipe", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    pipeline.run(_cfg(tmp_path, "logger=mlflow"), run_dir)
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "outputs" / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "smoke"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["seed"] == "0" and run.data.params["backbone"] == "simple_convnet"
    by_stage = {r["stage"]: r for r in records}
    for stage in ("vanilla", "bise", "bise_ft"):
        assert run.data.metrics[f"{stage}/acc"] == pytest.approx(by_stage[stage]["acc"])
    assert "vanilla/seed" not in run.data.metrics  # config values are parameters, not metrics
    histories = stage_histories(run_dir)
    assert set(histories) >= {"vanilla", "bise", "bise_ft"}
    loss = client.get_metric_history(run.info.run_id, "vanilla/epoch/loss")
    assert [m.value for m in loss] == pytest.approx([row["loss"] for row in histories["vanilla"]])
    search_keys = {k for k in run.data.metrics if k.startswith("bise/epoch/")}
    assert {"bise/epoch/tau", "bise/epoch/sparsity_units", "bise/epoch/loss_ce"} <= search_keys, search_keys


def test_tensorboard_event_files_hold_every_stage_curve(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    records = pipeline.run(_cfg(tmp_path, "logger=tensorboard"), run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"vanilla/epoch/loss", "bise/epoch/tau", "bise_ft/epoch/loss", "bise/acc"} <= tags
    assert events.Scalars("bise/acc")[0].value == pytest.approx(
        next(r["acc"] for r in records if r["stage"] == "bise"), rel=1e-6)


def test_a_missing_backend_is_one_clear_error_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(BiseError, match="logger=mlflow needs mlflow-skinny"):
        check_tracker({"name": "mlflow"})
    with pytest.raises(BiseError, match="logger=mlflow needs"):
        pipeline.run(_cfg(tmp_path, "logger=mlflow"), tmp_path / "run")
    assert not (tmp_path / "run" / "status.json").exists()  # nothing started
    with pytest.raises(BiseError, match="unknown logger 'wandb'"):
        check_tracker({"name": "wandb"})
