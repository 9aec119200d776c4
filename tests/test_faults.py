"""Faults fail cleanly: one line on stderr, a non-zero exit status, nothing lost.

Bad settings are rejected by validate_config before the first stage (in-process, on configs composed exactly as
the CLI composes them); damaged MNIST files by read_idx; unwritable folders by check_writable. A few subprocess
tests check the end-to-end behaviour: the one-line error, SIGTERM/Ctrl-C exit codes with the run marked failed,
and `bise data hydra.run.dir=X`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bise_cli.cli import CONF_DIR, interrupt_exit_code
from bise_cli.core.errors import BiseError, Terminated
from bise_cli.data.mnist_source import load_digits, read_idx
from bise_cli.run.registry import RUNNABLE
from bise_cli.run.validate import check_writable, validate_config

from conftest import bise_env, compose_config, write_idx

# The known stages, from the stage registry (which imports no stage code).
STAGES = RUNNABLE


def validate(overrides: list[str]) -> list[str]:
    return validate_config(compose_config(["experiment=smoke", *overrides]), stages=STAGES)


def test_known_stages_match_pipeline():
    from bise_cli.run.pipeline import STAGES as pipeline_stages

    assert set(STAGES) == set(pipeline_stages)


# ------------------------------------------------------------------------------------- settings, in-process
@pytest.mark.parametrize("overrides, message", [
    (["seed=-1"], "seed must be an integer >= 0, got -1"),
    (["seed=abc"], "seed must be an integer >= 0, got 'abc'"),
    (["seed=1.5"], "seed must be an integer >= 0, got 1.5"),
    (["seed=true"], "seed must be an integer >= 0, got True"),
    (["rho=0"], "rho must be in (0, 1], got 0"),
    (["rho=abc"], "rho must be in (0, 1], got 'abc'"),
    (["dataset.max_samples=abc"], "dataset.max_samples must be an integer >= 1 or null, got 'abc'"),
    (["dataset.max_samples=0"], "dataset.max_samples must be an integer >= 1 or null, got 0"),
    (["eval_batch_size=0"], "eval_batch_size must be auto or an integer >= 1, got 0"),
    (["leakage_probe.batch_size=0"], "leakage_probe.batch_size must be an integer >= 1, got 0"),
    (["leakage_probe.epochs=-1"], "leakage_probe.epochs must be an integer >= 0, got -1"),
    (["leakage_probe.lr=0"], "leakage_probe.lr must be a number > 0, got 0"),
    (["latency.repeats=0"], "latency.repeats must be an integer >= 1, got 0"),
    (["latency.warmup=-1"], "latency.warmup must be an integer >= 0, got -1"),
    (["train.epochs=-1"], "train.epochs must be an integer >= 0, got -1"),
    (["train.batch_size=0"], "train.batch_size must be an integer >= 1, got 0"),
    (["train.lr=-0.1"], "train.lr must be a number > 0, got -0.1"),
    (["finetune.batch_size=1.5"], "finetune.batch_size must be an integer >= 1, got 1.5"),
    (["bias_labels=foo"], "unknown bias_labels 'foo'; allowed: ground_truth, identification"),
    (["device=gpu"], "unknown device 'gpu'; allowed: auto, cpu, cuda"),
    (["stages=bise"], "stages must be a list, got the string 'bise'; write stages=[bise]"),
    (["stages=[]"], "stages must be a non-empty list"),
    (["stages=[vanilla,bsie]"], "unknown stage 'bsie' in stages (did you mean bise?)"),
    (["cache=maybe"], "cache must be true or false, got 'maybe'"),
    (["vanilla_checkpoint=missing.pt"], "vanilla_checkpoint 'missing.pt' does not exist"),
])
def test_bad_value_is_one_line_naming_key_and_value(overrides, message):
    with pytest.raises(BiseError) as error:
        validate(overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["+train.epoch=3"], "unknown setting train.epoch (not in any conf/train/*.yaml); did you mean train.epochs?"),
    (["+finetune.lrr=0.1"], "unknown setting finetune.lrr (not in any conf/finetune/*.yaml); did you mean "
                            "finetune.lr?"),
    (["+dataset.foo=1"], "unknown setting dataset.foo (not in conf/dataset/ option biased_mnist); allowed: "),
    (["+backbone.widht=2"], "did you mean backbone.width?"),
    (["+pruning.tau_mn=0.1"], "unknown setting pruning.tau_mn (not in conf/pruning/ option bise); did you mean "
                              "pruning.tau_min?"),
    (["+leakage_probe.epoch=2"], "unknown setting leakage_probe.epoch (not in config.yaml); did you mean "
                                 "leakage_probe.epochs?"),
    (["+sed=1"], "unknown setting sed (not in config.yaml); did you mean seed?"),
])
def test_unknown_key_is_rejected_naming_the_closest(overrides, message):
    with pytest.raises(BiseError) as error:
        validate(overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_keys_are_checked_per_chosen_option():
    # tau_min belongs to pruning=bise, not to ffw; clean_split to biased_mnist, not to civilcomments;
    # free-form record_keys take anything.
    validate(["++pruning.tau_min=0.1"])
    with pytest.raises(BiseError, match=r"unknown setting pruning.tau_min \(not in conf/pruning/ option ffw\); "
                                        "did you mean pruning.t_min"):
        validate_config(compose_config(["pruning=ffw", "+pruning.tau_min=0.1"]), stages=STAGES)
    validate(["++dataset.clean_split=true"])
    with pytest.raises(BiseError, match="dataset.clean_split"):
        validate_config(compose_config(["dataset=civilcomments", "backbone=bert", "+dataset.clean_split=true"]),
                        stages=STAGES)
    validate(["+record_keys={ablation: ce, extra: 1}"])


def _preset_overrides() -> list[list[str]]:
    presets = [[f"experiment={p.relative_to(CONF_DIR / 'experiment').with_suffix('')}"]
               for p in sorted((CONF_DIR / "experiment").rglob("*.yaml"))]
    groups = [[f"{p.parent.name}={p.stem}"] for group in ("dataset", "backbone", "pruning")
              for p in sorted((CONF_DIR / group).glob("*.yaml"))]
    return [[], *presets, *groups]


@pytest.mark.parametrize("overrides", _preset_overrides(), ids=lambda o: ",".join(o) or "default")
def test_every_shipped_config_validates(overrides, tmp_path):
    cfg = compose_config([*overrides, f"output_root={tmp_path}"])
    if cfg.get("vanilla_checkpoint"):  # a preset that reads the user's model (example/own_model: its step 1 makes it)
        checkpoint = Path(cfg["vanilla_checkpoint"])
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"")
    assert validate_config(cfg, stages=STAGES) == []


def test_device_cuda_without_cuda_is_rejected_first(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BiseError, match="device=cuda but no CUDA device is available"):
        validate(["device=cuda", "seed=abc"])  # the device is checked before anything else


def test_zero_epochs_warn():
    assert validate(["train.epochs=0"]) == ["train.epochs=0: the vanilla model keeps its random initial weights"]
    assert "finetune.epochs=0" in validate(["finetune.epochs=0", "stages=[vanilla,bise,bise_ft]"])[0]
    assert validate(["finetune.epochs=0", "stages=[vanilla,bise]"]) == []


def test_vanilla_checkpoint_must_be_a_readable_file(tmp_path):
    with pytest.raises(BiseError, match="is a folder"):
        validate([f"vanilla_checkpoint={tmp_path}"])
    checkpoint = tmp_path / "vanilla.pt"
    checkpoint.write_bytes(b"not checked here: loading is the vanilla stage's job")
    assert validate([f"vanilla_checkpoint={checkpoint}", "train.epochs=0"]) == []


# -------------------------------------------------------------------------------------------- output folders
def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
    folder = tmp_path / "a" / "b"
    check_writable(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_check_writable_names_the_folder_and_the_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")  # fails even as root, unlike chmod
    with pytest.raises(BiseError) as error:
        check_writable(blocker / "cache")
    assert str(error.value).startswith(f"output folder {blocker / 'cache'} is not writable: ")
    with pytest.raises(BiseError, match="is not writable: a file of that name is in the way"):
        check_writable(blocker)


# ---------------------------------------------------------------------------------------------- MNIST files
def _labels_file(tmp_path: Path, labels) -> Path:
    return write_idx(tmp_path / "train-labels-idx1-ubyte", np.asarray(labels), compress=True)


def test_non_gzip_file_named_gz(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(BiseError, match=r"train-labels-idx1-ubyte.gz is not a valid gzip file .*re-download it "
                                        r"or delete it"):
        read_idx(path)


def test_truncated_gzip(tmp_path):
    path = _labels_file(tmp_path, np.arange(1000) % 10)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(BiseError, match="is not a valid gzip file"):
        read_idx(path)


def test_corrupt_gzip(tmp_path):
    path = _labels_file(tmp_path, np.random.default_rng(0).integers(0, 10, 5000))
    data = bytearray(path.read_bytes())
    data[20:60] = bytes(40)  # damage the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(BiseError, match="is not a valid gzip file"):
        read_idx(path)


def test_label_out_of_range(tmp_path):
    path = _labels_file(tmp_path, [0, 1, 2, 12, 3])
    with pytest.raises(BiseError, match=r"has label 12 at index 3 \(1 labels outside 0..9\)"):
        read_idx(path)


def test_truncated_raw_idx(tmp_path):
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)), compress=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BiseError, match="is truncated or padded: 3820 values, header says 3920"):
        read_idx(path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(BiseError, match="is truncated: 10 bytes"):
        read_idx(path)


def test_image_label_count_mismatch(idx_dir):
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.arange(49) % 10, compress=True)
    with pytest.raises(BiseError, match=r"MNIST test images and labels disagree in length: 50 in .* 49 in "):
        load_digits("files", idx_dir)


# ------------------------------------------------------------------------------------------ interrupts, CLI
def test_interrupt_exit_codes():
    assert interrupt_exit_code(Terminated("terminated by SIGTERM")) == 143
    assert interrupt_exit_code(KeyboardInterrupt()) == 130


def _bise(*args: str, cwd: Path, **kwargs):
    env = bise_env()
    # SIGINT back to its default in the child: a shell that starts the test suite in the background (`make test &`,
    # nohup) makes it ignored, Python then keeps ignoring it, and Ctrl-C could not be tested.
    return subprocess.Popen([sys.executable, "-m", "bise_cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_bad_value_end_to_end_is_one_line_on_stderr(tmp_path):
    process = _bise("run", "experiment=smoke", "seed=abc", "output_root=out", cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert _lines(stderr) == ["error: seed must be an integer >= 0, got 'abc'"]
    assert "Traceback" not in stdout
    assert not (tmp_path / "out" / "cache").exists()  # nothing started
    assert not list((tmp_path / "out").rglob("status.json"))


@pytest.mark.parametrize("sig, code, what", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_signal_marks_the_run_failed_and_exits_in_one_line(tmp_path, sig, code, what):
    # An endless vanilla training (100k epochs): without the signal's effect the process would not exit.
    process = _bise("run", "experiment=smoke", "stages=[vanilla]", "train.epochs=100000", "cache=false",
                    "output_root=out", cwd=tmp_path)
    deadline = time.time() + 120
    status = None
    while time.time() < deadline and process.poll() is None:
        found = list((tmp_path / "out" / "runs").glob("*/status.json"))
        if found and json.loads(found[0].read_text() or "{}").get("state") == "running":
            status = found[0]
            break
        time.sleep(0.05)
    assert status is not None, "the run never started: " + (process.stderr.read() if process.poll() is not None
                                                            else "timeout")
    process.send_signal(sig)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{what} had no effect: the run kept going") from None
    assert process.returncode == code, stderr[-3000:]
    state = json.loads(status.read_text())
    assert state["state"] == "failed"
    assert (what == "SIGTERM") == ("SIGTERM" in state["error"])
    assert _lines(stderr)[-1] == f"interrupted ({what}): run marked failed; re-run the same command to resume"
    assert "Traceback" not in stderr + stdout


def test_data_honours_hydra_run_dir(tmp_path):
    target = tmp_path / "my data"
    process = _bise("data", "dataset.source=embedded", "dataset.max_samples=300", "rho=0.9", "output_root=out",
                    f"hydra.run.dir={target}", cwd=tmp_path)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-3000:]
    assert (target / "summary.json").is_file() and (target / "samples.png").is_file()
    assert not (tmp_path / "out" / "data").exists()
