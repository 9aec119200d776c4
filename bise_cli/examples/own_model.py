"""The "bring your own model and data" example, step 1: make the user's side of the story from shipped data.

It writes what a user typically has, into one folder (default `outputs/example_own_model`):
- `images/<split>/<index>.png` and `manifest.csv`: colour-biased digits (the BiasedMNIST construction of ReBias,
  Bahng et al., ICML 2020, on the MNIST files shipped in `datasets/mnist`, or the embedded digits when absent):
  in the training rows the background colour matches the digit for a fraction `rho`, in the validation and
  test rows it is random. Columns: `path`, `digit` (the target), `background` (the bias, a colour name), `split`.
- `user_resnet18.pt`: a torchvision ResNet-18 trained on the training rows by a plain PyTorch loop, the way a
  user's own code would (no bise involved), saved as a plain state dict.

Step 2 is `bise run experiment=example/own_model`, which reads both through `dataset=table` and
`vanilla_checkpoint=`, runs BISE, prunes, writes the model card; step 3 `bise export RUN --format onnx`.
`make example-own-model` runs the three steps (README: "Your own model and data").

    python -m bise_cli.examples.own_model [--out DIR] [--train N] [--test N] [--epochs E] [--rho R] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from bise_cli.data.biased_mnist import render
from bise_cli.data.mnist_source import find_idx_files, load_digits, load_embedded

# Background colours of BiasedMNIST, by index (colour k is the aligned colour of digit k).
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "pink", "purple", "grey")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def colour_digits(labels: torch.Tensor, rho: float | None, rng: np.random.Generator) -> torch.Tensor:
    """Background colour index per digit. With `rho`: per class, round(rho * n) random digits get the class's own
    colour and the rest cycle through the nine other colours (so every (digit, colour) group has a sample once
    a class has 9 conflicting digits); `rho=None`: uniformly random colours (unbiased evaluation data)."""
    if rho is None:
        return torch.from_numpy(rng.integers(0, len(COLOUR_NAMES), len(labels)))
    colours = labels.clone()
    for digit in range(len(COLOUR_NAMES)):
        index = torch.from_numpy(rng.permutation(np.flatnonzero(labels.numpy() == digit)))
        conflicting = index[round(rho * len(index)):]
        others = torch.tensor([c for c in rng.permutation(len(COLOUR_NAMES)) if c != digit])
        colours[conflicting] = others[torch.arange(len(conflicting)) % len(others)]
    return colours


def write_dataset(out: Path, sizes: dict[str, int], rho: float, seed: int, mnist_root: str) -> dict:
    """Colour `sizes[split]` digits per split (train at `rho`, val and test uniformly), write them as PNG files and
    the manifest; returns the counts and aligned fractions."""
    # The shipped MNIST files when present, else the embedded digits: the example never downloads.
    digits = load_digits("files", mnist_root) if find_idx_files(mnist_root) else load_embedded()
    rng = np.random.default_rng(seed)
    train_order = rng.permutation(len(digits.train_labels))  # train and val: disjoint digits of MNIST-train
    sources = {"train": (digits.train_images, digits.train_labels, train_order[:sizes["train"]], rho),
               "val": (digits.train_images, digits.train_labels,
                       train_order[sizes["train"]:sizes["train"] + sizes["val"]], None),
               "test": (digits.test_images, digits.test_labels,
                        rng.permutation(len(digits.test_labels))[:sizes["test"]], None)}
    rows, counts = [], {}
    for split, (images, labels, order, split_rho) in sources.items():
        order = torch.from_numpy(order)
        y = labels[order]
        colours = colour_digits(y, split_rho, rng)
        pictures = render(images[order], colours)  # (n, 3, 28, 28) uint8: white digit on a coloured ground
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(len(y)):
            path = folder / f"{i:05d}.png"
            Image.fromarray(pictures[i].permute(1, 2, 0).numpy()).save(path)
            rows.append({"path": str(path.relative_to(out)), "digit": int(y[i]),
                         "background": COLOUR_NAMES[int(colours[i])], "split": split})
        counts[split] = {"rows": len(y), "aligned": round(float((colours == y).float().mean()), 4)}
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "digit", "background", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return counts


def read_split(out: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The PNG files of one split, as the user's own loader would read them: (uint8 N x 3 x H x W, labels)."""
    with open(out / "manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split]
    images = np.stack([np.asarray(Image.open(out / r["path"]).convert("RGB")) for r in rows])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([int(r["digit"]) for r in rows])


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> [0, 1] -> ImageNet normalisation: the table dataset's default (`dataset.normalize: imagenet`)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def train_user_model(out: Path, epochs: int, seed: int, batch_size: int = 128, lr: float = 1e-3) -> dict:
    """A plain PyTorch training loop over the training PNGs; saves `user_resnet18.pt` (a state dict)."""
    torch.manual_seed(seed)
    x, y = read_split(out, "train")
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order, total = torch.randperm(len(y)), 0.0
        for start in range(0, len(y), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(model(preprocess(x[index])), y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
        print(f"  epoch {epoch}/{epochs}: loss {total / len(y):.4f}", flush=True)
    model.eval()
    x_test, y_test = read_split(out, "test")
    with torch.no_grad():
        accuracy = float(torch.cat([model(preprocess(x_test[i:i + 500])).argmax(1)
                                    for i in range(0, len(y_test), 500)]).eq(y_test).float().mean())
    torch.save(model.state_dict(), out / "user_resnet18.pt")
    return {"train_seconds": round(time.perf_counter() - started, 1), "test_accuracy": round(accuracy, 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bise_cli.examples.own_model", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/example_own_model", help="folder for images, manifest, model")
    parser.add_argument("--train", type=int, default=6000, help="training images (default 6000)")
    parser.add_argument("--val", type=int, default=1000, help="validation images, randomly coloured (default 1000)")
    parser.add_argument("--test", type=int, default=2000, help="test images, randomly coloured (default 2000)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the user's training loop (default 3)")
    parser.add_argument("--rho", type=float, default=0.98,
                        help="colour-digit correlation of the training rows (default 0.98: every (digit, colour) "
                        "group keeps a few training images at 600 per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mnist", default="datasets/mnist", help="MNIST IDX folder (else the embedded digits)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing colour-biased digits (rho {args.rho}) to {out}/images and {out}/manifest.csv", flush=True)
    counts = write_dataset(out, {"train": args.train, "val": args.val, "test": args.test}, args.rho, args.seed,
                           args.mnist)
    print(f"training the user's torchvision resnet18 ({args.epochs} epochs) -> {out}/user_resnet18.pt", flush=True)
    trained = train_user_model(out, args.epochs, args.seed)
    summary = {"data": counts, "user_model": trained, "settings": vars(args)}
    (out / "example.json").write_text(json.dumps(summary, indent=2))
    print(f"user model: test accuracy {trained['test_accuracy']:.3f} on randomly coloured digits "
          f"({trained['train_seconds']} s)\nnext: bise run experiment=example/own_model", flush=True)


if __name__ == "__main__":
    main()
