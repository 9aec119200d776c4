"""Every command in README.md's code blocks, as the README types it, through the real entry point.

README.md is parsed at test time: each fenced shell block is split into commands (backslash continuations
joined, `# ...` comments dropped). Each command must have an entry in PLAN, which says how it is exercised:

- `run`: `python -m bise_cli <the command>` in a subprocess, in a scratch folder that plays the user's project
  folder (so `outputs/...` paths work as typed), with the smoke-size overrides of tests/conftest.py appended
  (later overrides win in Hydra) and `-m` kept where the README shows it; its outputs are then checked.
- `compose`: commands that need a GPU's worth of work are composed through the entry point with
  `--cfg job --resolve` (a `-m` sweep is expanded into its jobs by Hydra's own override parser, each job composed
  and checked) and validated: `validate_config`, the record fields (`check_record_keys`) and the stage combination,
  i.e. every check `bise run` makes before its first stage.
- `make`: the target exists in the Makefile, and each `bise run` line of its recipe composes and validates.

A README command without a PLAN entry fails, and so does a PLAN entry the README no longer has. Placeholders
(`<that run>`, `RUN`) are replaced by the folder of the run named in PLACEHOLDERS; any other placeholder fails.
Files a command names as the user's own (`dataset.manifest=...`, `vanilla_checkpoint=...`) are generated from
the command's composed config: a manifest of tiny PNGs with the command's target and bias columns, and the state
dict of the torchvision model the command names, its batch-norm statistics taken from those images as a trained
model's would be.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from bise_cli.core.files import read_jsonl

from conftest import TINY_SETTINGS, compose_config, run_bise

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"
SHELL_BLOCKS = ("bash", "sh", "shell", "console", "")

# Smoke size for runs on embedded MNIST digits (conftest.TINY_SETTINGS), and for runs on the user's own table
# (no dataset.source/max_samples: a manifest has its own; 8x8 images, and the example input traced at that size).
TINY = [*TINY_SETTINGS, "bootstrap.n=0"]
# The leakage probe keeps its default epochs there: one epoch is one step on these few samples, and one SGD step
# on a ResNet bottleneck can end above the starting loss, which the probe's divergence check refuses.
TABLE_TINY = [*(s for s in TINY if not s.startswith(("dataset.", "leakage_probe."))), "dataset.image_size=8",
              "backbone.input_size=[3,8,8]"]
# The own-data command's resnet50 at smoke size is a resnet18 (its gates on resnet50: `bise gates` below and
# tests/test_auto_gates.py).
OWN_DATA_TINY = [*TABLE_TINY, "backbone.arch=resnet18"]
# The worked example at smoke size: the user's side (250 training digits, one epoch), then the stages the export
# needs on 8x8 images (the other stages run in the own-data command).
EXAMPLE_TINY = ["--train", "250", "--val", "50", "--test", "50", "--epochs", "1", "--rho", "0.3",
                "--mnist", "no-mnist-here"]  # rho 0.3: every (digit, colour) group has a training image
EXAMPLE_RUN_TINY = ["pruning.tau_period=1", "pruning.tau_min=0.3", "pruning.head_pretrain_epochs=1",
                    "pruning.head_refine_epochs=1", "finetune.epochs=1", "latency.repeats=1", "latency.warmup=0",
                    "bootstrap.n=0", "stages=[vanilla,bise]", "dataset.image_size=8", "backbone.input_size=[3,8,8]"]

QUICKSTART = "bise run experiment=quickstart"
OWN_DATA = ("bise run dataset=table dataset.manifest=data/manifest.csv dataset.target_column=label "
            "dataset.bias_columns=[gender] dataset.image_size=224 backbone=torchvision backbone.arch=resnet50 "
            "vanilla_checkpoint=my_model.pt")
PAPER_SWEEP = "bise run -m experiment=paper/multicolor_mnist"
EXAMPLE_RUN = "bise run experiment=example/own_model"
# Placeholder -> the README command whose run folder it stands for. Both name the own-data run, so the Usage
# block's export is the own-data block's export, run once (the MLP's export: tests/test_export.py).
PLACEHOLDERS = {"<that run>": OWN_DATA, "RUN": OWN_DATA}
PLACEHOLDER = re.compile(r"<[^<>]+>|\b[A-Z][A-Z0-9_]+\b")


# ------------------------------------------------------------------------------------------- the README

@dataclass(frozen=True)
class Command:
    text: str    # whitespace collapsed, no comment, continuations joined
    block: int   # which code block (0-based, shell blocks only)


def readme_commands(text: str) -> list[Command]:
    """The commands of every fenced shell block of `text`, in order."""
    commands = []
    blocks = re.findall(r"^```([\w-]*)[ \t]*\n(.*?)^```", text, re.M | re.S)
    for number, body in enumerate(body for language, body in blocks if language in SHELL_BLOCKS):
        logical, pending = [], ""
        for line in body.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment (README commands quote no '#')
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        commands += [Command(" ".join(line.split()), number) for line in logical if line.strip()]
    return commands


COMMANDS = readme_commands(README.read_text())


def makefile_targets() -> dict[str, list[str]]:
    """{target: its recipe lines} of the Makefile."""
    targets, current = {}, None
    for line in MAKEFILE.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+):(?!=)", line)
        if match:
            current = targets.setdefault(match.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif not line.strip():
            current = None
    return targets


def make_variables() -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)\s*[?:]?=\s*(\S+)\s*$", MAKEFILE.read_text(), re.M))


# ------------------------------------------------------------------------------------------- running

def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (f"{' '.join(result.args[2:])} exited with {result.returncode}:\n"
                                    f"{(result.stderr or result.stdout)[-3000:]}")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def _sweep_jobs(args: list[str]) -> list[list[str]]:
    """The jobs of a `-m` command line, expanded by Hydra's own override parser (what its basic sweeper does)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(args)
    options = [[f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in overrides]
    return [list(job) for job in itertools.product(*options)]


def readme_run_dir(overrides: list[str]) -> str:
    """The run folder of `bise run OVERRIDES` (Hydra's override_dirname of the composed config, made a folder name
    by the CLI's own `bise.dirname` resolver), relative to the default output_root."""
    from hydra import compose, initialize_config_dir

    from bise_cli.cli import CONF_DIR, _dirname

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    return f"{cfg.output_root}/runs/{_dirname(cfg.hydra.job.override_dirname)}"


def check_before_run(plain: dict) -> None:
    """Every check `bise run` makes before its first stage."""
    from bise_cli.run.pipeline import check_stage_combination
    from bise_cli.run.records import check_record_keys
    from bise_cli.run.validate import validate_config

    validate_config(plain)
    check_record_keys(plain)
    check_stage_combination(list(plain["stages"]), plain["pruning"]["name"])


@dataclass
class Outcome:
    result: subprocess.CompletedProcess | None = None
    folders: list[Path] = field(default_factory=list)  # run, sweep, audit or data folders the command created
    configs: list[dict] = field(default_factory=list)  # composed configs (compose plans)


@dataclass(frozen=True)
class Plan:
    how: str                                  # run | compose | make
    why: str                                  # why this way (printed in a failure)
    extra: tuple[str, ...] = ()               # appended arguments (smoke size)
    needs: tuple[str, ...] = ()               # README commands that must have run first
    recipe: bool = True                       # make: compose and validate the recipe's bise run lines
    check: Callable[[Outcome, Workspace], None] | None = None


class Workspace:
    """The user's project folder: README commands run here, each once; user files are generated on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.outcomes: dict[str, Outcome] = {}
        self.by_argv: dict[tuple[str, ...], Outcome] = {}

    def outcome(self, command: Command) -> Outcome:
        if command.text not in self.outcomes:
            plan = PLAN[command.text]
            for needed in plan.needs:
                self.outcome(Command(needed, command.block))
            self.outcomes[command.text] = {"run": self._run, "compose": self._compose,
                                           "make": self._make}[plan.how](command, plan)
        return self.outcomes[command.text]

    def run_folder(self, text: str) -> Path:
        """The run folder the README command `text` created (an earlier command)."""
        folders = self.outcomes[text].folders
        assert len(folders) == 1, f"{text!r} created {folders}"
        return folders[0]

    def argv(self, command: Command) -> list[str]:
        """The command's arguments, placeholders replaced by run folders."""
        text = command.text
        for placeholder in PLACEHOLDER.findall(text):
            assert placeholder in PLACEHOLDERS, f"unknown placeholder {placeholder!r} in README command {text!r}"
            text = text.replace(placeholder, self.run_folder(PLACEHOLDERS[placeholder]).name)
        return shlex.split(text)

    def _folders(self) -> set[Path]:
        outputs = self.root / "outputs"
        return {p for pattern in ("runs/*", "audits/*", "data/*", "sweeps/*/*") for p in outputs.glob(pattern)
                if p.is_dir()}

    def _run(self, command: Command, plan: Plan) -> Outcome:
        argv = self.argv(command)
        if argv[0] in ("bise", ".venv/bin/bise"):
            self.user_files([*argv[1:], *plan.extra])
            module, argv = "bise_cli", argv[1:]
        else:
            assert argv[:2] == ["python", "-m"], f"no way to run {command.text!r}"
            module, argv = argv[2], argv[3:]
        extra = list(plan.extra)
        if module == "bise_cli" and argv[0] == "run" and not any(a.startswith("-") for a in argv[1:]):
            # The folder the README command alone creates: smoke-size overrides would rename it, and later
            # README commands (bise export outputs/runs/...) name it.
            extra.append(f"hydra.run.dir='{readme_run_dir(argv[1:])}'")
        key = (module, *argv, *extra)
        if key not in self.by_argv:  # two README commands that are the same once placeholders are replaced
            before = self._folders()
            result = ok(run_bise(*argv, *extra, cwd=self.root, entry=("-m", module), timeout=600))
            self.by_argv[key] = Outcome(result, sorted(self._folders() - before))
        return self.by_argv[key]

    def _compose(self, command: Command, plan: Plan) -> Outcome:
        argv = self.argv(command)
        assert argv[:2] in (["bise", "run"], [".venv/bin/bise", "run"]), f"cannot compose {command.text!r}"
        args = [a for a in argv[2:] if a not in ("-m", "--multirun")]
        jobs = _sweep_jobs(args) if len(args) < len(argv[2:]) else [args]
        printed = yaml.safe_load(ok(run_bise("run", *jobs[0], "--cfg", "job", "--resolve", cwd=self.root,
                                             timeout=600)).stdout)
        configs = []
        for job in jobs:
            plain = compose_config(job)
            check_before_run(plain)
            configs.append(plain)
        assert printed == configs[0], "the entry point composed another config than Hydra's compose API"
        return Outcome(configs=configs)

    def _make(self, command: Command, plan: Plan) -> Outcome:
        words = command.text.split()
        assert words[0] == "make" and len(words) > 1, command.text
        targets, variables = makefile_targets(), make_variables()
        for target in words[1:]:
            assert target in targets, f"README runs `make {target}`, which the Makefile does not define"
            for line in targets[target] if plan.recipe else []:
                line = line.replace("$(BIN)/", "")
                while re.search(r"\$\((\w+)\)", line):  # the Makefile's variables, e.g. $(MNIST)
                    line = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], line)
                words_ = shlex.split(line)
                if words_[:2] == ["bise", "run"]:
                    args = [a for a in words_[2:] if a not in ("-m", "--multirun")]
                    for job in _sweep_jobs(args):
                        check_before_run(compose_config(job))
        return Outcome()

    # ----------------------------------------------------------------- the user's own files

    def user_files(self, args: list[str]) -> None:
        """Write the manifest and the checkpoint that a `bise run|audit` command (with its smoke-size arguments)
        names, unless they exist."""
        if not args or args[0] not in ("run", "audit"):
            return
        overrides = [a for a in args[1:] if "=" in a and not a.startswith("-")]
        given = dict(a.lstrip("+").split("=", 1) for a in overrides)
        if not ({"dataset.manifest", "vanilla_checkpoint"} & set(given)):
            return
        plain = compose_config([o for o in overrides if not o.startswith("hydra")])
        manifest = self.root / given.get("dataset.manifest", "")
        if "dataset.manifest" in given and not manifest.is_file():
            write_manifest(manifest, plain["dataset"])
        checkpoint = self.root / given.get("vanilla_checkpoint", "")
        if "vanilla_checkpoint" in given and not checkpoint.is_file():
            assert plain["backbone"]["name"] == "torchvision", "a user checkpoint of another family: add a builder"
            write_torchvision_checkpoint(checkpoint, plain["backbone"]["arch"], manifest, len(CLASSES),
                                         plain["dataset"]["image_size"])


# Rows per (split, class, bias value): classes "cat"/"dog", bias values "f"/"m", 80 % aligned in train. The
# derived validation split takes floor(0.2 x 8) = 1 row per group.
USER_ROWS = {"train": {("cat", "f"): 24, ("cat", "m"): 8, ("dog", "f"): 8, ("dog", "m"): 24},
             "test": {("cat", "f"): 4, ("cat", "m"): 4, ("dog", "f"): 4, ("dog", "m"): 4}}
CLASSES = ("cat", "dog")


def write_manifest(path: Path, dataset: dict) -> None:
    """A manifest (CSV) of 8x8 PNGs with the command's target and bias columns; the red channel follows the
    class and the blue channel the bias value (what a biased model can pick up)."""
    import pandas as pd
    from PIL import Image

    target, [bias, *others] = dataset["target_column"], dataset["bias_columns"]
    assert not others and dataset["input_column"] in ("auto", "path"), "add a fixture for this manifest layout"
    rng = np.random.default_rng(0)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, groups in USER_ROWS.items():
        for (label, value), count in groups.items():
            for _ in range(count):
                pixels = rng.integers(0, 80, (8, 8, 3), dtype=np.uint8)
                pixels[..., 0] += 150 * (label == "dog")
                pixels[..., 2] += 150 * (value == "m")
                name = f"images/{len(rows):03d}.png"
                Image.fromarray(pixels).save(path.parent / name)
                rows.append({"path": name, target: label, bias: value, dataset["split_column"]: split})
    pd.DataFrame(rows).to_csv(path, index=False)


def write_torchvision_checkpoint(path: Path, arch: str, manifest: Path, classes: int, size: int | None) -> None:
    """The user's model: torchvision `arch` for the manifest's classes, its batch-norm running statistics computed
    on the manifest's training images (as training leaves them), saved as a plain state dict."""
    import pandas as pd
    import torch
    import torchvision
    from PIL import Image

    frame = pd.read_csv(manifest)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=classes)
    images = torch.stack([torch.from_numpy(np.array(Image.open(manifest.parent / p))) for p in frame["path"]])
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the one pass
    model.train()
    with torch.no_grad():
        model(torch.nn.functional.interpolate(x, size=size) if size else x)
    torch.save(model.state_dict(), path)


# ------------------------------------------------------------------------------------------- checks

def records_of(folder: Path) -> list[dict]:
    assert json.loads((folder / "status.json").read_text())["state"] == "done", folder
    return read_jsonl(folder / "metrics.jsonl")


def stages_of(folder: Path) -> list[str]:
    return list(dict.fromkeys(r["stage"] for r in records_of(folder)))


def check_usage(outcome: Outcome, ws: Workspace) -> None:
    from bise_cli.cli import COMMANDS as SUBCOMMANDS

    assert all(name in outcome.result.stdout for name in SUBCOMMANDS)


def check_quickstart(outcome: Outcome, ws: Workspace) -> None:
    [folder] = outcome.folders
    assert stages_of(folder) == compose_config(["experiment=quickstart"])["stages"]
    assert "REDUCED-SCALE DEMO" in outcome.result.stdout


def check_paper_sweep(outcome: Outcome, ws: Workspace) -> None:
    sweep = ws.root / "outputs" / "sweeps" / "paper_multicolor_mnist"
    assert sorted(p.parent for p in outcome.folders) == [sweep, sweep]
    for folder in outcome.folders:
        assert stages_of(folder) == ["vanilla", "bise", "bise_ft", "reweighted_ft"]
    assert {records_of(f)[0]["seed"] for f in outcome.folders} == {0, 1}


def check_table(outcome: Outcome, ws: Workspace) -> None:
    sweep = ws.root / "outputs" / "sweeps" / "paper_multicolor_mnist"
    assert "bise_ft" in (sweep / "table.md").read_text() and (sweep / "table.csv").is_file()
    assert "paper" in outcome.result.stdout.lower()  # --reference: the paper's values beside the columns


def check_table_of_all_sweeps(outcome: Outcome, ws: Workspace) -> None:
    assert "BISE+FT" in outcome.result.stdout or "bise_ft" in outcome.result.stdout
    assert (ws.root / "outputs" / "sweeps" / "table.md").is_file()


def check_compare(outcome: Outcome, ws: Workspace) -> None:
    sweep = ws.root / "outputs" / "sweeps" / "paper_multicolor_mnist"
    assert "acc_unbiased" in (sweep / "compare_bise_ft_vs_reweighted_ft.md").read_text()


def check_data(outcome: Outcome, ws: Workspace) -> None:
    [folder] = outcome.folders
    summary = json.loads((folder / "summary.json").read_text())
    assert {"train", "test"} <= set(summary) and (folder / "samples.png").stat().st_size > 1000


def check_gates(outcome: Outcome, ws: Workspace) -> None:
    assert "gates of torchvision" in outcome.result.stdout
    assert re.search(r"\d+ gates, \d+ units", outcome.result.stdout)


def check_audit(outcome: Outcome, ws: Workspace) -> None:
    [folder] = outcome.folders
    assert folder.parent.name == "audits" and (folder / "MODEL_CARD.md").is_file()
    [record] = records_of(folder)
    assert record["stage"] == "vanilla" and record["dataset.bias_columns"] == '["gender"]'
    assert "dataset.cache_dir" not in record and (ws.root / "image-cache").is_dir()  # where files are: no result


def check_export(outcome: Outcome, ws: Workspace) -> None:
    assert re.search(r"verified with onnxruntime [\d.]+: max \|logit difference\| ", outcome.result.stdout)
    written = Path(re.search(r"wrote (\S+)", outcome.result.stdout).group(1))
    written = written if written.is_absolute() else ws.root / written
    assert written.suffix == ".onnx" and written.is_file()
    assert (written.parent / "preprocessing.json").is_file()


def check_mlflow(outcome: Outcome, ws: Workspace) -> None:
    assert not outcome.folders and "already done" in outcome.result.stdout + outcome.result.stderr
    assert any((ws.root / "outputs" / "mlruns").rglob("meta.yaml"))  # sent without recomputing


def check_cfg_job(outcome: Outcome, ws: Workspace) -> None:
    from bise_cli.run.validate import validate_config

    printed = yaml.safe_load(outcome.result.stdout)
    assert printed["stages"] and "hydra" not in printed
    validate_config(compose_config([]))


def check_run_help(outcome: Outcome, ws: Workspace) -> None:
    assert "== Configuration groups ==" in outcome.result.stdout and "pruning: bise" in outcome.result.stdout


def check_own_data(outcome: Outcome, ws: Workspace) -> None:
    [folder] = outcome.folders
    records = records_of(folder)
    assert list(dict.fromkeys(r["stage"] for r in records)) == compose_config([])["stages"]
    assert all(r["dataset.bias_columns"] == '["gender"]' and r["dataset.target_column"] == "label" for r in records)
    assert "train_seconds" not in records[0]  # the user's weights, evaluated as given
    assert (folder / "pruned_bise.pt").is_file() and (folder / "MODEL_CARD.md").is_file()


def check_example_data(outcome: Outcome, ws: Workspace) -> None:
    out = ws.root / "outputs" / "example_own_model"
    assert (out / "manifest.csv").is_file() and (out / "user_resnet18.pt").is_file()


def check_example_run(outcome: Outcome, ws: Workspace) -> None:
    [folder] = outcome.folders
    assert folder.name == "experiment=example_own_model"
    assert stages_of(folder) == ["vanilla", "bise"] and (folder / "MODEL_CARD.md").is_file()


def check_composed_sweep(expected_jobs: int):
    def check(outcome: Outcome, ws: Workspace) -> None:
        assert len(outcome.configs) == expected_jobs
        assert len({json.dumps(c, sort_keys=True) for c in outcome.configs}) == expected_jobs
    return check


PLAN: dict[str, Plan] = {
    # Set-up
    "make quickstart": Plan("make", "a make target: it exists and its bise command composes and validates"),
    "make test": Plan("make", "a make target"),
    # Usage
    ".venv/bin/bise --help": Plan("run", "prints the usage", check=check_usage),
    QUICKSTART: Plan("run", "smoke size: tiny schedules on the embedded digits", tuple(TINY),
                     check=check_quickstart),
    PAPER_SWEEP: Plan("run", "a -m sweep at smoke size: 2 seeds, the stages `--compare bise_ft reweighted_ft` needs",
                      (*TINY, "seed=0,1", "stages=[vanilla,bise,bise_ft,reweighted_ft]"), check=check_paper_sweep),
    "bise run dataset=biased_mnist rho=0.99": Plan("compose", "the paper's BiasedMNIST cell: GPU work",
                                                   check=check_composed_sweep(1)),
    "bise run -m rho=0.99,0.995,0.997 seed=0,1,2": Plan("compose", "9 BiasedMNIST jobs of GPU work",
                                                        check=check_composed_sweep(9)),
    "bise table outputs/sweeps/paper_multicolor_mnist --reference": Plan(
        "run", "on the smoke-size sweep above", needs=(PAPER_SWEEP,), check=check_table),
    "bise table outputs/sweeps/paper_multicolor_mnist --compare bise_ft reweighted_ft": Plan(
        "run", "on the smoke-size sweep above", needs=(PAPER_SWEEP,), check=check_compare),
    "bise data dataset=multicolor_mnist": Plan("run", "the embedded digits", ("dataset.source=embedded",),
                                               check=check_data),
    "make example-own-model": Plan("make", "a make target; its recipe is the worked example's block (below, run)",
                                   recipe=False),
    "bise gates backbone=torchvision backbone.arch=resnet50": Plan(
        "run", "traced at 32x32 (the README's gate table's size)", ("backbone.input_size=[3,32,32]",),
        check=check_gates),
    "bise audit dataset=table dataset.manifest=my.csv dataset.bias_columns=[gender] backbone=torchvision "
    "vanilla_checkpoint=model.pt": Plan("run", "a generated manifest and checkpoint, smoke size, its own image cache",
                                        (*TABLE_TINY, "dataset.cache_dir=image-cache"), check=check_audit),
    "bise export outputs/runs/RUN --format onnx": Plan("run", "RUN = the own-data run (below)", needs=(OWN_DATA,),
                                                      check=check_export),
    "bise run experiment=quickstart logger=mlflow": Plan(
        "run", "the quickstart run above, found done: only sent to MLflow", tuple(TINY), needs=(QUICKSTART,),
        check=check_mlflow),
    "bise run --cfg job": Plan("run", "prints the composed config", check=check_cfg_job),
    # Sweeps on a cluster and tuning
    "bise run -m hydra/launcher=slurm hydra.launcher.partition=gpu output_root=/shared/bise "
    "experiment=paper/ablation dataset.root=/shared/data/mnist": Plan(
        "compose", "needs a SLURM cluster (tests/test_launchers.py runs the same submitit path with its local "
        "executor)", check=check_composed_sweep(1)),
    "bise run -m hydra/sweeper=optuna experiment=tune/multicolor_mnist hydra.sweeper.n_trials=20": Plan(
        "compose", "20 trials of the quickstart (tests/test_tuning.py runs a 2-trial Optuna sweep end to end)",
        check=check_composed_sweep(1)),
    "bise run -m hydra/sweeper=optuna experiment=tune/multicolor_mnist_control hydra.sweeper.n_trials=20": Plan(
        "compose", "20 trials of the control (tests/test_tuning.py runs a 2-trial Optuna sweep end to end)",
        check=check_composed_sweep(1)),
    "bise table outputs/sweeps": Plan("run", "every sweep above, at smoke size", needs=(PAPER_SWEEP,),
                                      check=check_table_of_all_sweeps),
    "bise run --help": Plan("run", "prints every config group", check=check_run_help),
    # Your own model and data
    OWN_DATA: Plan("run", "a generated manifest and checkpoint, smoke size (a resnet18)", tuple(OWN_DATA_TINY),
                   check=check_own_data),
    "bise export outputs/runs/<that run> --format onnx": Plan("run", "<that run> = the run above", needs=(OWN_DATA,),
                                                              check=check_export),
    "python -m bise_cli.examples.own_model": Plan("run", "the user's side at smoke size", tuple(EXAMPLE_TINY),
                                                  check=check_example_data),
    EXAMPLE_RUN: Plan("run", "smoke-size schedules, the stages the export needs (the others: the own-data run)",
                      tuple(EXAMPLE_RUN_TINY),
                      needs=("python -m bise_cli.examples.own_model",), check=check_example_run),
    "bise export outputs/runs/experiment=example_own_model --format onnx": Plan(
        "run", "the example run above", needs=(EXAMPLE_RUN,), check=check_export),
    # Reproducing the paper
    **{f"make {target}": Plan("make", "a paper table: its bise run commands compose and validate")
       for target in ("table-multicolor-mnist", "table-biased-mnist", "table-ablation", "table-efficiency",
                      "table-cifar10c", "table-celeba", "table-civilcomments")},
}


# ------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("project"))


def test_the_readme_parser_finds_every_command_of_its_code_blocks():
    text = ("intro `bise inline` is prose\n```bash\nbise run a=1 \\\n    b=[x, y]   # a comment\n\n# only a comment\n"
            "make t1 t2\n```\n```python\nprint('not a shell block')\n```\n```\n.venv/bin/bise --help\n```\n")
    assert readme_commands(text) == [Command("bise run a=1 b=[x, y]", 0), Command("make t1 t2", 0),
                                     Command(".venv/bin/bise --help", 1)]


def test_every_readme_command_has_a_plan_and_every_plan_a_command():
    texts = [c.text for c in COMMANDS]
    assert len(texts) == len(set(texts)), "a README command appears twice: give the test one plan per command"
    assert sorted(set(texts) - set(PLAN)) == [], "README commands with no plan in this test"
    assert sorted(set(PLAN) - set(texts)) == [], "plans for commands the README no longer has"
    for text in texts:
        unknown = set(PLACEHOLDER.findall(text)) - set(PLACEHOLDERS)
        assert not unknown, f"{text!r}: placeholders {unknown} need an entry in PLACEHOLDERS"
    for plan in PLAN.values():
        assert all(needed in PLAN for needed in plan.needs)


def test_the_make_target_of_the_worked_example_runs_the_readme_block():
    [example] = {c.block for c in COMMANDS if c.text == EXAMPLE_RUN}
    recipe = [line.replace("$(BIN)/", "") for line in makefile_targets()["example-own-model"]]
    assert recipe == [c.text for c in COMMANDS if c.block == example]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.text[:80] for c in COMMANDS])
def test_readme_command(workspace, command):
    assert command.text in PLAN, f"README command {command.text!r} has no plan in this test"
    plan = PLAN[command.text]
    outcome = workspace.outcome(command)
    if plan.check is not None:
        plan.check(outcome, workspace)
