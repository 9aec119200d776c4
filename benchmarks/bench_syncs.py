"""Host synchronisations of each loop, counted on the CPU: one epoch with 2 and with 8 batches on torch's `meta`
device, inside tests/meta_device.MetaDevice (a read of a device value, a blocking host-to-device copy, a
data-dependent size: what would make the host wait for a GPU). A count that grows with the batches is a
synchronisation inside a batch loop; the rest are once per epoch or per run (setup copies included).

    python benchmarks/bench_syncs.py [NAME]      (NAME: a word of the loop's name, e.g. search)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from meta_device import meta_device  # noqa: E402

from bise_cli.baselines.ffw import FFWSettings, run_ffw  # noqa: E402
from bise_cli.baselines.lff import train_lff  # noqa: E402
from bise_cli.data.base import Split  # noqa: E402
from bise_cli.data.multicolor_mnist import encode  # noqa: E402
from bise_cli.method.probe import feature_epoch, make_head  # noqa: E402
from bise_cli.method.recipe import TrainRecipe  # noqa: E402
from bise_cli.method.reweighting import sample_weights  # noqa: E402
from bise_cli.method.search import SearchSettings, run_search  # noqa: E402
from bise_cli.method.train import fit, freeze  # noqa: E402
from bise_cli.models import build_backbone  # noqa: E402
from bise_cli.models.masking import GateSet  # noqa: E402

META = torch.device("meta")


def split(n: int) -> Split:
    g = torch.Generator().manual_seed(n)
    y = torch.arange(n) % 2
    b = torch.where(torch.rand(n, generator=g) < 0.8, y, 1 - y)
    return Split(torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g), y, b, encode)


def model(frozen: bool = False):
    torch.manual_seed(0)
    m = build_backbone("mlp", 2)
    return freeze(m) if frozen else m


def fit_case(batches: int):
    m, s = model().to(META), split(10 * batches).to(META)
    return lambda: fit(m, s, TrainRecipe(epochs=1, batch_size=10), device=META)


def lff_case(batches: int):
    s = split(10 * batches).to(META)
    return lambda: train_lff(model, s, TrainRecipe(epochs=1, batch_size=10), device=META)


def search_case(batches: int):
    m = model(True).to(META)
    s, v = split(10 * batches).to(META), split(10).to(META)
    gates = GateSet(m.gate_points(), init=0.5).to(META).attach(m)
    settings = SearchSettings(batch_size=10, eval_batch_size=10, head_pretrain_epochs=1, head_refine_epochs=1,
                              tau_period=1, tau_min=0.5 - 1e-9)
    w = sample_weights("group_balanced", s.y, s.b, 2, 2, None)
    return lambda: run_search(m, gates, s, v, None, num_classes=2, num_bias=2, weights=w, settings=settings,
                              device=META, seed=0)


def head_case(batches: int):
    z = torch.randn(10 * batches, 8).to(META)
    b = (torch.arange(10 * batches) % 2).to(META)
    head = make_head(8, 2, 0.1, 0.9, 1e-4, 0)
    head[0].to(META)
    return lambda: feature_epoch([head], z, b, 10, torch.Generator().manual_seed(0))


def ffw_case(batches: int):
    m = model(True).to(META)
    t, v = split(10 * batches).to(META), split(20).to(META)
    settings = FFWSettings(batch_size=10, eval_batch_size=10, max_epochs=1, head_max_epochs=1, head_patience=0,
                           t_patience=0)
    return lambda: run_ffw(m, t, v, num_bias=2, settings=settings, device=META, seed=0)


CASES = {"fit (1 epoch)": fit_case, "LfF (1 epoch)": lff_case, "BISE search (1 mask epoch)": search_case,
         "bias-head epoch, cached features": head_case, "FFW (1 epoch)": ffw_case}


def count(case, batches: int) -> int:
    with warnings.catch_warnings(), meta_device() as mode:
        warnings.simplefilter("ignore")
        run = case(batches)
        mode.syncs.clear()
        run()
        return len(mode.syncs)


def main() -> None:
    for name, case in CASES.items():
        if len(sys.argv) > 1 and sys.argv[1] not in name:
            continue
        try:
            print(f"{name:<34} 2 batches: {count(case, 2):4d}   8 batches: {count(case, 8):4d}", flush=True)
        except Exception as error:  # noqa: BLE001 (older code can fail on `meta`: say so and go on)
            print(f"{name:<34} failed: {str(error).splitlines()[0]}", flush=True)


if __name__ == "__main__":
    main()
