"""The unsupervised variant (`bias_labels=identification`) never trains on ground-truth bias labels.

The official code replaces b by the predictions of a briefly trained identification model and reweights
empirically; only evaluation may read the true b. Every training entry point (vanilla and fine-tuning fits,
the mask search with its heads) is spied on: none may receive the ground-truth bias labels.
"""

from __future__ import annotations

import torch

from bise_cli.run import pipeline, stages

from conftest import TINY_OVERRIDES, compose_config


def test_ground_truth_bias_never_reaches_a_training_step(tmp_path, monkeypatch):
    seen: dict[str, list[torch.Tensor]] = {"fit": [], "search": []}
    truth: list[torch.Tensor] = []
    load_data, fit, run_search = pipeline.load_data, stages.fit, stages.run_search

    def spy_load(cfg):
        bundle = load_data(cfg)
        truth.append(bundle["search"].b.clone())
        return bundle

    def spy_fit(model, split, recipe, **kwargs):
        if kwargs.get("sample_weights") is not None:  # the vanilla fits use no bias labels at all
            seen["fit"].append(split.b.clone())
        return fit(model, split, recipe, **kwargs)

    def spy_search(model, gates, search, *args, **kwargs):
        seen["search"].append(search.b.clone())
        return run_search(model, gates, search, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_data", spy_load)
    monkeypatch.setattr(stages, "fit", spy_fit)
    monkeypatch.setattr(stages, "run_search", spy_search)
    cfg = compose_config([*TINY_OVERRIDES, f"output_root={tmp_path / 'outputs'}", "bias_labels=identification",
                          "stages=[vanilla,bise,bise_ft,reweighted_ft]"])
    records = pipeline.run(cfg, tmp_path / "run")
    assert [r["stage"] for r in records] == ["vanilla", "bise", "bise_ft", "reweighted_ft"]
    assert len(seen["search"]) == 1 and len(seen["fit"]) == 2  # the search, BISE+FT and reweighted FT
    for b in seen["search"] + seen["fit"]:
        assert b.shape == truth[0].shape and not torch.equal(b, truth[0])
    assert records[1]["reweighting_used"] == "empirical"
