"""Host synchronisations in the training and search loops, counted on the CPU.

The loops run on the `meta` device inside tests/meta_device.MetaDevice, which records every place where a GPU
would make the host wait (a device value read on the host, a blocking host-to-device copy, a data-dependent
output size). Each loop is run twice with the same epochs and four times as many batches, and with more epochs:
the count must not grow with the batches (no synchronisation inside a batch loop) and must grow by at most the
stated number per epoch: one for the loop's own numbers, plus one per evaluation pass the loop makes per epoch
(model selection on the validation split, the bias heads' accuracy after a refinement).
Also here: the MI weighted by the subset mask equals the MI of the selected samples.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from meta_device import meta_device

from bise_cli.baselines.ffw import FFWSettings, run_ffw, train_head_to_plateau
from bise_cli.baselines.lff import train_lff
from bise_cli.core.precision import FP32
from bise_cli.data.augment import crop_flip
from bise_cli.data.base import Split
from bise_cli.data.cifar10c import encode
from bise_cli.method.probe import feature_epoch, make_head, model_epoch
from bise_cli.method.recipe import TrainRecipe
from bise_cli.method.reweighting import sample_weights
from bise_cli.method.search import (
    SearchSettings,
    _Heads,
    _mask_epoch,
    mi_subset_mask,
    normalized_mutual_information,
    run_search,
)
from bise_cli.method.train import fit, freeze, predict
from bise_cli.models import build_backbone
from bise_cli.models.masking import GateSet, capture_input

META = torch.device("meta")


def _split(n: int, augment=None) -> Split:
    g = torch.Generator().manual_seed(n)
    y = torch.arange(n) % 2
    b = torch.where(torch.rand(n, generator=g) < 0.8, y, 1 - y)
    x = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=g)
    return Split(x, y, b, encode, augment=augment)


def _model(frozen: bool = False):
    torch.manual_seed(0)
    model = build_backbone("mlp", 2)
    return freeze(model) if frozen else model


def _count(run) -> list[str]:
    """The synchronisations of `run()` on the meta device (its setup done first, outside the count)."""
    with warnings.catch_warnings(), meta_device() as mode:
        warnings.simplefilter("ignore")
        loop = run()          # setup: models and data moved to the device
        mode.syncs.clear()
        loop()
        return mode.where()


def _check(counts: dict, per_epoch: int) -> None:
    """counts[(epochs, batches)]: the same epochs with 4x the batches add nothing; an epoch adds <= per_epoch."""
    (e1, b1), (e1_, b4), (e3, _) = sorted(counts, key=lambda k: (k[0], k[1]))
    assert len(counts[(e1, b1)]) == len(counts[(e1_, b4)]), (
        "a synchronisation per batch:\n" + "\n".join(sorted(set(counts[(e1_, b4)]) - set(counts[(e1, b1)]))
                                                    or counts[(e1_, b4)]))
    added = (len(counts[(e3, b1)]) - len(counts[(e1, b1)])) / (e3 - e1)
    assert added <= per_epoch, f"{added} synchronisations per epoch (allowed {per_epoch}):\n" + \
        "\n".join(counts[(e3, b1)])


GRID = [(1, 2), (1, 8), (3, 2)]  # (epochs, batches of 10 samples)


# ------------------------------------------------------------------------------------------ vanilla fit & FT

@pytest.mark.parametrize("select_best", [False, True], ids=["vanilla", "finetune"])
def test_fit_reads_the_device_once_per_epoch(select_best):
    """Vanilla training: one read per epoch. Fine-tuning (per-sample weights and best-epoch selection on the
    validation split): one more per epoch, the selection's prediction pass."""
    from bise_cli.baselines.matched import BestState

    def case(epochs, batches):
        def setup():
            model, split, val = _model().to(META), _split(10 * batches).to(META), _split(10).to(META)
            weights = sample_weights("group_balanced", split.y, split.b, 2, 2, None).to(META)
            best = BestState(model, val, 2, 2, batch_size=10, device=META) if select_best else None
            recipe = TrainRecipe(epochs, 10, scheduler="multistep", milestones=[1])
            return lambda: fit(model, split, recipe, device=META, sample_weights=weights,
                               after_epoch=best.update if best else None)
        return _count(setup)

    _check({key: case(*key) for key in GRID}, per_epoch=2 if select_best else 1)


def test_lff_reads_the_device_once_per_epoch():
    def case(epochs, batches):
        def setup():
            split = _split(10 * batches, crop_flip).to(META)
            return lambda: train_lff(lambda: _model(), split, TrainRecipe(epochs, 10), device=META)
        return _count(setup)

    counts = {key: case(*key) for key in GRID}
    # Two models are built and moved to the device per run (their weights: blocking copies, once).
    _check(counts, per_epoch=1)


# ---------------------------------------------------------------------------------------------- the search

def _search_setup(epochs: int, batches: int, augment: bool = False, mi_subset: str = "conflicting"):
    model = _model(frozen=True).to(META)
    search = _split(10 * batches, crop_flip if augment else None).to(META)
    val = _split(10).to(META)
    gates = GateSet(model.gate_points(), init=0.5).to(META).attach(model)
    # tau halves every epoch: `epochs` mask epochs, each followed by a head refinement.
    settings = SearchSettings(batch_size=10, eval_batch_size=10, head_pretrain_epochs=1, head_refine_epochs=2,
                              tau_period=1, tau_min=0.5 ** epochs - 1e-9, augment=augment, mi_subset=mi_subset)
    weights = sample_weights("group_balanced", search.y, search.b, 2, 2, None)
    return lambda: run_search(model, gates, search, val, None, num_classes=2, num_bias=2, weights=weights,
                              settings=settings, device=META, seed=0)


@pytest.mark.parametrize(("augment", "mi_subset"), [(False, "conflicting"), (True, "conflicting_plus_aligned")],
                         ids=["cached_features", "augmented"])
def test_search_reads_the_device_a_fixed_number_of_times_per_epoch(augment, mi_subset):
    """Per mask epoch: the epoch's sums and masks (one read), the validation pass that selects the masks (one),
    the heads' accuracies after their refinement (one). Nothing per batch, with or without augmentation (then
    the heads recompute features batch by batch) and with the MI on conflicting plus sampled aligned samples."""
    counts = {key: _count(lambda key=key: _search_setup(*key, augment=augment, mi_subset=mi_subset)) for key in GRID}
    _check(counts, per_epoch=3)


def test_one_mask_epoch_reads_once():
    with warnings.catch_warnings(), meta_device() as mode:
        warnings.simplefilter("ignore")
        model = _model(frozen=True).to(META)
        search = _split(40).to(META)
        gates = GateSet(model.gate_points(), init=0.5).to(META).attach(model)
        settings = SearchSettings(batch_size=10, mi_subset="conflicting_plus_aligned")
        heads = _Heads(model, search, 2, settings, True, torch.Generator().manual_seed(0), 0, META)
        opt = torch.optim.SGD(gates.parameters(), lr=0.1)
        weights = sample_weights("none", search.y, search.b, 2, 2, None).to(META)

        class Bar:
            def advance_batch(self):
                pass

        mode.syncs.clear()
        with capture_input(model.classifier) as tap:
            _mask_epoch(model, gates, heads, opt, search, weights, settings, 2, torch.Generator().manual_seed(0),
                        META, 1, Bar(), tap)
    assert len(mode.syncs) == 1, mode.where()


def test_dead_unit_pass_and_epoch_undo_never_wait():
    """The early stop's pass over the search split under the current masks (bise_cli.method.frozen.dead_unit_pass),
    the watch for units waking up after the stop, and the copy and restore of an epoch's state stay on the
    device: nothing is read back (the criterion reads its verdict once, in gate_finality)."""
    from bise_cli.method.frozen import EpochState, dead_unit_pass, revived

    with warnings.catch_warnings(), meta_device() as mode:
        warnings.simplefilter("ignore")
        model = _model(frozen=True).to(META)
        search = _split(40).to(META)
        gates = GateSet(model.gate_points(), init=0.5).to(META).attach(model)
        heads = [make_head(model.classifier.in_features, 2, 0.1, 0.9, 1e-4, 0)]
        heads[0][0].to(META)
        opt = torch.optim.SGD(gates.parameters(), lr=0.1, momentum=0.9)
        for param in gates.parameters():  # momentum buffers to copy
            param.grad = torch.zeros_like(param)
        opt.step()
        generator = torch.Generator().manual_seed(0)
        mode.syncs.clear()
        dead = dead_unit_pass(model, gates, search, 10, FP32, META)
        woke = revived(gates.peaks(), dead)
        state = EpochState(gates, opt, heads, generator)
        state.restore(gates, opt, heads, generator)
    assert mode.syncs == [], mode.where()
    assert woke.device == META and all(d is not None and d.device == META for d in dead.values())


def test_head_epochs_on_cached_features_never_wait():
    with meta_device() as mode:
        z = torch.randn(200, 8).to(META)
        b = (torch.arange(200) % 2).to(META)
        heads = [make_head(8, 2, 0.1, 0.9, 1e-4, k) for k in range(2)]
        for head, _ in heads:
            head.to(META)
        mode.syncs.clear()
        for _ in range(3):
            feature_epoch(heads, z, torch.stack([b, b], 1), 10, torch.Generator().manual_seed(0))
    assert mode.syncs == [], mode.where()


def test_head_epochs_on_recomputed_features_never_wait():
    with warnings.catch_warnings(), meta_device() as mode:
        warnings.simplefilter("ignore")
        model = _model(frozen=True).to(META)
        split = _split(40, crop_flip).to(META)
        heads = [make_head(model.classifier.in_features, 2, 0.1, 0.9, 1e-4, 0)]
        heads[0][0].to(META)
        mode.syncs.clear()
        model_epoch(heads, model, split, 10, torch.Generator().manual_seed(0), META)
    assert mode.syncs == [], mode.where()


def test_predict_reads_once():
    with warnings.catch_warnings(), meta_device() as mode:
        warnings.simplefilter("ignore")
        model, split = _model().to(META), _split(40).to(META)
        mode.syncs.clear()
        out = predict(model, split, 10, META)
        assert len(mode.syncs) == 1, mode.where()
        predict(model, split, 10, META, features=True)
        assert len(mode.syncs) == 3, mode.where()  # predictions and labels in one copy, features in another
        predict(model, split, 10, META, features=True, host=False)
        assert len(mode.syncs) == 3
    assert out["pred"].device.type == "cpu" and torch.equal(out["y"], torch.arange(40) % 2)


# --------------------------------------------------------------------------------------------------------- FFW

def test_ffw_reads_the_device_a_fixed_number_of_times_per_epoch():
    def setup(epochs, batches):
        model = _model(frozen=True).to(META)
        train, val = _split(10 * batches).to(META), _split(20).to(META)
        settings = FFWSettings(batch_size=10, eval_batch_size=10, max_epochs=epochs, head_max_epochs=2,
                               head_patience=0, t_patience=0)
        return lambda: run_ffw(model, train, val, num_bias=2, settings=settings, device=META, seed=0)

    counts = {key: _count(lambda key=key: setup(*key)) for key in GRID}
    # Per epoch: the gate epoch, the head refit (<= head_max_epochs reads), the validation MI, the masks, the
    # fresh probe (<= head_max_epochs + 1) and the refit after a temperature drop (<= head_max_epochs).
    _check(counts, per_epoch=1 + 2 + 1 + 1 + 3 + 2)


def test_ffw_head_epochs_read_once_each():
    with meta_device() as mode:
        z = torch.randn(100, 8).to(META)
        b = (torch.arange(100) % 2).to(META)
        head, opt = make_head(8, 2, 0.1, 0.9, 1e-4, 0)
        head.to(META)
        mode.syncs.clear()
        epochs = train_head_to_plateau(head, opt, z, b, batch_size=10, patience=1, tolerance=1e-3, max_epochs=4,
                                       generator=torch.Generator().manual_seed(0))
    assert len(mode.syncs) == epochs, mode.where()


# ---------------------------------------------------------------------------------------------- pruned BERT

def test_mask_aware_layer_norm_decides_its_fixed_mask_once():
    from bise_cli.models.bert import MaskAwareLayerNorm
    from bise_cli.models.masking import Gate

    norm = MaskAwareLayerNorm(torch.nn.LayerNorm(8))
    norm.fixed_mask = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1])
    with meta_device() as mode:
        norm.to(META)
        x = torch.randn(2, 3, 8).to(META)
        mode.syncs.clear()
        for _ in range(3):
            norm(x)
        assert len(mode.syncs) == 1, mode.where()   # the first forward after the mask was set
        ones = torch.ones(8).to(META)
        mode.syncs.clear()
        norm.fixed_mask.copy_(ones)  # in place (as load_state_dict does): decided again, once
        norm(x)
        norm(x)
        assert len(mode.syncs) == 1, mode.where()
        # Bound to a search gate (which changes every step): no read at all.
        gate = Gate(8, init=0.5, dim=-1).to(META)
        norm.fixed_mask = None
        norm.bind(gate)
        mode.syncs.clear()
        norm(x)
        gate.mode = "fixed"
        norm(x)
    assert mode.syncs == [], mode.where()


@pytest.mark.parametrize("kept", ["all", "none", "some"])
def test_branchless_layer_norm_equals_the_fixed_mask_path(kept):
    """The gated path picks between the plain and the masked LayerNorm on the device; its values are exactly
    those of the pruned model's path, which decides once on the host."""
    from bise_cli.models.bert import MaskAwareLayerNorm
    from bise_cli.models.masking import Gate

    torch.manual_seed(0)
    base = torch.nn.LayerNorm(8)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.uniform_(-0.5, 0.5)
    mask = {"all": torch.ones(8), "none": torch.zeros(8), "some": torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1])}[kept]
    x = torch.randn(4, 5, 8)
    fixed = MaskAwareLayerNorm(base)
    fixed.fixed_mask = mask
    gated = MaskAwareLayerNorm(base)
    gate = Gate(8, dim=-1)
    with torch.no_grad():
        gate.logits.copy_(torch.where(mask.bool(), 1.0, -1.0))
    gate.mode = "fixed"
    gated.bind(gate)
    assert torch.equal(fixed(x), gated(x))
    if kept == "all":
        assert torch.equal(gated(x), base(x))
    if kept == "none":
        assert torch.equal(gated(x), x)


# -------------------------------------------------------------------------------------------------- MI subset

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_mi_equals_the_mi_of_the_selected_samples(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, k = 64, 2 + trial % 4
        b = torch.randint(0, k, (n,), generator=g)
        q = torch.softmax(torch.randn(n, k, generator=g, dtype=dtype), 1).requires_grad_(True)
        subset = torch.rand(n, generator=g) < 0.3
        weighted = normalized_mutual_information(b, q, k, subset)
        selected = normalized_mutual_information(b[subset], q[subset], k)
        tolerance = 1e-6 if dtype == torch.float32 else 1e-12
        assert abs(weighted.item() - selected.item()) <= tolerance * max(1.0, abs(selected.item()))
        # The same gradient on the selected rows, none on the others.
        grad_w, = torch.autograd.grad(weighted, q)
        grad_s, = torch.autograd.grad(selected, q)
        assert torch.allclose(grad_w[subset], grad_s[subset], atol=tolerance, rtol=tolerance * 10)
        assert torch.count_nonzero(grad_w[~subset]) == 0


def test_weighted_mi_of_an_empty_subset_is_zero_without_gradient():
    q = torch.softmax(torch.randn(10, 3), 1).requires_grad_(True)
    mi = normalized_mutual_information(torch.zeros(10, dtype=torch.long), q, 3, torch.zeros(10, dtype=torch.bool))
    assert mi.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(mi, q)[0]) == 0


def test_mi_subsets_are_drawn_on_the_device():
    y = torch.zeros(25, dtype=torch.long)
    column = torch.tensor([0] * 20 + [1] * 5)
    for subset in ("conflicting", "all", "conflicting_plus_aligned"):
        with meta_device() as mode:
            mask = mi_subset_mask(column.to(META), y.to(META), SearchSettings(mi_subset=subset),
                                  torch.Generator().manual_seed(0))
        assert mask.device == META and mode.count("item") == mode.count("d2h") == 0
        assert not any(kind.startswith(("data-dependent", "implicit")) for kind, _ in mode.syncs), mode.where()
