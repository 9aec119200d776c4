"""The model card (group accuracy matrices, the card of a tiny run, numbers equal to the records), `bise audit`
on a saved checkpoint and `bise gates`."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import MissingConfigException

from bise_cli import cli
from bise_cli.core.defaults import CONF_DIR
from bise_cli.core.errors import BiseError
from bise_cli.core.files import read_jsonl
from bise_cli.models import build_backbone
from bise_cli.reporting.card import build_card, disparity, rebuild_run_card, record_matrices, render_markdown
from bise_cli.run import pipeline

from conftest import TINY_OVERRIDES, compose_config, run_bise

MLP = ["backbone=mlp", "~backbone.width"]  # the smoke preset sets simple_convnet's width


def test_matrices_come_from_the_records_and_disparity_spans_the_non_empty_cells():
    assert disparity([[0.5, 1.0, None], [0.0, 0.5, None]]) == 1.0
    single = {"group_acc": [[0.5, 1.0], [None, 0.25]], "group_count": [[2, 1], [0, 4]]}
    assert record_matrices(single, ["colour"]) == {"colour": {"accuracy": single["group_acc"],
                                                              "count": single["group_count"]}}
    several = {"group_count": {"both_aligned": 3}, "attribute_group_acc": {"left": [[1.0]], "right": [[0.5]]},
               "attribute_group_count": {"left": [[3]], "right": [[2]]}}
    assert record_matrices(several, ["left", "right"]) == {"left": {"accuracy": [[1.0]], "count": [[3]]},
                                                          "right": {"accuracy": [[0.5]], "count": [[2]]}}
    assert record_matrices({"acc": 0.5}, ["colour"]) == {}  # a record from before the tables were kept


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny real run with vanilla, BISE and BISE+FT and the card the pipeline wrote. The MLP is the cheapest
    backbone on BiasedMNIST's 3 x 28 x 28 images."""
    root = tmp_path_factory.mktemp("card")
    cfg = compose_config([*TINY_OVERRIDES, *MLP, f"output_root={root / 'outputs'}", "stages=[vanilla,bise,bise_ft]",
                          "bootstrap.n=20"])
    records = pipeline.run(cfg, root / "run")
    return root / "run", cfg, records


def test_card_numbers_equal_the_records(tiny_run):
    run_dir, cfg, records = tiny_run
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["info"]["preprocessing"]["kind"] == "image"  # stored by the dataset builder (bise export)
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["kind"] == "bise" and list(card["performance"]) == ["vanilla", "bise", "bise_ft"]
    for record in records:
        if record["stage"] not in card["performance"] or record.get("selection"):
            continue
        stage = card["performance"][record["stage"]]
        assert stage["metrics"] and all(record[name] == value for name, value in stage["metrics"].items())
        assert all(record[f"{name}_ci"] == value for name, value in stage["intervals"].items())
        assert stage["intervals"]["acc_worst_group"] == record["acc_worst_group_ci"]
        assert stage["group_accuracy"]["colour"] == record["group_acc"]
        assert stage["disparity"]["colour"] == disparity(record["group_acc"])
        assert stage["gap_aligned_conflicting"] == record["acc_aligned"] - record["acc_conflicting"]
        efficiency = card["efficiency"][record["stage"]]
        assert all(record.get(name) == value for name, value in efficiency.items())
    assert card["data"]["splits"]["test"]["size"] == summary["splits"]["test"]["size"]
    assert card["data"]["data_sha256"] == records[0]["data_sha256"]
    assert card["data"]["bias_attributes"][0]["value_counts"]["train"] == summary["splits"]["train"]["bias_counts"]
    assert sum(map(sum, card["data"]["test_group_counts"]["colour"])) == summary["splits"]["test"]["size"]
    assert {"key": "rho", "value": 0.9, "default": 0.99} in card["settings"]["deviations_from_defaults"]
    assert card["settings"]["versions"]["torch"] == torch.__version__
    text = (run_dir / "MODEL_CARD.md").read_text()
    for heading in ("## 1. General", "## 2. Data", "## 3. Accuracy", "## 4. Efficiency", "## 5. Settings",
                    "## 6. Known limitations", "not a conformity assessment", "decisions about people"):
        assert heading in text
    assert (run_dir / "group_accuracy.png").stat().st_size > 5000
    # The records the before/after columns do not show (alternative selections here) are the card's other stages.
    firsts = [next(r for r in records if r["stage"] == s) for s in card["performance"]]
    others = [r for r in records if not any(r is first for first in firsts)]
    assert [(o["stage"], o["selection"]) for o in card["other_stages"]] == \
        [(r["stage"], r.get("selection")) for r in others]
    assert all(r[name] == value for o, r in zip(card["other_stages"], others, strict=True)
               for name, value in o["metrics"].items())
    # report.md is that same text, then the search plots: nothing in it is rendered a second time.
    report = (run_dir / "report.md").read_text()
    assert report.startswith(text) and report[len(text):].startswith("\n## Plots of the mask search\n")
    assert not any(line.startswith("|") for line in report[len(text):].splitlines())


def test_vanilla_only_card_is_an_audit(tiny_run):
    run_dir, cfg, records = tiny_run
    summary = json.loads((run_dir / "data_summary.json").read_text())
    card = build_card(cfg, [r for r in records if r["stage"] == "vanilla"], summary)
    assert card["kind"] == "audit" and list(card["performance"]) == ["vanilla"]
    assert card["performance"]["vanilla"]["group_accuracy"] == {"colour": records[0]["group_acc"]}
    assert not any(d["key"].startswith(("pruning.", "finetune.")) for d in card["settings"]["deviations_from_defaults"])
    assert any(line.startswith("Audit only") for line in card["limitations"])
    assert "## 3. Accuracy" in render_markdown(card)


def test_audit_command_on_a_saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    torch.save(build_backbone("mlp", 10).state_dict(), tmp_path / "model.pt")
    result = run_bise("audit", *TINY_OVERRIDES, *MLP, "bootstrap.n=0", "vanilla_checkpoint=model.pt",
                      "output_root=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    [folder] = list((tmp_path / "out" / "audits").iterdir())
    assert f"model card: {folder / 'MODEL_CARD.md'}" in result.stdout.replace("\n", "")
    assert [r["stage"] for r in read_jsonl(folder / "metrics.jsonl")] == ["vanilla"]
    card = json.loads((folder / "model_card.json").read_text())
    assert card["kind"] == "audit" and card["general"]["vanilla_checkpoint"] == "model.pt"
    assert len(card["performance"]["vanilla"]["group_accuracy"]["colour"]) == 10
    assert not (folder / "pruned_bise.pt").exists()


def test_a_card_is_rebuilt_from_a_finished_run_folder_alone(tiny_run, tmp_path):
    run_dir, _, _ = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.yaml", "status.json", "metrics.jsonl", "data_summary.json"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    rebuild_run_card(copy)
    rebuilt, original = (json.loads((folder / "model_card.json").read_text()) for folder in (copy, run_dir))
    assert {k: v for k, v in rebuilt.items() if k != "generated"} == \
        {k: v for k, v in original.items() if k != "generated"}
    with pytest.raises(BiseError, match="holds no records"):
        rebuild_run_card(tmp_path)


def test_audit_refuses_other_stages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "stages=[vanilla,bise]"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: bise audit evaluates the model as given: its stages are "
                                               "always [vanilla] (use bise run for the BISE stages)")


@pytest.mark.parametrize("backbone, total", [("simple_convnet", "4 gates, 240 units"),
                                             ("resnet18", "16 gates, 3840 units")])
def test_gates_lists_every_gate(capsys, backbone, total):
    assert cli.gates_command([f"backbone={backbone}", "classes=3"]) == 0
    out = capsys.readouterr().out
    for point in build_backbone(backbone, 3).gate_points():
        assert f" {point.name} " in out and point.module in out
    assert total in out and "3 classes, from classes=" in out
    assert "the classifier: its outputs are the classes" in out


def test_gates_errors():
    with pytest.raises(BiseError, match="classes must be a positive integer, got 'x'"):
        cli.gates_command(["classes=x"])


def _configs(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(str(path.relative_to(folder).with_suffix("")) for path in folder.rglob("*.yaml"))


def test_a_group_choice_without_a_config_is_one_line_naming_it_and_the_choices(tmp_path):
    """Worded as every bad choice (core.errors.unknown_choice), not Hydra's text with its config search path."""
    with pytest.raises(BiseError) as error:
        cli.gates_command(["backbone=nonet"])
    assert str(error.value) == f"unknown backbone 'nonet'; allowed: {', '.join(_configs('backbone'))}"
    with pytest.raises(BiseError) as error:  # nested configs are choices too
        cli.gates_command(["experiment=tune/nope"])
    assert str(error.value).startswith("unknown experiment 'tune/nope'; allowed: ")
    assert sorted(str(error.value).split("allowed: ")[1].split(", ")) == _configs("experiment")
    result = run_bise("gates", "backbone=resnet19", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == \
        [f"error: unknown backbone 'resnet19'; allowed: {', '.join(_configs('backbone'))}"]
    # A missing config no override names (a config file's defaults list): Hydra's message, on one line, without
    # the config search path.
    hydra_text = ("In 'config': Could not find 'backbone/gone'\n\nAvailable options in 'backbone':\n\tmlp\n"
                  "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf")
    fallback = cli._hydra_message(MissingConfigException(hydra_text, "backbone/gone", ["mlp"]))
    assert fallback == "In 'config': Could not find 'backbone/gone' Available options in 'backbone': mlp"


@pytest.mark.parametrize("command, override, what, bad", [
    ("run", "backbone=resnet19", "backbone", "resnet19"),
    ("run", "backbone=mlp,resnet19", "backbone", "resnet19"),          # one choice of a sweep
    ("audit", "+experiment=tune/nope", "experiment", "tune/nope"),
    ("data", "dataset@dataset=cifar11", "dataset@dataset", "cifar11"),
])
def test_run_audit_and_data_name_a_bad_group_choice_in_one_line(capsys, command, override, what, bad):
    """`bise run backbone=resnet19` fails before Hydra starts (which would print a dozen lines with its config
    search path), worded as `bise gates` words it, exit 2."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "-m" if "," in override else "seed=0", override])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    head, allowed = line.split("; allowed: ")
    assert head == f"error: unknown {what} {bad!r}"
    assert sorted(allowed.split(", ")) == _configs(what.split("@")[0])


def test_a_bad_launcher_and_hydras_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "hydra/launcher=nope"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: unknown hydra/launcher 'nope'; allowed: ")
    assert {"basic", "local_parallel", "submitit_local", "slurm"} <= set(err.strip().split("allowed: ")[1].split(", "))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "-m", "experiment=smoke", "--cfg", "job"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == \
        ["error: Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified"]
