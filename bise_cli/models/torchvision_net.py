"""Any torchvision classification model as a bise backbone (`backbone=torchvision backbone.arch=NAME`), with
BISE's gates placed automatically and exact physical pruning (bise_cli.models.auto_gates: Torch-Pruning's
dependency graph, Fang et al., CVPR 2023).

The classifier (the final nn.Linear whose output is the model's output: resnet `fc`, mobilenet/efficientnet/
convnext `classifier[-1]`, vit `heads.head`, ...) is replaced by a fresh nn.Linear with `num_classes` outputs.

`weights`: `none` (random), `imagenet` (torchvision's DEFAULT weights; offline, a warning and random weights,
as backbone=resnet18 does) or a PATH to a state dict of the torchvision model (.pt/.pth via
torch.load(weights_only=True), or .safetensors; bise_cli.models.checkpoints), loaded once the classifier is replaced:
the file's head is kept only if it already has `num_classes` outputs, any other mismatch is a one-line error.

`input_size` (C, H, W) is the example input used to trace the dependency graph and to check that pruning is
exact; convnets accept any size (a small one traces faster), ViT and Swin need their native 224.
`residual_gates`: per_block (default: a gate on each residual block's output, as the paper's ResNet-18; for
`arch=resnet18` the gates of backbone=resnet18) or shared (see bise_cli.models.auto_gates).
"""

from __future__ import annotations

import difflib
import logging
from urllib.error import URLError

from bise_cli.core.errors import BiseError
from bise_cli.models.auto_gates import AutoGatedNet, PrunedAutoNet, rebuild_pruned

log = logging.getLogger(__name__)

# Models whose auxiliary heads make the training-mode output a tuple: bise needs plain logits. (With weights,
# torchvision drops the auxiliary heads itself, and refuses these arguments.)
NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True},
          "inception_v3": {"aux_logits": False, "init_weights": True}}


def torchvision_names() -> list[str]:
    """Every torchvision classification model name (torchvision.models.list_models)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_name(kind: str, arch: str, names: list[str]) -> None:
    """A one-line BiseError naming a few close names unless `arch` is one of `names`."""
    if arch in names:
        return
    close = difflib.get_close_matches(str(arch), names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(names[:5])}"
    raise BiseError(f"unknown {kind} model {arch!r}; {hint} ({len(names)} names in all)")


def build_torchvision(arch: str, weights: str | None):
    """The torchvision model `arch` with its ImageNet head: random or torchvision's DEFAULT weights (a PATH is
    loaded later, by AutoGatedNet, once the classifier is replaced)."""
    import torchvision

    check_name("torchvision classification", arch, torchvision_names())
    if weights == "imagenet":
        try:
            return torchvision.models.get_model(arch, weights="DEFAULT")
        except (URLError, OSError, RuntimeError) as error:
            log.warning("torchvision %s ImageNet weights unavailable (%s): using random weights", arch,
                        str(error).splitlines()[0][:120])
    return torchvision.models.get_model(arch, weights=None, **NO_AUX.get(arch, {}))


class TorchvisionNet(AutoGatedNet):
    """A torchvision classification model behind bise's backbone interface, with automatic gates."""

    def __init__(self, num_classes: int = 10, arch: str = "resnet18", weights: str | None = None,
                 input_size=(3, 224, 224), residual_gates: str = "per_block", verify: bool = True,
                 force_masked=()):
        path = None if weights in (None, "none", "imagenet") else str(weights)
        super().__init__(build_torchvision(arch, weights), num_classes, input_size, residual_gates,
                         spec={"arch": arch}, family=f"torchvision {arch}", weights_path=path, verify=verify,
                         force_masked=force_masked)


class PrunedTorchvisionNet(PrunedAutoNet):
    """A physically pruned TorchvisionNet (checkpoint architecture `pruned_torchvision`)."""

    arch_name = "pruned_torchvision"


TorchvisionNet.pruned_class = PrunedTorchvisionNet


def PrunedTorchvision(**spec) -> PrunedTorchvisionNet:
    """Rebuild a pruned torchvision architecture from `constructor_kwargs` (bise_cli.method.prune's loader)."""
    return rebuild_pruned(TorchvisionNet, spec)
