"""The settings of a run that deviate from the paper's protocol (the packaged defaults of its dataset, backbone
and pruning method: the YAML files in conf/ hold the paper's values). The model card lists them."""

from __future__ import annotations

from bise_cli.core.defaults import packaged_defaults
from bise_cli.run.records import flatten_config

# Settings that say where or how a run ran, not what it computed: never deviations.
NOT_PROTOCOL = ("seed", "dataset.source", "dataset.fallback", "vanilla_checkpoint", "eval_batch_size", "latency",
                "deterministic")


def deviations(cfg: dict) -> list[tuple[str, object, object]]:
    """(key, this run's value, paper value) for every setting that differs from the packaged defaults of its
    dataset, backbone and pruning method."""
    paper = flatten_config(packaged_defaults(cfg["dataset"]["name"], cfg["backbone"]["name"], cfg["pruning"]["name"]))
    run = flatten_config(cfg)
    return [(key, value, paper.get(key)) for key, value in run.items()
            if paper.get(key) != value and not key.startswith(NOT_PROTOCOL)]
