"""The architecture's declarations hold: one StageSpec per stage, setting roles declared once, complete cache keys,
no import cycles.

The cache-key completeness test composes every dataset x backbone preset and checks that each leaf of the config
is either read by some stage (so in that stage's key) or declared as not changing a result; changing a
results-relevant setting must change the keys of exactly the stages that read it. Keys are computed in-process
(`stages.stage_key` from the vanilla key outwards), without data or training.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bise_cli.core.defaults import CONF_DIR, NOT_RESULT_SETTINGS, SETTING_ROLES
from bise_cli.run import registry, stages
from bise_cli.run.records import flatten_config

from conftest import TINY_OVERRIDES, compose_config

PACKAGE = Path(__file__).resolve().parents[1] / "bise_cli"
DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))


# ------------------------------------------------------------------------------------------------ import graph
def _import_graph() -> dict[str, set[str]]:
    """{module: the bise_cli modules it imports}, every import statement counted (also those inside functions)."""
    modules = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
               for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets.add(base)
                targets |= {f"{base}.{alias.name}" for alias in node.names}  # `from bise_cli import stages`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_import_graph_of_bise_cli_has_no_cycles():
    graph = _import_graph()
    assert "bise_cli.run.pipeline" in graph and "bise_cli.run.stages" in graph["bise_cli.run.pipeline"]
    # A package's __init__ is imported with any of its submodules; edges into a package's own __init__ from its
    # submodules are how Python loads them, not a cycle of ours.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if module.startswith(f"{target}."):
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


# The subpackages of bise_cli, bottom to top, with the subpackages each may import. `run` and `reporting` share the
# top: the pipeline writes the card and the report, and reporting reads the records and the stage registry.
LAYERS = {
    "core": {"core"},
    "data": {"core", "data"},
    "models": {"core", "data", "models"},  # the BERT backbone resolves the bundled text model as the tokenizer does
    "method": {"core", "data", "models", "method"},
    "baselines": {"core", "data", "models", "method", "baselines"},
    "run": {"core", "data", "models", "method", "baselines", "run", "reporting"},
    "reporting": {"core", "data", "models", "method", "baselines", "run", "reporting"},
}
# The package itself (`__version__`, imported with every submodule anyway) and the command line sit on top.
TOP_LEVEL = {"bise_cli", "bise_cli.__main__", "bise_cli.cli", "bise_cli.examples", "bise_cli.examples.own_model"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_sits_in_a_layer_and_imports_only_the_layers_below_it():
    graph = _import_graph()
    assert set(graph) - TOP_LEVEL, "no modules found"
    stray = sorted(m for m in graph if m not in TOP_LEVEL and _layer(m) is None)
    assert not stray, f"modules outside the layers {sorted(LAYERS)}: {stray}"
    upward = [f"{module} -> {target}" for module, targets in sorted(graph.items()) if _layer(module)
              for target in sorted(targets - {"bise_cli"}) if _layer(target) not in LAYERS[_layer(module)]]
    assert not upward, "imports against the layering: " + "; ".join(upward)
    # Only `python -m bise_cli` imports the command line.
    assert {m for m, targets in graph.items() if "bise_cli.cli" in targets} == {"bise_cli.__main__"}


def test_every_module_imports():
    import importlib

    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


# ----------------------------------------------------------------------------------------------- the registry
def test_each_stage_is_declared_once_and_its_functions_resolve():
    names = [spec.name for spec in registry.SPECS]
    assert len(names) == len(set(names))
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for name in names:
        assert source.count(f'StageSpec("{name}"') == 1, name
    for spec in registry.SPECS:
        if spec.runnable:
            assert callable(spec.function()) and spec.version is not None
            assert spec.parent is None or spec.parent in registry.RUNNABLE
        if spec.finish:
            assert callable(spec.function("finish"))
    from bise_cli.run.pipeline import STAGES
    from bise_cli.run.validate import validate_config

    assert STAGES == registry.RUNNABLE
    assert validate_config(compose_config([*TINY_OVERRIDES, f"stages=[{','.join(registry.RUNNABLE)}]"])) == []


def test_a_stage_reading_a_section_it_does_not_declare_fails():
    cfg = compose_config(TINY_OVERRIDES)
    view = stages.config_view(cfg, registry.visible_sections("lff", cfg), "lff")
    assert view["baselines"]["lff"] == cfg["baselines"]["lff"] and view["train"] == cfg["train"]
    with pytest.raises(stages.UndeclaredSetting, match="stage lff reads finetune"):
        view["finetune"]
    with pytest.raises(stages.UndeclaredSetting, match="stage lff reads baselines.dfr"):
        view["baselines"].get("dfr")


# ---------------------------------------------------------------------------------- settings and cache keys
def _keys(cfg: dict) -> dict[str, str]:
    """{stage: its cache key's hash} for every runnable stage, built as the pipeline builds them."""
    from bise_cli.run.records import config_hash

    ctx = stages.Context(cfg, None, torch.device("cpu"), None, None, "data-sha")
    keys = {"vanilla": ctx.eval_key(ctx.train_key())}
    for name in registry.RUNNABLE[1:]:
        spec = registry.spec(name)
        keys[name] = stages.stage_key(spec, cfg, keys[spec.parent])
    return {name: config_hash(key) for name, key in keys.items()}


def _leaves(cfg: dict, prefix: str = ""):
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _covered(leaf: str, sections) -> bool:
    return any(leaf == s or leaf.startswith(f"{s}.") for s in sections)


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_setting_is_in_a_cache_key_or_declared_not_to_change_a_result(dataset):
    """Every leaf of every dataset x backbone preset (both kinds of bias labels) is read by a stage or declared
    by SETTING_ROLES as not changing a result."""
    not_result = [*NOT_RESULT_SETTINGS, *SETTING_ROLES["plan"]]
    for backbone in BACKBONES:
        for labels in ("ground_truth", "identification"):
            cfg = compose_config([f"dataset={dataset}", f"backbone={backbone}", f"bias_labels={labels}"])
            read = {s for name in registry.RUNNABLE for s in registry.visible_sections(name, cfg)}
            missing = [leaf for leaf in _leaves(cfg) if not _covered(leaf, read) and not _covered(leaf, not_result)]
            assert not missing, f"dataset={dataset} backbone={backbone}: read by no stage's key: {missing}"


MASKS = {"bise", "bise_ft", "random", "magnitude"}
EVERY = set(registry.RUNNABLE)


@pytest.mark.parametrize("override, changed", [
    ("precision=bf16", EVERY),
    ("leakage_probe.epochs=7", EVERY),
    ("train.lr=0.05", EVERY),
    ("finetune.lr=0.5", {"bise_ft", "reweighted_ft"}),
    ("pruning.gamma=0.5", MASKS | {"ffw"}),
    ("reweighting=none", MASKS | {"reweighted_ft"}),
    ("identification.epochs=3", MASKS | {"reweighted_ft", "dfr_train", "bcon_bbal"}),
    ("baselines.softcon.temperature=0.2", {"softcon"}),
    ("baselines.lff.q=0.5", {"lff"}),
    ("baselines.dfr.n_subsamples=3", {"dfr_train", "dfr_val"}),
    ("dataset.root=/elsewhere", set()),
    ("output_root=/elsewhere", set()),
    ("threads=3", set()),
    ("data_on_device=never", set()),
])
def test_a_setting_changes_the_cache_keys_of_exactly_the_stages_that_read_it(override, changed):
    base = _keys(compose_config(TINY_OVERRIDES))
    now = _keys(compose_config([*TINY_OVERRIDES, override]))
    assert {name for name in base if base[name] != now[name]} == changed


def test_pseudo_bias_labels_key_the_training_recipe_even_with_a_checkpoint(tmp_path):
    """The identification model trains with `train`: with bias_labels=identification every stage using bias
    labels keys it, also when a checkpoint replaces the vanilla training (whose key then leaves `train` out)."""
    checkpoint = tmp_path / "model.pt"
    torch.save({}, checkpoint)
    common = [*TINY_OVERRIDES, f"vanilla_checkpoint={checkpoint}"]
    with_labels = MASKS | {"reweighted_ft", "dfr_train", "lff", "bcon_bbal"}
    for labels, changed in (("ground_truth", {"lff"}), ("identification", with_labels)):
        base = _keys(compose_config([*common, f"bias_labels={labels}"]))
        now = _keys(compose_config([*common, f"bias_labels={labels}", "train.lr=0.05"]))
        assert {name for name in base if base[name] != now[name]} == changed, labels


def test_hydra_folder_names_leave_out_exactly_the_settings_that_never_change_a_result():
    hydra = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["hydra"]
    excluded = hydra["job"]["config"]["override_dirname"]["exclude_keys"]
    assert sorted(excluded) == sorted(s for s in NOT_RESULT_SETTINGS if s != "hydra")


def test_records_leave_out_paths_execution_and_plan_settings():
    cfg = compose_config(["dataset=cifar10c", "dataset.cache_dir=/x", "threads=2", "+record_keys={ablation: ce}"])
    fields = flatten_config(cfg)
    for role in ("paths", "execution", "plan"):
        for setting in SETTING_ROLES[role]:
            assert not _covered(setting, [f for f in fields if f not in ("dataset", "backbone")]), setting
            assert setting not in fields


def test_a_cache_folder_changes_no_cache_key():
    base = _keys(compose_config(["dataset=cifar10c"]))
    assert _keys(compose_config(["dataset=cifar10c", "dataset.cache_dir=/elsewhere"])) == base


def test_bise_run_with_a_cache_dir_gives_records_without_it(tmp_path):
    """Through the CLI: `dataset.cache_dir=X` (where files are) is in no record's keys, nor in the folder name.
    A tiny image table (dataset=table) is a dataset with a cache folder."""
    from test_table_data import TINY, write_table

    folder = tmp_path / "data"
    folder.mkdir()
    write_table(folder, size=(28, 28))
    result = subprocess.run([sys.executable, "-m", "bise_cli", "run", "dataset=table", "dataset.bias_columns=[place]",
                             f"dataset.manifest={folder / 'manifest.csv'}", *TINY, "leakage_probe.epochs=0",
                             "stages=[vanilla]", f"dataset.cache_dir={tmp_path / 'elsewhere'}", "output_root=out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    [folder] = list((tmp_path / "out" / "runs").iterdir())
    [record] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert "dataset.cache_dir" not in record["keys"] and "dataset.cache_dir" not in record
    assert "dataset.cache_dir" not in folder.name and "elsewhere" not in folder.name
    assert "dataset.manifest" in record["keys"]
    assert (tmp_path / "elsewhere").is_dir()  # the cache folder was used
