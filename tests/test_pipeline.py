"""The pipeline end to end in-process on tiny settings: records, caching, skipping, determinism, errors."""

from __future__ import annotations

import json

import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.core.files import read_jsonl
from bise_cli.core.metrics import ACCURACY_METRICS, EFFICIENCY_METRICS
from bise_cli.method.prune import load_pruned
from bise_cli.run import pipeline, stages

from conftest import TINY_OVERRIDES, TINY_SETTINGS, compose_config, without_timing


def _cfg(tmp_path, *extra):
    return compose_config([*TINY_OVERRIDES, f"output_root={tmp_path / 'outputs'}", *extra])


ALL_STAGES = ["vanilla", "bise", "bise_ft", "reweighted_ft", "random", "magnitude", "dfr_train", "dfr_val", "lff"]


def test_full_stage_list_writes_one_record_per_stage(tmp_path):
    cfg = _cfg(tmp_path, f"stages=[{','.join(ALL_STAGES)}]")
    records = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in records] == ALL_STAGES
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == json.loads(json.dumps(records))
    for record in records:
        assert {"dataset", "backbone", "rho", "seed"} <= set(record["keys"])
        assert record["dataset"] == "biased_mnist" and record["rho"] == 0.9 and record["seed"] == 0
        for name in ACCURACY_METRICS + EFFICIENCY_METRICS + ("leakage",):
            assert record[name] is not None, (record["stage"], name)
        assert 0 <= record["acc_unbiased"] <= 1 and 0 <= record["leakage"] <= 1
        low, high = record["acc_unbiased_ci"]  # the per-run bootstrap interval brackets the estimate
        assert low <= record["acc_unbiased"] <= high
    bise = records[1]
    assert 0 <= bise["sparsity_units"] <= 1 and bise["leakage_head"] is not None
    # The matched baselines keep exactly as many units per layer as BISE.
    assert records[4]["sparsity_units"] == pytest.approx(bise["sparsity_units"])
    assert records[5]["sparsity_units"] == pytest.approx(bise["sparsity_units"])
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "done"
    masks = torch.load(tmp_path / "run" / "masks.pt")["masks"]
    model = load_pruned(tmp_path / "run" / "pruned_bise.pt")
    assert sum(int(m.sum()) for m in masks.values()) == sum(model.channels)


def test_second_run_reuses_the_caches_and_a_done_run_is_skipped(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "stages=[vanilla,bise]")
    first = pipeline.run(cfg, tmp_path / "a")

    def no_training(*args, **kwargs):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(stages, "fit", no_training)
    monkeypatch.setattr(stages, "run_search", no_training)
    second = pipeline.run(cfg, tmp_path / "b")  # another run dir, same settings: everything from the cache
    assert without_timing(first) == without_timing(second)
    assert [r["latency_ms_b1"] for r in first] == [r["latency_ms_b1"] for r in second]  # cached with the stage
    assert pipeline.run(cfg, tmp_path / "a") == first  # done: skipped, records read back


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path):
    runs = [pipeline.run(_cfg(tmp_path / str(i), "stages=[vanilla,bise]", f"seed={s}", "cache=false"),
                         tmp_path / str(i) / "run") for i, s in enumerate((0, 0, 1))]
    assert without_timing(runs[0]) == without_timing(runs[1])
    assert runs[0][0]["acc"] != runs[2][0]["acc"] or runs[0][0]["group_acc"] != runs[2][0]["group_acc"]


@pytest.mark.parametrize("override, message", [
    ("stages=[vanilla,prune_everything]", "unknown stage 'prune_everything'"),
    ("pruning.gamma=-1", "gamma"),
    ("pruning.tau_factor=1.5", "never stops"),
    ("device=tpu", "unknown device 'tpu'"),
    ("rho=1.5", "rho must be in"),
])
def test_bad_input_is_one_clear_error_before_the_run_starts(tmp_path, override, message):
    with pytest.raises(BiseError, match=message):
        pipeline.run(_cfg(tmp_path, override), tmp_path / "run")
    assert not (tmp_path / "run" / "status.json").exists()  # checked before anything was started


def test_failure_keeps_records_already_written(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "stages=[vanilla,bise]")

    def broken(*args, **kwargs):
        raise BiseError("the BISE objective became nan at epoch 1; lower pruning.mask_lr or pruning.gamma")

    monkeypatch.setattr(stages, "run_search", broken)
    with pytest.raises(BiseError, match="nan"):
        pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == ["vanilla"]


def test_unsupervised_variant_uses_identification_model(tmp_path):
    records = pipeline.run(_cfg(tmp_path, "stages=[vanilla,bise]", "bias_labels=identification"), tmp_path / "run")
    bise = records[1]
    # The unsupervised variant reweights empirically (the official rule), and the rho it reports is the measured
    # agreement of the pseudo bias labels with y, not the nominal 0.9.
    assert bise["reweighting_used"] == "empirical"
    assert 0 < bise["rho_reweighting"][0] <= 1 and bise["rho_reweighting"][0] != 0.9
    assert list((tmp_path / "outputs" / "cache" / "identification").glob("*.pt"))


def test_ffw_stage_runs_and_is_refused_with_bise_stages(tmp_path):
    # The smoke preset tunes BISE's keys: the same tiny settings without them.
    tiny = [o for o in TINY_SETTINGS if not o.startswith("pruning.")] + ["backbone.width=0.125", "rho=0.9"]
    overrides = ["pruning=ffw", "pruning.max_epochs=2", "pruning.head_max_epochs=2", "pruning.t_patience=0"]
    cfg = compose_config([*tiny, f"output_root={tmp_path / 'outputs'}", *overrides, "stages=[vanilla,ffw]"])
    records = pipeline.run(cfg, tmp_path / "run")
    ffw = records[1]
    assert ffw["stage"] == "ffw" and 0 <= ffw["sparsity_weights"] <= 1 and ffw["macs"] == records[0]["macs"]
    with pytest.raises(BiseError, match="need pruning=bise"):
        pipeline.run(compose_config([*tiny, *overrides, "stages=[vanilla,bise]"]), tmp_path / "run2")
    with pytest.raises(BiseError, match="needs pruning=ffw"):
        pipeline.run(_cfg(tmp_path, "stages=[vanilla,ffw]"), tmp_path / "run3")


def test_vanilla_checkpoint_is_used_and_a_mismatch_is_one_clear_error(tmp_path):
    from bise_cli.models import build_backbone

    good = tmp_path / "vanilla.pt"
    torch.save(build_backbone("simple_convnet", 10, width=0.125).state_dict(), good)
    records = pipeline.run(_cfg(tmp_path, "stages=[vanilla]", f"vanilla_checkpoint={good}"), tmp_path / "a")
    assert records[0]["stage"] == "vanilla" and "train_seconds" not in records[0]
    wrong = tmp_path / "wide.pt"
    torch.save(build_backbone("simple_convnet", 10, width=0.5).state_dict(), wrong)
    with pytest.raises(BiseError, match=r"\(backbone=simple_convnet, 10 classes\) does not match the model: "
                       r"shape mismatches 25 \(extracter.0.bias \(8,\) vs \(2,\), extracter.0.weight \(8, 3, 7, 7\) vs "
                       r"\(2, 3, 7, 7\)"):
        pipeline.run(_cfg(tmp_path, "stages=[vanilla]", f"vanilla_checkpoint={wrong}"), tmp_path / "b")


def test_vanilla_checkpoint_from_safetensors_and_with_wrapped_or_missing_keys(tmp_path):
    from safetensors.torch import save_file

    from bise_cli.models import build_backbone

    state = build_backbone("simple_convnet", 10, width=0.125).state_dict()
    pt = tmp_path / "vanilla.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, pt)  # DDP-style file
    tensors = tmp_path / "vanilla.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tensors))
    a = pipeline.run(_cfg(tmp_path, "stages=[vanilla]", f"vanilla_checkpoint={pt}"), tmp_path / "a")
    b = pipeline.run(_cfg(tmp_path, "stages=[vanilla]", f"vanilla_checkpoint={tensors}"), tmp_path / "b")
    assert a[0]["acc"] == b[0]["acc"]  # the same weights through both formats
    partial = tmp_path / "partial.pt"
    torch.save({**{k: v for k, v in state.items() if k != "fc.bias"}, "head.w": torch.zeros(1)}, partial)
    with pytest.raises(BiseError, match=r"missing keys 1 \(fc.bias\); unexpected keys 1 \(head.w\)"):
        pipeline.run(_cfg(tmp_path, "stages=[vanilla]", f"vanilla_checkpoint={partial}"), tmp_path / "c")


def test_civilcomments_with_bert_end_to_end_on_a_wilds_layout_file(tmp_path):
    pytest.importorskip("transformers")
    from bise_cli.data.synthetic_text import write_synthetic_civilcomments

    root = tmp_path / "civil"
    write_synthetic_civilcomments(root / "civilcomments_v1.0" / "all_data_with_identities.csv", 240, 0.9, seed=0)
    cfg = compose_config([
        "dataset=civilcomments", "backbone=bert", "backbone.pretrained=tiny", "dataset.source=files",
        f"dataset.root={root}", "dataset.max_length=16", "dataset.groups=wilds", "train.epochs=1",
        "train.lr=0.001", "pruning.tau_period=1", "pruning.tau_min=0.3", "pruning.head_pretrain_epochs=1",
        "pruning.head_refine_epochs=1", "finetune.epochs=1", "leakage_probe.epochs=1", "latency.repeats=1",
        "latency.warmup=0", "stages=[vanilla,bise,bise_ft,random,dfr_train,dfr_val,lff]",
        f"output_root={tmp_path / 'outputs'}"])
    records = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in records] == ["vanilla", "bise", "bise", "bise", "bise", "bise_ft", "random",
                                             "dfr_train", "dfr_val", "lff"]
    assert [r.get("selection") for r in records[1:5]] == ["acc_worst_group", "acc", "acc_avg_group",
                                                          "acc_weighted_avg_group"]
    assert 0 <= records[0]["acc_weighted_avg_group"] <= 1
    for record in records:
        assert record["dataset"] == "civilcomments" and 0 <= record["dp_diff"] <= 1 and 0 <= record["eo_diff"] <= 1
        assert record["wilds_acc_worst_group"] == record["acc_worst_group"]  # groups=wilds is the headline
        assert record["macs"] > 0 and record["leakage"] is not None


def test_label_noise_flips_training_labels_only_and_is_recorded(tmp_path):
    clean = pipeline.load_data(_cfg(tmp_path))
    noisy = pipeline.load_data(_cfg(tmp_path, "dataset.label_noise=0.2"))
    for name in ("train", "search"):
        flipped = noisy[name].meta["label_flipped"]
        assert int(flipped.sum()) == round(0.2 * len(flipped))
        assert torch.equal(noisy[name].y[~flipped], clean[name].y[~flipped])
        assert (noisy[name].y[flipped] != clean[name].y[flipped]).all()
    assert torch.equal(noisy["test"].y, clean["test"].y) and torch.equal(noisy["val"].y, clean["val"].y)
    records = pipeline.run(_cfg(tmp_path, "dataset.label_noise=0.2", "stages=[vanilla]"), tmp_path / "run")
    assert records[0]["dataset.label_noise"] == 0.2 and "dataset.label_noise" in records[0]["keys"]
