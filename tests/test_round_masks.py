"""round_masks: kept-unit counts rounded up to a multiple, extra units by the highest gate logit."""

from __future__ import annotations

import pytest
import torch

from bise_cli.models.masking import round_masks


def _case():
    mask = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)   # 3 of 10 kept
    score = torch.tensor([2.0, -0.1, -3.0, 1.0, -0.5, -0.1, -2.0, -4.0, 0.5, -1.0])
    return mask, score


def test_rounds_up_with_highest_scores_and_ties_to_lower_index():
    mask, score = _case()
    out = round_masks({"a": mask}, {"a": score}, 4)["a"]
    assert int(out.sum()) == 4 and bool(out[mask].all())
    assert out.nonzero().squeeze(1).tolist() == [0, 1, 3, 8]          # -0.1 at 1 and 5: index 1 wins
    out = round_masks({"a": mask}, {"a": score}, 5)["a"]
    assert out.nonzero().squeeze(1).tolist() == [0, 1, 3, 5, 8]


def test_never_above_width_and_multiple_one_is_identity():
    mask, score = _case()
    assert bool(round_masks({"a": mask}, {"a": score}, 16)["a"].all())     # 16 > 10 units: all kept
    same = round_masks({"a": mask}, {"a": score}, 1)["a"]
    assert torch.equal(same, mask) and same is not mask


def test_emptied_layer_stays_empty_and_exact_multiples_unchanged():
    empty, full8 = torch.zeros(6, dtype=torch.bool), torch.tensor([1] * 8 + [0] * 8, dtype=torch.bool)
    out = round_masks({"e": empty, "f": full8}, {"e": torch.ones(6), "f": torch.randn(16)}, 8)
    assert not out["e"].any() and torch.equal(out["f"], full8)


def test_deterministic_and_counts_are_multiples():
    g = torch.Generator().manual_seed(0)
    masks = {f"l{i}": torch.rand(n, generator=g) < 0.5 for i, n in enumerate((16, 32, 64, 128, 30))}
    scores = {k: torch.randn(m.numel(), generator=g) for k, m in masks.items()}
    first, second = round_masks(masks, scores, 8), round_masks(masks, scores, 8)
    for name, mask in masks.items():
        assert torch.equal(first[name], second[name])
        kept = int(first[name].sum())
        assert kept % 8 == 0 or kept == mask.numel()
        assert bool(first[name][mask].all())


def test_bad_inputs():
    mask, score = _case()
    for multiple in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="multiple"):
            round_masks({"a": mask}, {"a": score}, multiple)
    with pytest.raises(ValueError, match="no scores"):
        round_masks({"a": mask}, {}, 4)
    with pytest.raises(ValueError, match="entries"):
        round_masks({"a": mask}, {"a": score[:5]}, 4)
