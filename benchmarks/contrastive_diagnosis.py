"""Issue 20 item 8: why SoftCon and BiasCon + BiasBal hardly train the MLP on Multi-Color MNIST.

Runs the package's contrastive loop (`bise_cli.baselines.contrastive.train_contrastive`, the code the stages
`softcon` and `bcon_bbal` call) on a seeded subset of Multi-Color MNIST under variants of the authors' recipe, and
prints one JSON line per (variant, epoch) with:

- `ce_plain`: the cross-entropy of the plain logits on the training subset (what the evaluated model predicts;
  BiasBal trains on shifted logits, so its training CE says nothing about them);
- `z_norm`: the mean L2 norm of the bottleneck features (the classifier's input, which the contrastive loss sees
  only after normalising them: their scale is free for the weight decay to shrink);
- `dead`: the share of bottleneck units that are zero on every training sample;
- `acc_unbiased`: the model's unbiased test accuracy (the four alignment patterns weighted equally), `acc_test`
  its plain test accuracy (81 % of the test digits conflict with both colours);

after the last epoch `probe_norm` / `probe_raw`: a fresh linear head fitted on the frozen features of one
half of the (unbiased) test split, L2-normalised as the contrastive loss sees them or raw as the classifier sees
them, and scored (plain accuracy) on the other half: how much of the digit the features carry, whatever the
model's own classifier learned (compare `acc_test`). The bias-capturing model of SoftCon is a vanilla MLP trained
here with the vanilla recipe for `--bias-epochs` epochs (the stage uses the run's vanilla model). A first line
gives BiasBal's cross-entropy at all-zero logits, log P(y | b) alone, for the joint colour pair and each colour.

    python benchmarks/contrastive_diagnosis.py --samples 10000 --epochs 9 \
        --variants vanilla vanilla:double_scale=0 softcon softcon:weight_decay=0 softcon:ce_weight=1 \
        softcon:double_scale=0 bcon_bbal bcon_bbal:weight_decay=0 bcon_bbal:ce_weight=1 bcon_bbal:double_scale=0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

from bise_cli.baselines import contrastive as con
from bise_cli.data import multicolor_mnist
from bise_cli.method.evaluate import split_metrics
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.train import fit, predict
from bise_cli.models.mlp import MLP

AUTHORS = {"epochs": 80, "batch_size": 128, "contrastive_batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4,
           "milestones": "auto", "gamma": 0.1, "ce_weight": 0.01, "temperature": 0.07, "ratio": 10,
           "double_scale": 1}  # the MLP's input / 255 again (backbone.double_scale); the authors': [-1, 1]


# The vanilla recipe of Multi-Color MNIST (conf/train/multicolor_mnist.yaml): Adam 1e-3, wd 1e-4, batch 256.
VANILLA = TrainRecipe(epochs=1, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=1e-4, name="vanilla")


def parse_variant(text: str) -> tuple[str, dict]:
    """'softcon:ce_weight=1,weight_decay=0' -> ("softcon", the authors' options with those two replaced)."""
    stage, _, changes = text.partition(":")
    if stage not in ("vanilla", "softcon", "bcon_bbal"):
        raise SystemExit(f"unknown variant stage {stage!r} (vanilla, softcon or bcon_bbal)")
    options = dict(AUTHORS)
    for item in filter(None, changes.split(",")):
        key, _, value = item.partition("=")
        if key not in options:
            raise SystemExit(f"unknown option {key!r} in variant {text!r}")
        options[key] = float(value) if "." in value or "e" in value else int(value)
    return stage, options


def linear_probe(z: torch.Tensor, y: torch.Tensor, seed: int, normalise: bool, steps: int = 200) -> float:
    """Accuracy of a linear head (L-BFGS, `steps` iterations, L2 1e-4) fitted on a seeded half of (z, y), scored
    on the other half. With `normalise` the features are L2-normalised first, as the contrastive loss sees them.
    Each dimension is then standardised with the fitting half's mean and std: an affine map, so the same linear
    hypotheses, but well conditioned (a feature vector of this MLP is mostly a shared constant part)."""
    z = F.normalize(z.float(), dim=1) if normalise else z.float()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    fit_rows, score_rows = order[: len(y) // 2], order[len(y) // 2:]
    mean, std = z[fit_rows].mean(0), z[fit_rows].std(0).clamp(min=1e-8)
    z = (z - mean) / std
    head = torch.nn.Linear(z.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(z[fit_rows]), y[fit_rows]) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(z[score_rows]).argmax(1) == y[score_rows]).float().mean())


def probes(model, test, seed: int) -> dict:
    """probe_norm / probe_raw: `linear_probe` on the model's test features, L2-normalised or as the head sees
    them."""
    z = predict(model, test, 1024, features=True)["z"]
    y = test.y.long()
    return {"probe_norm": round(linear_probe(z, y, seed, True), 4),
            "probe_raw": round(linear_probe(z, y, seed, False), 4)}


def epoch_stats(model, bundle) -> dict:
    """ce_plain, z_norm and dead on the training split, acc_unbiased and acc_test on test (see the module docstring)."""
    train = bundle["train"]
    model.eval()
    with torch.no_grad():
        z = predict(model, train, 1024, features=True)["z"]
        logits = model.classifier(z)
        ce = float(F.cross_entropy(logits, train.y.long()))
    test = split_metrics(model, bundle, "test", 1024, "cpu")
    model.train()
    return {"ce_plain": round(ce, 4), "z_norm": round(float(z.norm(dim=1).mean()), 4),
            "dead": round(float((z.max(0).values == 0).float().mean()), 3),
            "acc_unbiased": round(test["acc_unbiased"], 4), "acc_test": round(test["acc"], 4)}


def prior_cross_entropy(bundle) -> dict:
    """BiasBal's training cross-entropy with all-zero logits, i.e. how much of the training labels the log prior
    log P(y | b) explains by itself: for the joint colour pair (what `bcon_bbal` uses) and each colour alone."""
    train = bundle["train"]
    y = train.y.long()
    out = {}
    for name, b, values in (("joint", con.joint_bias(train.b, bundle.num_bias), bundle.num_bias ** 2),
                            ("left", train.b[:, 0].long(), bundle.num_bias),
                            ("right", train.b[:, 1].long(), bundle.num_bias)):
        prior = con.class_given_bias_prior(y, b, bundle.num_classes, values)
        logits = con.bias_balanced_logits(torch.zeros(len(y), bundle.num_classes), b, prior)
        out[f"biasbal_ce_at_zero_logits_{name}"] = round(float(F.cross_entropy(logits, y)), 4)
    return out


def run_vanilla(options: dict, bundle, seed: int) -> None:
    """The reference: a seeded MLP trained with the vanilla recipe (only `epochs` and `double_scale` of the
    options apply), with the same per-epoch and final lines."""
    torch.manual_seed(seed)
    model = MLP(bundle.num_classes, double_scale=bool(options["double_scale"]))
    label = "vanilla" + ("" if options["double_scale"] else " double_scale=0")
    start = time.perf_counter()

    def after_epoch(epoch: int) -> None:
        print(json.dumps({"variant": label, "epoch": epoch, **epoch_stats(model, bundle),
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)

    fit(model, bundle["train"], dataclasses.replace(VANILLA, epochs=options["epochs"]), seed=seed,
        description="vanilla", after_epoch=after_epoch)
    print(json.dumps({"variant": label, "final": True, **probes(model, bundle["test"], seed)}), flush=True)


def run_variant(stage: str, options: dict, bundle, bias_features: torch.Tensor, seed: int) -> None:
    """Train one variant from a seeded MLP and print its per-epoch and final JSON lines."""
    if stage == "vanilla":
        return run_vanilla(options, bundle, seed)
    train = bundle["train"]
    generator = torch.Generator().manual_seed(seed)
    if stage == "softcon":
        sampler = con.softcon_sampler_weights(bias_features, train.y, bundle.num_classes, generator)
        prior = bias = None

        def pairs(index):
            return con.softcon_pair_weights(bias_features[index])
    else:
        bias = con.joint_bias(train.b, bundle.num_bias)
        num_joint = bundle.num_bias ** train.b.shape[1]
        sampler = con.biascon_sampler_weights(train.y, bias, bundle.num_classes, num_joint)
        prior = con.class_given_bias_prior(train.y, bias, bundle.num_classes, num_joint)

        def pairs(index):
            return con.biascon_pair_weights(bias[index])
    torch.manual_seed(seed)
    model = MLP(bundle.num_classes, double_scale=bool(options["double_scale"]))
    section = {k: options[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "milestones", "gamma")}
    recipe = con.contrastive_recipe(section, stage)
    label = stage + "".join(f" {k}={v}" for k, v in options.items() if v != AUTHORS[k] and k != "epochs")
    start = time.perf_counter()

    def after_epoch(epoch: int) -> None:
        print(json.dumps({"variant": label, "epoch": epoch, **epoch_stats(model, bundle),
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)

    history = con.train_contrastive(model, train, recipe, pair_weights=pairs, sampler_weights=sampler,
                                    contrastive_batch_size=options["contrastive_batch_size"],
                                    ce_weight=options["ce_weight"], temperature=options["temperature"],
                                    ratio=options["ratio"], prior=prior, bias=bias, seed=seed,
                                    description=stage, after_epoch=after_epoch)
    print(json.dumps({"variant": label, "final": True, "train_ce": round(history[-1]["loss_ce"], 4),
                      "train_contrastive": round(history[-1]["loss_contrastive"], 4),
                      **probes(model, bundle["test"], seed)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default="datasets/mnist", help="folder with the MNIST IDX files")
    parser.add_argument("--samples", type=int, default=10000, help="training digits (a seeded subset)")
    parser.add_argument("--epochs", type=int, default=9, help="epochs of every variant (milestones auto)")
    parser.add_argument("--bias-epochs", type=int, default=10, help="vanilla epochs of SoftCon's bias model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["softcon", "bcon_bbal"],
                        help="stage[:option=value,...], options as in baselines.softcon, and double_scale")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = multicolor_mnist.build("files", args.mnist, args.seed, max_samples=args.samples)
    print(json.dumps({"samples": len(bundle["train"]), **prior_cross_entropy(bundle)}), flush=True)
    torch.manual_seed(args.seed)
    vanilla = MLP(bundle.num_classes)
    fit(vanilla, bundle["train"], dataclasses.replace(VANILLA, epochs=args.bias_epochs), seed=args.seed,
        description="vanilla")
    print(json.dumps({"variant": "vanilla (bias model)", "epoch": args.bias_epochs, **epoch_stats(vanilla, bundle),
                      **probes(vanilla, bundle["test"], args.seed)}), flush=True)
    bias_features = predict(vanilla, bundle["train"], 1024, features=True)["z"]
    for text in args.variants:
        stage, options = parse_variant(text)
        options["epochs"] = args.epochs
        run_variant(stage, options, bundle, bias_features, args.seed)


if __name__ == "__main__":
    main()
