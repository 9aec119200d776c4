"""One home for every metric name, with how each is displayed.

This module is in the bottom layer (`bise_cli.core`) and imports nothing from `bise_cli`. Stages are declared
(with their titles and colours) in `bise_cli.run.registry`, which imports nothing from `bise_cli` either; tables,
the terminal summary, the model card and the plots take units and number formats from `METRICS` and
`format_value` here.

Records store metrics in natural units (accuracies and sparsities as fractions, MACs and parameters as counts,
latency in milliseconds); `Metric.scale` turns a stored value into the displayed one, `Metric.unit` names the
displayed unit and `Metric.decimals` its precision.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str                       # the record key
    title: str                      # short column title for people
    scale: float                    # displayed = stored * scale
    unit: str                       # displayed unit: "%", "M", "ms" or "" (shown in column headers, not in cells)
    higher_is_better: bool | None   # None: no direction
    description: str
    decimals: int | None = 1        # displayed precision; None: general format (4 significant digits)


# name | title | scale | unit | higher is better (+, -, or . for no direction) | decimals (g: 4 significant digits) |
# description. One row per metric: the table is parsed once below, so adding a metric is adding a line.
_METRIC_TABLE = """
acc | accuracy | 100 | % | + | 1 | fraction of correct predictions
acc_unbiased | unbiased | 100 | % | + | 1 | mean of the group accuracies A_g over the (y, b) groups present
acc_avg_group | avg group | 100 | % | + | 1 | average-group accuracy (= acc_unbiased unless the groups are redefined)
acc_weighted_avg_group | weighted avg group | 100 | % | + | 1 | sum of A_g weighted by the training shares of the groups
acc_aligned | aligned | 100 | % | + | 1 | accuracy on samples with b = y (on every bias attribute)
acc_conflicting | conflicting | 100 | % | + | 1 | accuracy on samples with b != y (on every bias attribute)
acc_worst_group | worst group | 100 | % | + | 1 | minimum over the present groups of A_g
acc_unbiased_cells | unbiased (cells) | 100 | % | + | 1 | mean over patterns of their cells' mean accuracy (DebiAN)
acc_both_aligned | both aligned | 100 | % | + | 1 | Multi-Color MNIST: left and right colour both agree with y
acc_left_aligned_right_conflicting | L aligned, R confl. | 100 | % | + | 1 | left colour agrees with y, right does not
acc_left_conflicting_right_aligned | L confl., R aligned | 100 | % | + | 1 | right colour agrees with y, left does not
acc_both_conflicting | both conflicting | 100 | % | + | 1 | Multi-Color MNIST: neither colour agrees with y
dp_diff | DP diff | 100 | % | - | 1 | demographic parity difference across b (binary tasks), percentage points
eo_diff | EO diff | 100 | % | - | 1 | equalised odds difference across b (binary tasks), percentage points
sparsity_units | units off | 100 | % | + | 1 | fraction of gated units switched off
sparsity_weights | weights off | 100 | % | + | 1 | 1 - conv + linear weights of the pruned model / the dense model's
params | params | 1e-6 | M | - | 2 | parameters
macs | MACs | 1e-6 | M | - | 1 | multiply-accumulates for one input
latency_ms_b1 | latency b1 | 1 | ms | - | 2 | median forward latency at batch 1 on the run's device
latency_ms_b100 | latency b100 | 1 | ms | - | 2 | median forward latency at batch 100 on the run's device
leakage | bias probe | 100 | % | - | 1 | test accuracy of a freshly trained linear bias probe on the final bottleneck
leakage_head | bias head | 100 | % | - | 1 | test accuracy of BISE's own bias head on the final bottleneck
dfr_c | DFR C | 1 |  | . | g | the inverse L1 regularisation strength DFR chose on held-out data
dfr_subsamples | DFR subsamples | 1 |  | . | 0 | the group-balanced subsamples averaged into DFR's last layer
"""


def _parse_metrics(table: str) -> tuple[Metric, ...]:
    metrics = []
    for line in table.strip().splitlines():
        name, title, scale, unit, direction, decimals, description = (cell.strip() for cell in line.split("|", 6))
        higher = {"+": True, "-": False}.get(direction)
        metrics.append(Metric(name, title, float(scale), unit, higher, description,
                              None if decimals == "g" else int(decimals)))
    return tuple(metrics)


METRICS: tuple[Metric, ...] = _parse_metrics(_METRIC_TABLE)
METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
_METRICS = {m.name: m for m in METRICS}

# Record keys derived from a declared metric display like it: `val_acc`, `wilds_acc_worst_group`, `macs_dense`,
# `leakage_head_vanilla` (the metric on the vanilla model).
DERIVED_PREFIXES = ("val_", "test_conflicting_", "test_", "wilds_", "coarse_")
DERIVED_SUFFIXES = ("_dense", "_unrounded", "_vanilla")
# Metrics also recorded per bias attribute, as `<metric>_<attribute>` (`leakage_left`), when there are several.
PER_ATTRIBUTE = ("leakage",)
MISSING = "–"


def per_attribute(name: str, attribute: str) -> str:
    """The record key of metric `name` (one of PER_ATTRIBUTE) for one bias attribute."""
    return f"{name}_{attribute}"


def _declared_base(name: str) -> str | None:
    """The declared metric that record key `name` is, or derives from by a prefix and a suffix; None if none."""
    base = name
    for prefix in DERIVED_PREFIXES:
        base = base.removeprefix(prefix)
    for suffix in DERIVED_SUFFIXES:
        base = base.removesuffix(suffix)
    return name if name in _METRICS else base if base in _METRICS else None


def attribute_clash(attribute: str) -> str | None:
    """The declared metric that a per-attribute key of `attribute` would be mistaken for (a bias attribute named
    `head` would record `leakage_head`, BISE's bias-head metric), or None."""
    for name in PER_ATTRIBUTE:
        base = _declared_base(per_attribute(name, attribute))
        if base is not None:
            return base
    return None


def metric(name: str | Metric) -> Metric:
    """The declared metric; a derived key (`val_acc`, `macs_dense`, ...) displays like its base metric, a
    per-attribute key (`leakage_left`) like its metric; anything else is shown unscaled with 4 significant
    digits."""
    if isinstance(name, Metric):
        return name
    if name in _METRICS:
        return _METRICS[name]
    base = _declared_base(name)
    if base is not None:
        return dataclasses.replace(_METRICS[base], name=name, title=name,
                                   description=f"{_METRICS[base].description} ({name})")
    for parent in PER_ATTRIBUTE:
        if name.startswith(f"{parent}_"):
            attribute = name.removeprefix(f"{parent}_")
            declared = _METRICS[parent]
            return dataclasses.replace(declared, name=name, title=f"{declared.title} ({attribute})",
                                       description=f"{declared.description}, bias attribute {attribute}")
    return Metric(name, name, 1.0, "", None, "undeclared metric", None)


def heading(name: str | Metric, text: str | None = None) -> str:
    """A column heading with the displayed unit: `heading("acc")` is "accuracy (%)", `heading("acc", "acc")` is
    "acc (%)"."""
    m = metric(name)
    text = m.title if text is None else text
    return f"{text} ({m.unit})" if m.unit else text


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_value(name: str | Metric, value, sign: bool = False) -> str:
    """A stored value as displayed (scaled, fixed precision, no unit): `format_value("acc", 0.961)` is "96.1",
    `format_value("macs", 328.3e6)` is "328.3". Missing values (None, NaN) are "–"; non-numbers print as they are.
    `sign=True` always shows the sign (for differences); a value that rounds to zero never prints as "-0.0"."""
    if is_missing(value):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    shown = float(value) * metric(name).scale
    if math.isnan(shown):
        return MISSING
    decimals = metric(name).decimals
    text = f"{shown:.4g}" if decimals is None else f"{shown:.{decimals}f}"
    if float(text) == 0:
        text = text.lstrip("-")
    return f"+{text}" if sign and not text.startswith("-") else text
