"""`bise export`: pruned models as state dict, TorchScript and ONNX files, reloaded and compared with the pruned
model; preprocessing.json; one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bise_cli.core.errors import BiseError
from bise_cli.core.files import write_json, write_text
from bise_cli.method.prune import load_pruned, prune_model, save_pruned
from bise_cli.models import build_backbone
from bise_cli.reporting.export import FILE_SUFFIX, FORMATS, export_run
from bise_cli.run.records import RunDir


def _fake_run(folder, model, dataset: str, info: dict):
    """A finished run folder with just what export reads (pruned_bise.pt of `model` with random masks,
    config.yaml, data_summary.json, and status.json marked done by RunDir.finish as the pipeline does): export
    needs nothing else, and training one would cost seconds (the pipeline writing info["preprocessing"] is checked
    in test_card.py, a real run's export in test_hardening_outputs.py)."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    masks = {p.name: torch.rand(p.units) > 0.4 for p in model.gate_points()}
    save_pruned(prune_model(model.eval(), masks), folder / "pruned_bise.pt")
    write_text(folder / "config.yaml", f"dataset:\n  name: {dataset}\n")
    write_json(folder / "data_summary.json", {"info": info})
    RunDir(folder).finish("fake-run")
    return folder


@pytest.fixture(scope="module")
def convnet_run(tmp_path_factory):
    """A BiasedMNIST run folder with a pruned simple_convnet."""
    from bise_cli.data.biased_mnist import preprocessing

    return _fake_run(tmp_path_factory.mktemp("convnet") / "run", build_backbone("simple_convnet", 10, width=0.25),
                     "biased_mnist", {"source": "embedded", "preprocessing": preprocessing()})


def _input(folder, batch: int = 4) -> torch.Tensor:
    """A random model input as preprocessing.json describes it."""
    spec = json.loads((folder / "preprocessing.json").read_text())["input"]
    shape = [batch, *spec["shape"][1:]]
    generator = torch.Generator().manual_seed(7)
    if spec["dtype"] == "int64":  # token ids, a full attention mask, token type 0
        ids = torch.randint(1000, 2000, (shape[0], shape[2]), generator=generator)
        return torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    return torch.randn(shape, generator=generator)


def _reloaded_logits(fmt: str, path, x: torch.Tensor) -> torch.Tensor:
    """The artefact's logits, loaded the way a user would."""
    if fmt == "state_dict":
        return load_pruned(path)(x)
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch 2.x deprecates torch.jit; the format is still what libtorch loads
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))(x)
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _check_round_trip(run_dir, fmt: str, out=None) -> dict:
    manifest = export_run(run_dir, fmt, out)
    path = manifest["path"]
    assert os.path.isfile(path) and manifest["check"]["max_abs_diff"] <= 1e-4
    x = _input(Path(path).parent)
    with torch.no_grad():
        expected = load_pruned(run_dir / "pruned_bise.pt")(x)
        assert torch.allclose(_reloaded_logits(fmt, path, x), expected, atol=1e-4)
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar["format"] == fmt and sidecar["load"] and sidecar["source_checkpoint"] == "pruned_bise.pt"
    return manifest


@pytest.mark.parametrize("fmt", FORMATS)
def test_simple_convnet_round_trip(convnet_run, fmt):
    manifest = _check_round_trip(convnet_run, fmt)
    if fmt == "onnx":
        assert manifest["exporter"].startswith("torch.onnx.export(dynamo=True)")
        assert manifest["check"]["runtime"].startswith("onnxruntime")


def test_preprocessing_json(convnet_run, tmp_path):
    export_run(convnet_run, "state_dict", convnet_run / "elsewhere" / "model.pt")
    pre = json.loads((convnet_run / "elsewhere" / "preprocessing.json").read_text())
    assert pre["dataset"] == "biased_mnist" and pre["size"] == [3, 28, 28]
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3 and pre["scale"] == pytest.approx(1 / 255)
    assert pre["input"] == {**pre["input"], "dtype": "float32", "shape": ["batch", 3, 28, 28]}
    assert pre["output"]["class_names"] == [str(d) for d in range(10)] and pre["output"]["shape"] == ["batch", 10]
    # A data summary without info.preprocessing (written before the builders stored it): derived from the
    # dataset named in config.yaml, with the run's own image size.
    run = _fake_run(tmp_path / "celeba", build_backbone("simple_convnet", 2, width=0.125), "celeba",
                    {"image_size": 16})
    manifest = export_run(run, "onnx")
    pre = json.loads((run / "export" / "preprocessing.json").read_text())
    assert pre["resize"] == [16, 16] and pre["input"]["shape"] == ["batch", 3, 16, 16]
    assert pre["output"]["class_names"] == ["not Blond_Hair", "Blond_Hair"] and manifest["check"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("fmt", FORMATS)
def test_mlp_round_trip(tmp_path, fmt):
    from bise_cli.data.multicolor_mnist import preprocessing

    run = _fake_run(tmp_path / "run", build_backbone("mlp", 10), "multicolor_mnist",
                    {"preprocessing": preprocessing()})
    (tmp_path / "out").mkdir()
    manifest = _check_round_trip(run, fmt, tmp_path / "out")  # a folder: the default file name inside
    assert Path(manifest["path"]) == tmp_path / "out" / f"bise{FILE_SUFFIX[fmt]}"


def test_tiny_bert_exports_with_padding(tmp_path):
    # No info.preprocessing: derived from the dataset's builder with the run's tokenizer and max_length.
    run = _fake_run(tmp_path / "run", build_backbone("bert", 2, pretrained="tiny"), "civilcomments",
                    {"tokenizer": "minilm", "max_length": 16})
    onnx = export_run(run, "onnx")
    # torch.export cannot capture the mask-aware LayerNorm: the TorchScript-based exporter takes over.
    assert onnx["dynamo_failed"] and "dynamo=False" in onnx["exporter"] and onnx["check"]["max_abs_diff"] <= 1e-4
    script = export_run(run, "torchscript")
    pre = json.loads((run / "export" / "preprocessing.json").read_text())
    assert pre["kind"] == "text" and pre["input"]["shape"] == ["batch", 3, 16] and pre["input"]["dtype"] == "int64"
    x = _input(run / "export", batch=5)
    x[:, 1, 9:] = 0  # padded tails: the exported graphs must honour the attention mask
    x[:, 0, 9:] = 0
    with torch.no_grad():
        expected = load_pruned(run / "pruned_bise.pt")(x)
        for fmt, manifest in (("onnx", onnx), ("torchscript", script)):
            assert torch.allclose(_reloaded_logits(fmt, manifest["path"], x), expected, atol=1e-4)


def test_onnx_without_onnxruntime_is_reported_unverified(tmp_path, monkeypatch):
    from bise_cli.data.multicolor_mnist import preprocessing

    run = _fake_run(tmp_path / "run", build_backbone("mlp", 10), "multicolor_mnist",
                    {"preprocessing": preprocessing()})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    manifest = export_run(run, "onnx", exporter="torchscript")
    assert manifest["check"] == "onnxruntime not installed: not verified"


@pytest.mark.parametrize("module, args", [("biased_mnist", ()), ("multicolor_mnist", ()), ("cifar10c", ()),
                                          ("celeba", (8,))])
def test_preprocessing_reproduces_encode(module, args):
    data = importlib.import_module(f"bise_cli.data.{module}")
    pre = data.preprocessing(*args)
    x = torch.randint(0, 256, (2, *pre["size"]), dtype=torch.uint8)
    mean, std = (torch.tensor(pre[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    described = (x.float() * pre["scale"] - mean) / std
    assert torch.allclose(described, data.encode(x.clone()), atol=1e-5)


def test_errors_are_one_line(tmp_path, convnet_run):
    with pytest.raises(BiseError, match="run folder .* not found"):
        export_run(tmp_path / "missing", "onnx")
    vanilla_only = tmp_path / "vanilla_only"
    vanilla_only.mkdir()
    with pytest.raises(BiseError, match=r"pruned_bise.pt is missing \(the run had no bise stage\)"):
        export_run(vanilla_only, "onnx")
    with pytest.raises(BiseError, match="pruned models there: bise"):
        export_run(convnet_run, "onnx", stage="bise_ft")
    with pytest.raises(BiseError, match="unknown format 'tflite'; allowed: state_dict, torchscript, onnx"):
        export_run(convnet_run, "tflite")
    unknown = _fake_run(tmp_path / "table", build_backbone("mlp", 10), "table", {"source": "files"})
    with pytest.raises(BiseError, match="has no info.preprocessing and bise cannot derive it for dataset 'table'"):
        export_run(unknown, "onnx")
    env = dict(os.environ)
    for args, message in ((["--format", "tflite"], "error: unknown format 'tflite'"),
                          ([], "error: bise export needs --format")):
        result = subprocess.run([sys.executable, "-m", "bise_cli", "export", str(convnet_run), *args], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
