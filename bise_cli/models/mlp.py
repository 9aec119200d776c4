"""The three-hidden-layer MLP of LfF (Nam et al., NeurIPS 2020) and DebiAN (Li et al., ECCV 2022) that BISE uses
on Multi-Color MNIST.

The input (B, 3, 28, 28) is flattened in CHW order to 2352 features, then `feature` = [Linear 2352->100, ReLU,
Linear 100->100, ReLU, Linear 100->100, ReLU] and `classifier` = Linear 100->10. BISE gates each hidden layer
right after its ReLU (3 gates, 300 units); the classifier is not gated. Weights keep PyTorch's default Linear
initialisation, as in LfF and DebiAN. Module names follow DebiAN's `MLP` (feature.*, classifier.*), so its
state dicts load directly.

`double_scale`: forward divides the flattened input by 255 although the data are already in [0, 1]
(ToTensor), so the network sees values in [0, 1/255]. This is an inherited quirk (LfF -> DebiAN -> BISE), kept
on by default because the published numbers were produced with it; it changes the effective input scale, and
so the optimisation, not the function class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bise_cli.models.base import Backbone
from bise_cli.models.masking import GatePoint
from bise_cli.models.slicing import kept_indices, slice_linear


class MLP(Backbone):
    """The Multi-Color MNIST backbone; `features(x)` returns the bottleneck (the input of `classifier`)."""

    arch_name = "mlp"

    def __init__(self, num_classes: int = 10, in_features: int = 3 * 28 * 28, hidden: Sequence[int] = (100, 100, 100),
                 double_scale: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_features
        for units in hidden:
            # Separate nn.ReLU modules (not F.relu) so that the gate hooks can attach to each activation.
            layers += [nn.Linear(previous, units), nn.ReLU()]
            previous = units
        self.feature = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, num_classes)
        self.in_features = in_features
        self.hidden = [int(units) for units in hidden]
        self.double_scale = bool(double_scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.size(0), -1)  # CHW order, as x.view(B, -1) in DebiAN
        if self.double_scale:
            x = x / 255
        return self.feature(x)


    def gate_points(self) -> list[GatePoint]:
        """One gate after each hidden ReLU; the producer is the Linear whose rows compute the units."""
        return [GatePoint(f"fc{i}", f"feature.{2 * i + 1}", units, producer=f"feature.{2 * i}")
                for i, units in enumerate(self.hidden)]

    def constructor_kwargs(self) -> dict:
        """Arguments that rebuild this architecture (saved with pruned checkpoints)."""
        return {"num_classes": self.classifier.out_features, "in_features": self.in_features,
                "hidden": list(self.hidden), "double_scale": self.double_scale}

    def pruned_copy(self, masks: dict[str, torch.Tensor]) -> MLP:
        """A standalone smaller MLP equal to this one with its gates fixed to `masks`.

        Unit i of hidden layer k is removed by dropping row i of its Linear and column i of the next Linear (or
        of the classifier). Gates sit after the ReLU, so a pruned unit contributes exact zeros and the removal is
        exact. A layer with every unit pruned keeps one unit whose outgoing weights are zero."""
        kept = [kept_indices(masks[point.name]) for point in self.gate_points()]
        pruned = MLP(self.classifier.out_features, self.in_features, [len(index) for index, _ in kept],
                     self.double_scale).to(self.classifier.weight.device)
        previous, dead = None, False
        for i, (index, emptied) in enumerate(kept):
            pruned.feature[2 * i] = slice_linear(self.feature[2 * i], index, previous, dead_input=dead)
            previous, dead = index, emptied
        pruned.classifier = slice_linear(self.classifier, None, previous, dead_input=dead)
        return pruned.eval()
