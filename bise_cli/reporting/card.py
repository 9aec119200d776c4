"""A model card per run: `MODEL_CARD.md`, `model_card.json` and `group_accuracy.png`, and `report.md` (the card's
Markdown followed by the search plots, report.py): a run's one human-readable account.

The card follows the outline of the technical documentation the EU AI Act asks of high-risk systems (Annex IV):
1. general description and intended use, 2. data and data governance, 3. accuracy and robustness across groups
(group accuracy matrices target class x bias value before and after BISE, worst group, disparity, bias leakage),
4. efficiency, 5. settings (deviations from the packaged defaults, seeds, versions), 6. known limitations. Section
3 also lists the run's other stages (baselines, alternative mask selections) for comparison. It documents one
run; the provider's risk management, post-market monitoring and conformity assessment (Annex IV points 5-9) are
outside what a run can know, and the card says so.

Numbers come from the run's records and data summary unchanged (model_card.json holds them as stored:
fractions, counts, ms), the group accuracy matrices included: every record carries the test split's
(class x bias value) tables (`group_acc` / `group_count` for one bias attribute, `attribute_group_acc` /
`attribute_group_count` per attribute for several), so a card never re-evaluates a model and always agrees with
the tables. Entry points: `write_run_card(run_dir, cfg, records)` at the end of a run (the pipeline),
`build_card` + `write_card` from plain data, `rebuild_run_card(run_dir)` for a finished run folder.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

from bise_cli import __version__
from bise_cli.core.errors import BiseError
from bise_cli.core.escape import markdown, plot_label
from bise_cli.core.files import read_jsonl, write_json, write_text
from bise_cli.core.names import METRIC_NAMES, format_value, heading, per_attribute
from bise_cli.core.names import metric as declared_metric
from bise_cli.reporting.deviations import deviations
from bise_cli.reporting.labels import stage_label
from bise_cli.reporting.report import write_report
from bise_cli.run import registry
from bise_cli.run.registry import spec as declared_stage

log = logging.getLogger(__name__)

# Before, and after BISE (with its fine-tuning when run): the stages whose StageSpec has `card` set.
CARD_STAGES = tuple(spec.name for spec in registry.SPECS if spec.card)
EXTRA_SPLIT_ROWS = ("val_acc_unbiased", "val_acc_worst_group", "test_conflicting_acc", "wilds_acc_worst_group")
EFFICIENCY_ROWS = ("sparsity_units", "sparsity_weights", "params", "params_dense", "macs", "macs_dense",
                   "latency_ms_b1", "latency_ms_b100", "latency_ms_b1_dense", "latency_ms_b100_dense")
# Section 3's rows: every declared metric but the efficiency ones (section 4), in declared order.
PERFORMANCE_ROWS = tuple(m for m in METRIC_NAMES if m not in EFFICIENCY_ROWS)
MAX_GROUPS = 16        # group lists longer than this are left to the (class x bias value) tables
SMALL_CELL = 30        # test cells with fewer samples than this give noisy group accuracies (flagged)
DECIMALS = 6           # matrices are rounded like the records' `group_acc`
ANNEX_IV_NOTE = ("Structured after the technical documentation of EU AI Act Annex IV (points 1-4: description, "
                 "data, performance across groups, settings). Generated automatically from one run: it is not a "
                 "conformity assessment, and risk management, changes, standards, the declaration of conformity "
                 "and post-market monitoring (points 5-9) are the provider's to document.")


# ----------------------------------------------------------------------------------------------- matrices

def record_matrices(record: dict | None, names: list[str]) -> dict[str, dict]:
    """{attribute: {"accuracy": matrix, "count": matrix}} of the test split, as a record stores them ({} when the
    record has none, e.g. one written before the tables were recorded)."""
    if not record:
        return {}
    if isinstance(record.get("attribute_group_acc"), dict):
        counts = record.get("attribute_group_count") or {}
        return {name: {"accuracy": matrix, "count": counts.get(name)}
                for name, matrix in record["attribute_group_acc"].items()}
    if record.get("group_acc") is not None and len(names) == 1:
        return {names[0]: {"accuracy": record["group_acc"], "count": record.get("group_count")}}
    return {}


def disparity(matrix: list[list[float | None]]) -> float | None:
    """Max - min accuracy over the non-empty cells of a group accuracy matrix (None when none)."""
    values = [v for row in matrix for v in row if v is not None]
    return max(values) - min(values) if values else None


# ------------------------------------------------------------------------------------------------- content

def _first(records: list[dict], stage: str) -> dict | None:
    # A stage's first record is its primary one (later `bise` records are alternative selections).
    return next((r for r in records if r.get("stage") == stage), None)


def _versions() -> dict:
    import torchvision

    versions = {"bise": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                "python": platform.python_version(), "platform": platform.platform()}
    if "transformers" in sys.modules:  # only when the run used it: importing it costs seconds
        versions["transformers"] = sys.modules["transformers"].__version__
    return versions


def _attribute_names(data_summary: dict) -> list[str]:
    if data_summary.get("bias_names"):  # the bundle's attribute names (the pipeline records them)
        return list(data_summary["bias_names"])
    test = (data_summary.get("splits") or {}).get("test") or {}
    return list(test.get("attributes") or {}) or ["bias"]


def _num_bias(data_summary: dict, group_matrices: dict) -> int | None:
    """Values per bias attribute: the width of a group matrix, else the length of a split's bias value counts."""
    for matrices in group_matrices.values():
        for matrix in matrices.values():
            if matrix["accuracy"]:
                return len(matrix["accuracy"][0])
    for row in (data_summary.get("splits") or {}).values():
        counts = row.get("bias_counts") or next(iter((row.get("attributes") or {}).values()), {}).get("bias_counts")
        if counts:
            return len(counts)
    return None


def _derived_preprocessing(cfg: dict, info: dict) -> dict | None:
    """A built-in dataset's preprocessing for data summaries written before the builders stored it."""
    from bise_cli.reporting.export import derive_preprocessing

    try:
        return derive_preprocessing(cfg["dataset"]["name"], info)
    except ImportError:  # an optional extra is missing: the card simply has no preprocessing entry
        return None


def _dataset_groups(info: dict) -> dict | None:
    """The group counts per split a dataset builder recorded ({split: {group: count}}), if any."""
    if isinstance(info.get("groups"), dict):  # CelebA, Multi-Color MNIST
        return info["groups"]
    counts = info.get("counts")  # CivilComments: {split: {"size", "groups"}}
    if isinstance(counts, dict) and all(isinstance(c, dict) and "groups" in c for c in counts.values()):
        return {split: c["groups"] for split, c in counts.items()}
    return None


def _bias_value_names(info: dict, names: list[str]) -> dict[str, list[str]]:
    """{attribute: value names in code order} when the dataset recorded them (dataset=table's `bias_codes`)."""
    codes = info.get("bias_codes")
    if not isinstance(codes, dict):
        return {}
    return {name: [value for value, _ in sorted(codes[name].items(), key=lambda item: item[1])]
            for name in names if isinstance(codes.get(name), dict)}


def _data_section(cfg: dict, records: list[dict], data_summary: dict, names: list[str],
                  group_matrices: dict, num_bias: int | None) -> dict:
    info = data_summary.get("info") or {}
    splits = data_summary.get("splits") or {}
    first = records[0] if records else {}
    attributes = []
    for name in names:
        counts = {}
        for split, row in splits.items():
            row = (row.get("attributes") or {}).get(name, row) if len(names) > 1 else row
            if row.get("bias_counts") is not None:
                counts[split] = row["bias_counts"]
        attributes.append({"name": name, "values": num_bias, "value_counts": counts})
    test_counts = next(({name: m["count"] for name, m in matrices.items()}
                        for matrices in group_matrices.values() if matrices), {})
    return {
        "dataset": cfg["dataset"]["name"],
        "source": first.get("data_source") or info.get("source"),
        "data_sha256": first.get("data_sha256") or (data_summary.get("fingerprint") or {}).get("sha256"),
        "synthetic": bool(info.get("synthetic")),
        "label_noise": info.get("label_noise", (cfg.get("dataset") or {}).get("label_noise")),
        # The training bias-target correlation the dataset was built with (None when it has no nominal value,
        # e.g. a user's table: the config's rho does not apply there).
        "nominal_rho": data_summary.get("nominal_rho"),
        "bias_value_names": _bias_value_names(info, names),
        "splits": {name: {"size": row.get("size"), "aligned_fraction": row.get("aligned_fraction")}
                   for name, row in splits.items()},
        "bias_attributes": attributes,
        "dataset_groups": _dataset_groups(info),
        "pattern_groups": {name: row["groups"] for name, row in splits.items() if isinstance(row.get("groups"), dict)}
        or None,
        "test_group_counts": test_counts,
        "preprocessing": info.get("preprocessing") or _derived_preprocessing(cfg, info),
    }


def _stage_performance(record: dict, matrices: dict, names: list[str], num_bias: int | None) -> dict:
    attributes = [per_attribute("leakage", name) for name in names if len(names) > 1]  # right after `leakage`
    rows = [*[x for m in PERFORMANCE_ROWS for x in ([m, *attributes] if m == "leakage" else [m])],
            "leakage_head_vanilla", *EXTRA_SPLIT_ROWS]
    metrics, intervals = _metric_values(record, rows)
    aligned, conflicting = record.get("acc_aligned"), record.get("acc_conflicting")
    return {
        "metrics": metrics,
        "intervals": intervals,
        "gap_aligned_conflicting": aligned - conflicting if None not in (aligned, conflicting) else None,
        "group_accuracy": {name: m["accuracy"] for name, m in (matrices or {}).items()},
        "disparity": {name: disparity(m["accuracy"]) for name, m in (matrices or {}).items()},
        "leakage_chance": 1 / num_bias if num_bias else None,
        "selection": record.get("selection"),
    }


def _other_stages(records: list[dict], stages: list[str]) -> list[dict]:
    """Every record the before/after columns do not show (baselines, alternative mask selections), with the
    declared metrics it carries and their bootstrap intervals: the run's comparison."""
    shown = [id(_first(records, s)) for s in stages]
    others = []
    for record in records:
        if id(record) not in shown:
            metrics, intervals = _metric_values(record, METRIC_NAMES)
            others.append({"stage": record["stage"], "selection": record.get("selection"), "metrics": metrics,
                           "intervals": intervals})
    return others


def _metric_values(record: dict, names) -> tuple[dict, dict]:
    """The values of `names` that `record` carries, and their bootstrap intervals (`<name>_ci`) where recorded."""
    return ({name: record[name] for name in names if record.get(name) is not None},
            {name: record[f"{name}_ci"] for name in names if isinstance(record.get(f"{name}_ci"), list)})


def _limitations(cfg: dict, records: list[dict], data: dict, performance: dict, audit: bool) -> list[str]:
    names = [a["name"] for a in data["bias_attributes"]]
    test_size = (data["splits"].get("test") or {}).get("size")
    lines = [f"Only the annotated bias attribute(s) {', '.join(names)} are measured; biases the dataset does not "
             "annotate (other spurious features, demographic attributes) are not measured and may remain.",
             f"Every metric is measured on the {data['dataset']} test split only ({test_size} samples); it may not "
             "carry over to other data, populations or deployment conditions."]
    for name, counts in (data["test_group_counts"] or {}).items():
        flat = [c for row in counts for c in row]
        small, empty = sum(0 < c < SMALL_CELL for c in flat), sum(c == 0 for c in flat)
        if small:
            lines.append(f"{small} of the {len(flat)} (class, {name}) test cells hold fewer than {SMALL_CELL} samples: "
                         "their accuracies, the worst-group accuracy and the disparity are noisy.")
        if empty:
            lines.append(f"{empty} of the {len(flat)} (class, {name}) test cells are empty: not measured.")
    bootstrap = cfg.get("bootstrap") or {}
    if any(stage["intervals"] for stage in performance.values()):
        lines.append(f"Confidence intervals: {100 * (1 - bootstrap.get('alpha', 0.05)):g} % percentile bootstrap "
                     f"({bootstrap.get('n')} resamples of the test predictions); they cover test-sample noise, not "
                     "the variation between training seeds.")
    else:
        lines.append("No confidence intervals in the records (bootstrap.n = 0): differences of a few points may be "
                     "noise.")
    lines.append(f"One training seed (seed = {cfg.get('seed')}); seed-to-seed variation is not captured "
                 "(run several seeds and aggregate them with bise table).")
    if any("leakage" in stage["metrics"] for stage in performance.values()):
        lines.append("Bias leakage is the test accuracy of a freshly trained linear probe on the final bottleneck; "
                     "information that is recoverable non-linearly or from earlier layers is not measured.")
    else:
        lines.append("Bias leakage was not measured (leakage_probe.epochs = 0).")
    device = next((r.get("latency_device") for r in records if r.get("latency_device")), None)
    lines.append(f"Latency was measured once on {device or 'the run device'} (median of timed blocks); it depends on "
                 "hardware, thread count and load.")
    if data["synthetic"]:
        lines.append("The data are synthetic: the numbers say nothing about real data.")
    if audit:
        lines.append("Audit only: the model was evaluated as given and not pruned; no BISE results.")
    return lines


def _unused_settings(cfg: dict, records: list[dict]) -> tuple[str, ...]:
    """Config sections that some stage reads but no stage of this run did (an audit never reads `pruning`), as
    prefixes ("pruning."): left out of the deviations. What each stage reads is its StageSpec's (registry.py)."""
    ran = {r.get("stage") for r in records} & set(registry.RUNNABLE)
    read = {section for name in ran for section in registry.visible_sections(name, cfg)}
    readable = {section for name in registry.RUNNABLE for section in registry.visible_sections(name, cfg)}
    return tuple(f"{section}." for section in sorted(readable - read))


def _what_bise_did(cfg: dict, bise: dict) -> str:
    pruning = cfg.get("pruning") or {}
    gamma = pruning.get("gamma", 1.0)
    objective = "the reweighted cross-entropy" + (f" plus a mutual-information penalty (gamma = {gamma}) between "
                                                   "the bias attribute(s) and the bottleneck" if gamma else
                                                   " alone (no mutual-information penalty: gamma = 0)")
    labels = "pseudo bias labels of an identification model" if cfg.get("bias_labels") == "identification" else \
        "the annotated bias labels"
    return (f"searched binary structured masks on the frozen vanilla model, minimising {objective}, with "
            f"{labels}; then physically removed the switched-off units: "
            f"{format_value('sparsity_units', bise.get('sparsity_units'))} % of the gated units, "
            f"{format_value('sparsity_weights', bise.get('sparsity_weights'))} % of the conv/linear weights")


def build_card(cfg: dict, records: list[dict], data_summary: dict) -> dict:
    """The model card as plain data (what model_card.json holds), from a run's records and data summary. Works
    for a vanilla-only run (an audit)."""
    stages = [s for s in CARD_STAGES if _first(records, s) is not None]
    audit = stages == ["vanilla"]
    names = _attribute_names(data_summary)
    group_matrices = {s: record_matrices(_first(records, s), names) for s in stages}
    data = _data_section(cfg, records, data_summary, names, group_matrices, _num_bias(data_summary, group_matrices))
    num_bias = data["bias_attributes"][0]["values"]
    performance = {s: _stage_performance(_first(records, s), group_matrices.get(s), names, num_bias) for s in stages}
    bise = _first(records, "bise")
    classes = (data.get("preprocessing") or {}).get("class_names")
    general = {
        "task": f"{data['dataset']} classification" + (f" into {len(classes)} classes ({', '.join(classes)})"
                                                       if classes else ""),
        "backbone": cfg["backbone"]["name"],
        "note": cfg.get("note") or None,   # e.g. "reduced-scale demo: not the paper's numbers", shown first
        "model": "vanilla model evaluated as given (audit)" if audit else "BISE subnetwork (pruned_bise.pt)",
        "vanilla_checkpoint": cfg.get("vanilla_checkpoint"),
        "what_bise_did": None if bise is None else _what_bise_did(cfg, bise),
        "stages": {s: ("the model read from vanilla_checkpoint, evaluated as given"
                       if s == "vanilla" and cfg.get("vanilla_checkpoint") else declared_stage(s).description)
                   for s in stages},
        "intended_use": "research on and measurement of bias in classifiers: how much a model relies on a known "
                        "bias attribute, before and after removing bias-carrying units",
        "not_intended_for": "decisions about people (employment, credit, education, access to services, law "
                            "enforcement, ...) without a further assessment of its own: such high-risk uses need "
                            "their own risk management, data governance and conformity assessment",
    }
    settings = {
        "seed": cfg.get("seed"),
        "seeding": "each stage seeds torch from (seed, stage name), so a resumed run draws the same numbers",
        "deviations_from_defaults": [{"key": k, "value": v, "default": d} for k, v, d in deviations(cfg)
                                     if not k.startswith(_unused_settings(cfg, records))],
        "stages_run": list(dict.fromkeys(r["stage"] for r in records)),
        "device": cfg.get("device"),
        "precision": cfg.get("precision"),
        "deterministic": cfg.get("deterministic"),
        "versions": _versions(),
        "config_hash": None,   # filled in by write_card from the run's status.json
    }
    efficiency = {s: {name: _first(records, s).get(name) for name in (*EFFICIENCY_ROWS, "latency_device")}
                  for s in stages}
    return {
        "card": "bise model card 2",  # 2: other_stages, general.note (no longer a limitation)
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kind": "audit" if audit else "bise",
        "annex_iv": ANNEX_IV_NOTE,
        "general": general,
        "data": data,
        "performance": performance,
        "other_stages": _other_stages(records, stages),
        "efficiency": efficiency,
        "settings": settings,
        "limitations": _limitations(cfg, records, data, performance, audit),
    }


# -------------------------------------------------------------------------------------------------- render

def _title(name: str) -> str:
    """A row title: the declared metric's heading; `val_acc_unbiased` reads "val: unbiased (%)"."""
    for prefix in ("val_", "test_conflicting_", "wilds_"):
        if name.startswith(prefix):
            return f"{prefix.rstrip('_').replace('_', ' ')}: {heading(name.removeprefix(prefix))}"
    return heading(name)


def _pct(value) -> str:
    return format_value("acc", value)


def _cell(name: str, value, interval=None) -> str:
    text = format_value(name, value)
    if isinstance(interval, list) and len(interval) == 2:
        text += f" [{format_value(name, interval[0])}, {format_value(name, interval[1])}]"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; every cell is escaped here (class and bias value names, split and group names come from
    the user's data), so no caller can forget it."""
    return ["| " + " | ".join(map(markdown, header)) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(map(markdown, row)) + " |" for row in rows], ""]


def _matrix_lines(matrix: list[list], classes: list[str] | None, fmt, values: list[str] | None = None) -> list[str]:
    width = len(matrix[0]) if matrix else 0
    values = values if values and len(values) == width else [str(v) for v in range(width)]
    rows = [[(classes[i] if classes and i < len(classes) else str(i)), *[fmt(v) for v in row]]
            for i, row in enumerate(matrix)]
    return _table(["class \\ bias value", *values], rows)


def _without_repeats(names: list[str], metrics: list[dict]) -> list[str]:
    """`names` without `acc_avg_group` where it equals `acc_unbiased` in every one of `metrics` that has it (the
    same number unless another group definition is chosen)."""
    if all(m.get("acc_avg_group") in (None, m.get("acc_unbiased")) for m in metrics):
        return [n for n in names if n != "acc_avg_group"]
    return names


def _other_stage_lines(others: list[dict]) -> list[str]:
    """The run's other stages (card["other_stages"]), one row each, every declared metric one of them carries."""
    if not others:
        return []
    metrics = [x["metrics"] for x in others]
    names = _without_repeats([m for m in METRIC_NAMES if any(m in x for x in metrics)], metrics)
    rows = [[stage_label(x), *[_cell(n, x["metrics"].get(n), x["intervals"].get(n)) for n in names]] for x in others]
    return ["The run's other stages, for comparison (test split; efficiency included):", "",
            *_table(["stage", *map(heading, names)], rows)]


def render_markdown(card: dict) -> str:
    """MODEL_CARD.md from a card built by `build_card`. Every value that comes from the user's data or command
    line (dataset, class and bias value names, attribute names, paths, notes, settings) goes through
    `bise_cli.core.escape.markdown`, so it shows as text and never as Markdown or HTML."""
    g, d, p, e, s = card["general"], card["data"], card["performance"], card["efficiency"], card["settings"]
    stages = list(p)
    titles = [declared_stage(x).title for x in stages]
    classes = (d.get("preprocessing") or {}).get("class_names")
    lines = [f"# Model card: {markdown(d['dataset'])} / {markdown(g['backbone'])} "
             f"({'audit' if card['kind'] == 'audit' else 'BISE'})", ""]
    if g.get("note"):  # the run's own caveat (e.g. a reduced-scale demo) comes before any number
        lines += [f"**{markdown(g['note'])}**", ""]
    lines += [f"Generated by bise {markdown(s['versions']['bise'])} on {card['generated']}. {card['annex_iv']}", "",
              "## 1. General description and intended use", "",
              f"- Task: {markdown(g['task'])}.",
              f"- Model: {g['model']}, backbone {markdown(g['backbone'], code=True)}."]
    if g["vanilla_checkpoint"]:
        lines.append(f"- Vanilla model read from {markdown(g['vanilla_checkpoint'], code=True)}.")
    if g["what_bise_did"]:
        lines.append(f"- What BISE did: {g['what_bise_did']}.")
    lines += ["- Stages documented: " + "; ".join(f"{declared_stage(x).title}: {desc}" for x, desc in
                                                   g["stages"].items()) + ".",
              f"- Intended use: {g['intended_use']}.", f"- Not intended for: {g['not_intended_for']}.", "",
              "## 2. Data and data governance", "",
              f"- Dataset: {markdown(d['dataset'], code=True)}" + (" (SYNTHETIC)" if d["synthetic"] else "")
              + (", nominal training bias-target correlation " + " / ".join(markdown(r) for r in d["nominal_rho"])
                 if d.get("nominal_rho") else "")
              + ".",
              f"- Source: {markdown(d['source'])}.",
              f"- Content fingerprint (sha256 of the loaded tensors): {markdown(d['data_sha256'], code=True)}."]
    if d.get("label_noise"):
        lines.append(f"- Label noise injected into train/search: {markdown(d['label_noise'])}.")
    if d.get("preprocessing"):
        pre = {k: v for k, v in d["preprocessing"].items() if k != "class_names"}
        lines.append(f"- Preprocessing: {markdown(json.dumps(pre), code=True)}.")
    lines += ["", *_table(["split", "size", "aligned fraction"],
                          [[name, row["size"], row["aligned_fraction"]] for name, row in d["splits"].items()])]
    for attribute in d["bias_attributes"]:
        lines += [f"Bias attribute {markdown(attribute['name'], code=True)} ({attribute['values']} values), samples "
                  "per value:", "",
                  *_table(["split", "counts per bias value"],
                          [[split, " ".join(map(str, c))] for split, c in attribute["value_counts"].items()])]
    for name, counts in (d["test_group_counts"] or {}).items():
        lines += [f"Test samples per (class, {markdown(name, code=True)}) cell:", "",
                  *_matrix_lines(counts, classes, str, d.get("bias_value_names", {}).get(name))]
    groups, title = (d["pattern_groups"], "Alignment-pattern groups (aligned / conflicting per attribute):") \
        if d.get("pattern_groups") else (d.get("dataset_groups"), "Groups as the dataset defines them:")
    # Many groups (e.g. 10 classes x 10 colours) are unreadable in one line: the cell table above has them.
    groups = {split: row for split, row in (groups or {}).items() if isinstance(row, dict) and len(row) <= MAX_GROUPS}
    if groups:
        lines += [title, "", *_table(["split", "samples per group"],
                                     [[split, ", ".join(f"{k} {v}" for k, v in row.items())]
                                      for split, row in groups.items()])]

    lines += ["## 3. Accuracy and robustness across groups (test split)", ""]
    change = "bise" in stages and "vanilla" in stages
    header = ["metric", *titles, *(["BISE - vanilla"] if change else [])]
    names = [a["name"] for a in d["bias_attributes"]]
    rows = []
    metric_names = _without_repeats([m for m in dict.fromkeys(m for stage in p.values() for m in stage["metrics"])
                                     if m != "leakage_head_vanilla"], [x["metrics"] for x in p.values()])

    def value(stage: str, name: str):
        # BISE's own bias head scored on the vanilla model is recorded with the bise stage: shown as vanilla's.
        if stage == "vanilla" and name == "leakage_head" and "bise" in p:
            return p["bise"]["metrics"].get("leakage_head_vanilla")
        return p[stage]["metrics"].get(name)

    for name in metric_names:
        row = [_title(name)] + [_cell(name, value(x, name), p[x]["intervals"].get(name)) for x in stages]
        if change:
            a, b = value("bise", name), value("vanilla", name)
            row.append(format_value(name, a - b, sign=True) if None not in (a, b) else format_value(name, None))
        rows.append(row)
    derived = [("aligned - conflicting gap (%)", lambda x: p[x]["gap_aligned_conflicting"])]
    derived += [(f"disparity {n}: max - min group accuracy (%)", lambda x, n=n: p[x]["disparity"].get(n))
                for n in names]
    for title, get in derived:
        row = [title] + [_pct(get(x)) for x in stages]
        if change:
            a, b = get("bise"), get("vanilla")
            row.append(format_value("acc", a - b, sign=True) if None not in (a, b) else _pct(None))
        rows.append(row)
    lines += _table(header, rows)
    chance = next((x["leakage_chance"] for x in p.values() if x["leakage_chance"]), None)
    if chance:
        lines += [f"Bias probe accuracy at chance level: {_pct(chance)} %. Intervals in brackets: bootstrap over the "
                  "test predictions.", ""]
    lines += _other_stage_lines(card.get("other_stages") or [])  # beside the main table, before the matrices
    for name in names:
        for x in stages:
            matrix = p[x]["group_accuracy"].get(name)
            if matrix:
                lines += [f"Group accuracy (%), {declared_stage(x).title}, class x {markdown(name, code=True)}:", "",
                          *_matrix_lines(matrix, classes, _pct, d.get("bias_value_names", {}).get(name))]
    if any(p[x]["group_accuracy"] for x in stages):
        lines += ["![group accuracy before and after](group_accuracy.png)", ""]

    lines += ["## 4. Efficiency", ""]
    # The vanilla column is the dense model, so the records' *_dense copies are left out here (kept in the JSON).
    shown = [n for n in EFFICIENCY_ROWS if not n.endswith("_dense") and any(e[x].get(n) is not None for x in stages)]
    rows = [[heading(name), *[format_value(name, e[x].get(name)) for x in stages]] for name in shown]
    lines += _table(["metric", *titles], rows)
    devices = sorted({str(e[x].get("latency_device")) for x in stages if e[x].get("latency_device")})
    if devices:
        lines += [f"Latency measured on: {markdown(', '.join(devices))}.", ""]

    lines += ["## 5. Settings", "", f"- Seed: {markdown(s['seed'])} ({s['seeding']}).",
              f"- Stages run: {markdown(', '.join(s['stages_run']))}.",
              f"- Device: {markdown(s['device'])}" + (f" (ran on {markdown(', '.join(devices))})" if devices else "")
              + f", precision {markdown(s['precision'])}, deterministic algorithms: {markdown(s['deterministic'])}."]
    if s.get("config_hash"):
        lines.append(f"- Run identity (config hash): {markdown(s['config_hash'], code=True)}.")
    lines.append("- Versions: " + ", ".join(f"{k} {markdown(v)}" for k, v in s["versions"].items()) + ".")
    lines += ["- Deviations from the packaged defaults (the paper's protocol):"]
    lines += [f"  - {markdown(x['key'], code=True)} = {markdown(repr(x['value']))} (default: "
              f"{markdown(repr(x['default']))})" for x in s["deviations_from_defaults"]] or ["  - none"]
    # Limitation lines embed attribute names and the run's note: escaped whole (they are plain text).
    lines += ["", "## 6. Known limitations", "", *[f"- {markdown(line)}" for line in card["limitations"]], ""]
    return "\n".join(lines)


def plot_group_accuracy(card: dict, path: str | Path) -> Path | None:
    """Heat maps of the group accuracy matrices, one row per bias attribute, one column per stage (None when the
    card has no matrices)."""
    from bise_cli.reporting.plots import plt  # pyplot with the Agg backend chosen first

    performance = card["performance"]
    stages = [x for x in performance if performance[x]["group_accuracy"]]
    if not stages:
        return None
    names = list(performance[stages[0]]["group_accuracy"])
    classes = (card["data"].get("preprocessing") or {}).get("class_names")
    fig, axes = plt.subplots(len(names), len(stages), figsize=(3.4 * len(stages), 3.0 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, x in enumerate(stages):
            ax = axes[i][j]
            matrix = performance[x]["group_accuracy"].get(name) or [[None]]
            values = torch.tensor([[math.nan if v is None else 100 * v for v in row] for row in matrix])
            image = ax.imshow(values.numpy(), vmin=0, vmax=100, cmap="viridis", aspect="auto")
            if values.numel() <= 100:  # numbers fit in the cells up to 10 x 10
                for (r, c), v in zip(torch.cartesian_prod(torch.arange(values.shape[0]),
                                                          torch.arange(values.shape[1])).tolist(),
                                     values.flatten().tolist(), strict=True):
                    if not math.isnan(v):
                        ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if v < 60 else "black")
            ax.set_title(plot_label(f"{declared_stage(x).title}: {name}"), fontsize=9)
            ax.set_xlabel("bias value", fontsize=8)
            ax.set_ylabel("target class", fontsize=8)
            if values.shape[1] <= 20:
                ax.set_xticks(range(values.shape[1]))
            if classes and len(classes) == values.shape[0] and len(classes) <= 10:
                ax.set_yticks(range(len(classes)), [plot_label(c) for c in classes], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.8, label=heading(declared_metric("acc"), "group accuracy"))
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_card(run_dir: str | Path, card: dict) -> Path:
    """Write model_card.json, MODEL_CARD.md, group_accuracy.png and report.md (the same Markdown text, then the
    search plots) into `run_dir`; returns the card's Markdown path. A plotting problem never fails the card
    (logged)."""
    run_dir = Path(run_dir)
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        status = {}
    if isinstance(status, dict) and status.get("config_hash"):
        card = {**card, "settings": {**card["settings"], "config_hash": status["config_hash"]}}
    write_json(run_dir / "model_card.json", card)
    try:
        plot_group_accuracy(card, run_dir / "group_accuracy.png")
    except Exception as error:  # a plot is a convenience: log, keep the card
        log.warning("group accuracy plot skipped: %s", error)
    text = render_markdown(card)
    write_report(run_dir, text)  # rendered once: the two documents cannot disagree
    return write_text(run_dir / "MODEL_CARD.md", text)


# ----------------------------------------------------------------------------------------------- entry points

def write_run_card(run_dir: str | Path, cfg: dict, records: list[dict]) -> Path:
    """The card (and report.md) of a run from its records and its `data_summary.json`; returns the path of
    MODEL_CARD.md."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "data_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return write_card(run_dir, build_card(cfg, records, summary))


def rebuild_run_card(run_dir: str | Path) -> Path:
    """The card (and report.md) of a finished run folder (its config.yaml, metrics.jsonl and data_summary.json),
    e.g. after an upgrade of bise; nothing is re-evaluated."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise BiseError(f"{run_dir} holds no records (metrics.jsonl): not a bise run folder")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return write_run_card(run_dir, cfg or {}, read_jsonl(run_dir / "metrics.jsonl"))
