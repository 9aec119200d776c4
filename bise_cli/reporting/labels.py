"""How a record's stage is named for people: the stage's declared title, with the validation metric that
selected the masks when a run records several selections of one search (`pruning.also_select_by`). The terminal
summary and the model card both name rows this way."""

from __future__ import annotations

from bise_cli.core.names import metric
from bise_cli.run.registry import spec as stage


def stage_label(record: dict) -> str:
    """"BISE+FT", "Reweighted FT", or "BISE, val worst group" for an alternative selection."""
    label = stage(record["stage"]).title
    return f"{label}, val {metric(record['selection']).title}" if record.get("selection") else label
