"""What a user takes away from a run cannot lie, be lost or be injected (issue 18): non-finite logits stop audit and
run with one line naming the layer; `bise export` only exports a finished run, never writes over a run's files or
an existing file without --force, cleans the scratch of killed exports, writes every file with the same mode and
fails in one line on an unwritable folder; class and bias names, notes and record_keys are escaped in the model
card, the report, the tables and the console; trackers are checked before training and never fail a finished run.

Every case goes through the real command line (`python -m bise_cli ...` in a subprocess). As root, chmod does not
make a folder unwritable: unwritable targets are a regular file where a folder must be created (as in
test_faults.py), and faults that need a running process (a SIGKILL, a disk that fills during tracking) are
injected by a small wrapper that patches one function and then calls the real `bise_cli.cli.main`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bise_cli.core.files import file_sha256, read_jsonl
from bise_cli.method.evaluate import first_non_finite_layer
from bise_cli.models import build_backbone
from bise_cli.reporting.export import SCRATCH_PREFIX, remove_stale_scratch
from bise_cli.run.records import RunDir

from conftest import run_bise

# The cheapest real runs: the smoke preset's tiny schedules with the MLP, no bootstrap; for dataset=table (the
# smoke preset picks BiasedMNIST's embedded digits) the same schedules spelled out.
TINY = ["experiment=smoke", "backbone=mlp", "~backbone.width", "bootstrap.n=0"]
TINY_TABLE = ["backbone=mlp", "train.epochs=1", "pruning.tau_period=1", "pruning.tau_min=0.3", "pruning.gate_init=1.0",
              "pruning.head_pretrain_epochs=1", "pruning.head_refine_epochs=1", "leakage_probe.epochs=1",
              "latency.repeats=1", "latency.warmup=0", "bootstrap.n=0"]


def bise(*args: str, cwd: Path, patch: str | None = None, umask: int | None = None, timeout: int = 300):
    """`python -m bise_cli ARGS` (or, with `patch`, that code followed by the real cli.main(ARGS))."""
    entry = ("-m", "bise_cli") if patch is None else \
        ("-c", f"import sys\n{patch}\nfrom bise_cli.cli import main\nmain(sys.argv[1:])")
    return run_bise(*args, cwd=cwd, timeout=timeout, entry=entry,
                    preexec_fn=None if umask is None else lambda: os.umask(umask))


def error_line(result) -> str:
    """The one line a failing command printed on stderr (asserting it is one line, without a traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    return lines[0]


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real finished run with a pruned model (vanilla + BISE), made by `bise run`."""
    root = tmp_path_factory.mktemp("finished")
    result = bise("run", *TINY, "stages=[vanilla,bise]", "output_root=out", "hydra.run.dir=out/run", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out" / "run"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ------------------------------------------------------------------------------------ non-finite logits
def _checkpoint(path: Path, poison: str | None) -> Path:
    """An MLP state dict; with `poison`, that parameter's first entry is NaN."""
    torch.manual_seed(0)
    state = build_backbone("mlp", 10).state_dict()
    if poison:
        state[poison] = state[poison].clone()
        state[poison].view(-1)[0] = float("nan")
    torch.save(state, path)
    return path


def test_audit_of_a_nan_checkpoint_is_one_line_naming_the_layer_not_a_card(tmp_path):
    # Before: exit 0 and a card saying 10 % accuracy on BiasedMNIST (argmax of a NaN row is class 0).
    _checkpoint(tmp_path / "nan.pt", "classifier.weight")
    result = bise("audit", *TINY, "vanilla_checkpoint=nan.pt", "output_root=out", "hydra.run.dir=out/audit",
                  cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("error: the model's logits on the test split are not finite (NaN or inf) for ")
    assert "first non-finite output is at layer 'classifier' (Linear)" in line
    folder = tmp_path / "out" / "audit"
    assert not (folder / "MODEL_CARD.md").exists() and not (folder / "metrics.jsonl").exists()
    assert json.loads((folder / "status.json").read_text())["state"] == "failed"


def test_run_with_a_nan_inside_the_network_names_the_first_non_finite_layer(tmp_path):
    # One NaN weight in the second hidden layer: its output is the first that is not finite.
    _checkpoint(tmp_path / "mid.pt", "feature.2.weight")
    result = bise("run", *TINY, "stages=[vanilla,bise]", "vanilla_checkpoint=mid.pt", "output_root=out",
                  "hydra.run.dir=out/run", cwd=tmp_path)
    assert result.returncode == 2
    assert "first non-finite output is at layer 'feature.2' (Linear)" in error_line(result)
    assert not (tmp_path / "out" / "run" / "pruned_bise.pt").exists()


def test_first_non_finite_layer_names_the_input_or_the_layer_and_leaves_no_hook():
    from bise_cli.models.mlp import MLP

    model = MLP(3, in_features=4, hidden=(5,)).eval()
    x = torch.randn(2, 4)
    assert first_non_finite_layer(model, torch.full((2, 4), float("inf"))).startswith("its input")
    with torch.no_grad():
        model.feature[0].bias[1] = float("inf")
    assert first_non_finite_layer(model, x) == "layer 'feature.0' (Linear)"
    assert not any(m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------------- export: which run
def export_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`bise export ARGS` through the same entry point in this process (cli.main: argparse, then export_run), for
    the variants of a case whose subprocess test is beside it: (exit status, stdout, stderr)."""
    from bise_cli import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", *args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_export_refuses_a_run_whose_rerun_failed(finished_run, tmp_path):
    # The case: the same run folder re-run with a model that fails to load in the vanilla stage. The old
    # pruned_bise.pt stays; before, `bise export` said "verified" and shipped it with the new preprocessing.json.
    run = copy_run(finished_run, tmp_path / "run")
    torch.save(build_backbone("mlp", 2).state_dict(), tmp_path / "two_classes.pt")
    rerun = bise("run", *TINY, "stages=[vanilla,bise]", "vanilla_checkpoint=two_classes.pt", "output_root=out",
                 f"hydra.run.dir={run}", cwd=tmp_path)
    assert rerun.returncode != 0 and json.loads((run / "status.json").read_text())["state"] == "failed"
    result = bise("export", str(run), "--format", "onnx", cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"error: the last run in {run} failed (")
    assert "pruned_bise.pt may be an earlier run's" in line and "re-run its command until it finishes" in line
    assert not (run / "export").exists()


def test_export_refuses_a_changed_pruned_model_until_the_run_rebuilds_it(finished_run, tmp_path):
    # Another run's pruned model copied into a finished run folder (before: exported and "verified").
    root = tmp_path / "root"
    run = copy_run(finished_run, root / "out" / "run")
    shutil.copytree(finished_run.parent / "cache", root / "out" / "cache")
    state = torch.load(run / "pruned_bise.pt", weights_only=True)
    state["state_dict"] = {k: v * 2 for k, v in state["state_dict"].items()}
    torch.save(state, run / "pruned_bise.pt")
    result = bise("export", str(run), "--format", "state_dict", cwd=root)
    assert result.returncode == 2
    line = error_line(result)
    assert f"pruned_bise.pt in {run} changed or disappeared since the run finished" in line
    assert f"delete {run / 'status.json'} and re-run its command" in line
    # What the message says to do works: the run is redone (from the caches) and its pruned model rebuilt.
    (run / "status.json").unlink()
    rerun = bise("run", *TINY, "stages=[vanilla,bise]", "output_root=out", f"hydra.run.dir={run}", cwd=root)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rebuilt, original = (torch.load(folder / "pruned_bise.pt", weights_only=True)["state_dict"]
                         for folder in (run, finished_run))
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert bise("export", str(run), "--format", "state_dict", cwd=root).returncode == 0


@pytest.mark.parametrize("damage, message", [
    ("running", "has not finished (status.json: running since"),  # a re-run killed by SIGKILL, or still going
    ("config", "config.yaml in {run} changed or disappeared since the run finished"),
    ("masks", "masks.pt in {run} changed or disappeared since the run finished"),
    ("no status", "has no status.json: not a run folder bise finished"),
    ("new stage", "pruned_bise_ft.pt was not part of the run when it finished"),
])
def test_export_refuses_files_that_are_not_the_finished_runs(finished_run, tmp_path, capsys, damage, message):
    run = copy_run(finished_run, tmp_path / "run")
    stage = "bise"
    if damage == "running":
        RunDir(run).set_status("running", config_hash="x")
    elif damage == "config":
        (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("seed: 0", "seed: 1"))
    elif damage == "masks":
        (run / "masks.pt").unlink()
    elif damage == "no status":
        (run / "status.json").unlink()
    else:
        shutil.copyfile(run / "pruned_bise.pt", run / "pruned_bise_ft.pt")
        stage = "bise_ft"
    code, _, err = export_in_process(capsys, str(run), "--format", "state_dict", "--stage", stage)
    assert code == 2 and len(err.splitlines()) == 1 and message.format(run=run) in err
    assert not (run / "export").exists()


def test_export_of_a_finished_run_records_its_status_and_a_run_without_checksums_is_flagged(finished_run, tmp_path,
                                                                                           capsys):
    status = json.loads((finished_run / "status.json").read_text())
    assert set(status["artefacts"]) == {"pruned_bise.pt", "masks.pt", "config.yaml", "data_summary.json"}
    run = copy_run(finished_run, tmp_path / "run")
    code, out, err = export_in_process(capsys, str(run), "--format", "state_dict")
    assert code == 0, err
    assert "verified with torch" in out and "note:" not in out
    manifest = json.loads((run / "export" / "bise_state_dict.pt.json").read_text())
    assert manifest["run"] == {"state": "done", "finished": status["time"], "config_hash": status["config_hash"],
                               "artefacts_verified": True}
    # A run that finished before bise recorded checksums: exported, and the output says it could not be checked.
    old = copy_run(finished_run, tmp_path / "old")
    RunDir(old).set_status("done", **{k: v for k, v in status.items() if k not in ("state", "time", "artefacts")})
    code, out, _ = export_in_process(capsys, str(old), "--format", "state_dict")
    assert code == 0 and "note: " in out and "could not be checked against the finished run" in out


# ---------------------------------------------------------------------------------- export: where to
@pytest.mark.parametrize("fmt, out, message", [
    ("state_dict", "{run}/preprocessing.json", "is in the run folder {run} (it holds status.json, metrics.jsonl)"),
    ("onnx", "{run}/pruned_bise.pt", "is in the run folder {run} (it holds status.json, metrics.jsonl)"),
    ("state_dict", "{run}/metrics.jsonl", "is in the run folder {run}"),
])
def test_export_never_writes_over_a_run(finished_run, tmp_path, fmt, out, message):
    # Before: each exited 0 ("verified") and replaced the artefact with the JSON, the pruned model with the ONNX
    # file, the records with a checkpoint. --force does not change that.
    run = copy_run(finished_run, tmp_path / "run")
    before = checksums(run)
    result = bise("export", str(run), "--format", fmt, "--out", out.format(run=run), "--force", cwd=tmp_path)
    assert result.returncode == 2 and message.format(run=run) in error_line(result)
    assert checksums(run) == before


@pytest.mark.parametrize("out, message", [
    ("{run}", "is in the run folder {run}"),                     # a folder: the default file name inside it
    ("{other}/model.onnx", "is in the run folder {other}"),      # any run folder, not only the exported one
    ("{run}/.hydra/config.yaml", "is a file of the run {run}"),
    ("{tmp}/elsewhere/preprocessing.json", "is the name of the export's own input description"),
])
def test_export_never_writes_over_a_run_more_targets(finished_run, tmp_path, capsys, out, message):
    run, other = copy_run(finished_run, tmp_path / "run"), copy_run(finished_run, tmp_path / "other")
    before = {folder: checksums(folder) for folder in (run, other)}
    code, _, err = export_in_process(capsys, str(run), "--format", "onnx", "--force", "--out",
                                     out.format(run=run, other=other, tmp=tmp_path))
    assert code == 2 and message.format(run=run, other=other) in err and len(err.splitlines()) == 1
    assert {folder: checksums(folder) for folder in (run, other)} == before
    assert not (tmp_path / "elsewhere").exists()


def test_export_replaces_an_existing_file_only_with_force(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    target = tmp_path / "deploy" / "model.pt"
    target.parent.mkdir()
    target.write_text("the user's own file")
    result = bise("export", str(run), "--format", "state_dict", "--out", str(target), cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result) == (f"error: {target} exists: bise export never replaces a file unless asked "
                                  "(--force), or choose another --out")
    assert target.read_text() == "the user's own file" and sorted(os.listdir(target.parent)) == ["model.pt"]
    code, _, err = export_in_process(capsys, str(run), "--format", "state_dict", "--out", str(target), "--force")
    assert code == 0, err
    assert file_sha256(target) == file_sha256(run / "pruned_bise.pt")
    # A second format beside it shares preprocessing.json (same content: not a replacement, no --force needed),
    # but a repeated export is refused.
    assert export_in_process(capsys, str(run), "--format", "torchscript", "--out", f"{target.parent}/")[0] == 0
    code, _, err = export_in_process(capsys, str(run), "--format", "torchscript", "--out", f"{target.parent}/")
    assert code == 2 and "bise_torchscript.pt exists" in err


def test_export_files_share_one_mode_that_follows_the_umask(finished_run, tmp_path):
    # Before: the JSON sidecars were 0600 (mkstemp) while the artefact was 0644.
    run = copy_run(finished_run, tmp_path / "run")
    result = bise("export", str(run), "--format", "torchscript", "--out", f"{tmp_path / 'out'}/", cwd=tmp_path,
                  umask=0o027)
    assert result.returncode == 0, result.stderr[-2000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(["bise_torchscript.pt", "bise_torchscript.pt.json", "preprocessing.json"], 0o640)


def test_export_into_an_unwritable_folder_is_one_line(finished_run, tmp_path, capsys, monkeypatch):
    # Root ignores chmod: a regular file where the export's folder must be created is unwritable for anyone.
    run = copy_run(finished_run, tmp_path / "run")
    (tmp_path / "blocker").write_text("a file")
    result = bise("export", str(run), "--format", "onnx", "--out", str(tmp_path / "blocker" / "sub" / "m.onnx"),
                  cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result).startswith(f"error: cannot write the export into {tmp_path / 'blocker' / 'sub'}: ")
    # What a non-root user meets in a read-only folder: mkdtemp's PermissionError.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    code, _, err = export_in_process(capsys, str(run), "--format", "onnx", "--out", f"{tmp_path / 'ro'}/")
    assert code == 2 and err == f"error: cannot write the export into {tmp_path / 'ro'}: Permission denied\n"


def test_a_killed_export_leaves_scratch_that_the_next_export_removes(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    out = tmp_path / "out"
    # A real SIGKILL in the middle of an export: after the artefact is written and checked in the scratch folder,
    # before it is moved into place.
    patch = ("import os, signal\nimport bise_cli.reporting.export as export\nwrite = export._export_torchscript\n"
             "def killed(*a, **k):\n    write(*a, **k)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
             "export._export_torchscript = killed")
    result = bise("export", str(run), "--format", "torchscript", "--out", f"{out}/", cwd=tmp_path, patch=patch)
    assert result.returncode == -9
    [left] = list(out.glob(f"{SCRATCH_PREFIX}*"))
    assert (left / "bise_torchscript.pt").is_file() and not (out / "bise_torchscript.pt").exists()
    # Scratch that must stay: a live process's (this test's pid) and a young one of another host.
    host = socket.gethostname()
    live = out / f"{SCRATCH_PREFIX}{host}-{os.getpid()}-abcdefgh"
    young = out / f"{SCRATCH_PREFIX}elsewhere-1-abcdefgh"
    old = out / f"{SCRATCH_PREFIX}0a1b2c3d"  # an older bise's unnamed scratch, two hours old
    for folder in (live, young, old):
        folder.mkdir()
    os.utime(old, (time.time() - 7200,) * 2)
    time.sleep(0.05)  # the next export starts after every folder above
    result = bise("export", str(run), "--format", "torchscript", "--out", f"{out}/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.glob(f"{SCRATCH_PREFIX}*")) == sorted([live.name, young.name])
    assert (out / "bise_torchscript.pt").is_file()


def test_stale_scratch_newer_than_the_export_is_kept(tmp_path):
    # A scratch folder created after this export started (another export racing) is never touched.
    started = time.time() - 60
    dead = tmp_path / f"{SCRATCH_PREFIX}{socket.gethostname()}-999999999-abcdefgh"
    dead.mkdir()
    assert remove_stale_scratch(tmp_path, started) == [] and dead.is_dir()
    assert remove_stale_scratch(tmp_path, time.time() + 1) == [dead] and not dead.exists()


# ------------------------------------------------------------------------------------------- injection
CLASSES = ["<script>alert(1)</script>", "a|b $\\undefined$"]
BIASES = ["line\nbreak", "$x$ *y* [z](http://e.com)"]
TAG = "x|<b>y</b> & 100%_\\$"
NOTE = "[bold]n|o*te*"


def _hostile_table(folder: Path) -> Path:
    """A manifest whose class and bias values are markup (28 x 28 PNGs, the MLP's input)."""
    counts = {("train", 0, 0): 12, ("train", 0, 1): 5, ("train", 1, 0): 5, ("train", 1, 1): 12,
              ("test", 0, 0): 3, ("test", 0, 1): 3, ("test", 1, 0): 3, ("test", 1, 1): 3}
    (folder / "images").mkdir(parents=True)
    rows = []
    for (split, target, bias), n in counts.items():
        for _ in range(n):
            name = f"images/{len(rows):03d}.png"
            Image.fromarray(np.full((28, 28, 3), (len(rows), 120 * target, 120 * bias), np.uint8)).save(folder / name)
            rows.append({"path": name, "target": CLASSES[target], "bg": BIASES[bias], "split": split})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def _cells(line: str) -> list[str]:
    """A Markdown table row split at its unescaped pipes."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def rendered_tables(text: str) -> list[list[list[str]]]:
    """Every table of a Markdown text as a CommonMark + GFM-tables renderer (markdown-it-py, rich's own parser)
    reads it: rows of cell texts, escapes and entities resolved."""
    from markdown_it import MarkdownIt

    tables, rows, row = [], [], None
    for token in MarkdownIt("commonmark", {"html": True}).enable("table").parse(text):
        if token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append("".join(c.content for c in token.children if c.type in ("text", "code_inline")))
        elif token.type == "tr_close":
            rows.append(row)
            row = None
        elif token.type == "table_close":
            tables.append(rows)
            rows = []
    return tables


def _check_markdown(text: str) -> None:
    from markdown_it import MarkdownIt

    # Rendered, nothing is HTML or emphasis: every value is text.
    tokens = MarkdownIt("commonmark", {"html": True}).enable("table").parse(text)
    inline = [child.type for token in tokens for child in (token.children or [])]
    assert not any(t.startswith("html") for t in [token.type for token in tokens] + inline)
    assert "em_open" not in inline and "link_open" not in inline  # (the card bolds its note itself)
    assert "<script>" not in text and "<b>" not in text
    lines = text.splitlines()
    assert not any(line.startswith(("break", "$x$")) for line in lines)  # no value broke onto its own line
    table: list[str] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            table.append(line)
        elif table:  # every row of a table has as many cells as its header
            assert {len(_cells(row)) for row in table} == {len(_cells(table[0]))}, table
            table = []


def test_hostile_class_and_bias_names_are_escaped_everywhere(tmp_path):
    _hostile_table(tmp_path / "data")
    result = bise("run", "dataset=table", "dataset.manifest=data/manifest.csv", "dataset.bias_columns=bg",
                  *TINY_TABLE, "stages=[vanilla,bise]", f"+record_keys.tag='{TAG}'", f"note='{NOTE}'",
                  "output_root=out", "hydra.run.dir=out/runs/hostile", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert NOTE in result.stdout  # rich printed the note, it did not read [bold] as markup
    run = tmp_path / "out" / "runs" / "hostile"
    card = (run / "MODEL_CARD.md").read_text()
    _check_markdown(card)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in card and "a\\|b \\$\\\\undefined\\$" in card
    assert "line break" in card and "\\$x\\$ \\*y\\* [z\\](http://e.com)" in card
    assert "**[bold]n\\|o\\*te\\***" in card  # the note, first (bold by the card itself)
    # As a renderer reads them, the (class x bias value) tables (test counts, vanilla and BISE accuracies) have the
    # bias values as their header and the classes as their first column.
    matrices = [t for t in rendered_tables(card) if t[0][0] == "class \\ bias value"]
    assert len(matrices) == 3
    for cells in matrices:
        assert cells[0][1:] == [value.replace("\n", " ") for value in sorted(BIASES)]
        assert [row[0] for row in cells[1:]] == CLASSES
    # model_card.json keeps the names as they are (it is data, not Markdown).
    assert json.loads((run / "model_card.json").read_text())["data"]["bias_value_names"]["bg"] == sorted(BIASES)
    # The plot's class labels hold `$...$` that matplotlib would read as (invalid) math: escaped, it is drawn.
    assert (run / "group_accuracy.png").stat().st_size > 5000 and "plot skipped" not in result.stderr
    report = (run / "report.md").read_text()
    _check_markdown(report)
    assert report.startswith(card) and "**[bold]n\\|o\\*te\\***" in report

    table = bise("table", "out/runs", "--by", "stage", "tag", "--metrics", "acc", cwd=tmp_path)
    assert table.returncode == 0, table.stderr[-3000:]
    assert TAG in table.stdout  # the terminal table shows the value as it is
    md = (tmp_path / "out" / "runs" / "table.md").read_text()
    _check_markdown(md)
    assert "| bise | x\\|&lt;b&gt;y&lt;/b&gt; &amp; 100%\\_\\\\\\$ | " in md
    assert [row[1] for row in rendered_tables(md)[0][1:]] == [TAG, TAG]
    tex = (tmp_path / "out" / "runs" / "table.tex").read_text()
    row = next(line for line in tex.splitlines() if line.startswith("bise"))
    assert row.startswith(r"bise & x\textbar{}\textless{}b\textgreater{}y\textless{}/b\textgreater{} \& 100\%\_"
                          r"\textbackslash{}\$ & ")
    assert row.count(" & ") == 3  # stage, tag, acc, n


# -------------------------------------------------------------------------------------------- trackers
@pytest.mark.parametrize("logger, setting", [("tensorboard", "logger.dir"), ("mlflow", "logger.tracking_uri")])
def test_an_unwritable_tracker_target_fails_before_training(tmp_path, logger, setting):
    # Before: the run trained, wrote its records, then exited 1 (TensorBoard: "Exception in thread" when the
    # folder exists read-only; here a file in the way).
    pytest.importorskip(logger)
    (tmp_path / "blocker").write_text("a file")
    result = bise("run", *TINY, "stages=[vanilla]", f"logger={logger}", f"{setting}=blocker/target",
                  "output_root=out", "hydra.run.dir=out/run", cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result) == (f"error: logger={logger}: output folder blocker/target is not writable: Not a "
                                  f"directory (the {setting} setting)")
    assert not (tmp_path / "out" / "run" / "status.json").exists()  # nothing ran


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_a_tracker_failing_after_the_run_is_one_warning_and_exit_0(finished_run, tmp_path, logger):
    # The disk fills (or the server goes away) while the tracker writes, after the run is done: the event writer's
    # thread (TensorBoard) or the client call (MLflow) raises.
    pytest.importorskip(logger)
    patch = {"tensorboard": "from tensorboard.summary.writer import record_writer\n"
                            "def full(self, data):\n    raise OSError(28, 'No space left on device')\n"
                            "record_writer.RecordWriter.write = full",
             "mlflow": "import mlflow\n"
                       "def down(*a, **k):\n    raise ConnectionError('tracking server unreachable')\n"
                       "mlflow.log_metrics = down"}[logger]
    root = tmp_path / "root"
    run = copy_run(finished_run, root / "out" / "run")
    shutil.copytree(finished_run.parent / "cache", root / "out" / "cache")  # whatever reruns comes from the caches
    result = bise("run", *TINY, "stages=[vanilla,bise]", f"logger={logger}", "output_root=out",
                  f"hydra.run.dir={run}", cwd=root, patch=patch)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr  # Hydra logs to stdout
    assert "Traceback" not in output and "Exception in thread" not in output
    warnings = [line for line in output.splitlines() if f"logger={logger} failed" in line]
    assert len(warnings) == 1 and ("No space left on device" if logger == "tensorboard" else "unreachable") \
        in warnings[0]
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    assert [r["stage"] for r in read_jsonl(run / "metrics.jsonl")] == ["vanilla", "bise"]
