"""Any timm model as a bise backbone (`backbone=timm backbone.arch=NAME`; the optional `timm` extra), with
BISE's gates placed automatically and exact physical pruning, exactly as for torchvision models
(bise_cli.models.auto_gates: Torch-Pruning's dependency graph, Fang et al., CVPR 2023).

`weights`: `none` (timm.create_model(pretrained=False), offline), `imagenet` (timm's default pretrained tag,
downloaded from the Hugging Face Hub once; offline, a warning and random weights) or a PATH to a state dict
(.pt/.pth/.bin or .safetensors) of the timm model; `input_size` as for backbone=torchvision.
"""

from __future__ import annotations

import logging

from bise_cli.core.errors import BiseError
from bise_cli.models.auto_gates import AutoGatedNet, PrunedAutoNet, rebuild_pruned
from bise_cli.models.torchvision_net import check_name

log = logging.getLogger(__name__)


def _timm():
    try:
        import timm
    except ImportError:
        raise BiseError("backbone=timm needs the timm package: pip install -e '.[timm]'") from None
    return timm


def build_timm(arch: str, weights: str | None):
    """The timm model `arch` (a name from timm.list_models(), optionally with a pretrained tag `name.tag`)."""
    timm = _timm()
    check_name("timm", str(arch).split(".")[0], timm.list_models())
    if weights == "imagenet":
        try:
            return timm.create_model(arch, pretrained=True)
        except Exception as error:  # no network, no Hub cache, no pretrained tag: all mean "no weights here"
            log.warning("timm %s pretrained weights unavailable (%s): using random weights", arch,
                        str(error).splitlines()[0][:120] if str(error) else type(error).__name__)
    return timm.create_model(arch, pretrained=False)


class TimmNet(AutoGatedNet):
    """A timm model behind bise's backbone interface, with automatic gates."""

    def __init__(self, num_classes: int = 10, arch: str = "resnet18", weights: str | None = None,
                 input_size=(3, 224, 224), residual_gates: str = "per_block", verify: bool = True,
                 force_masked=()):
        path = None if weights in (None, "none", "imagenet") else str(weights)
        super().__init__(build_timm(arch, weights), num_classes, input_size, residual_gates, spec={"arch": arch},
                         family=f"timm {arch}", weights_path=path, verify=verify, force_masked=force_masked)


class PrunedTimmNet(PrunedAutoNet):
    """A physically pruned TimmNet (checkpoint architecture `pruned_timm`)."""

    arch_name = "pruned_timm"


TimmNet.pruned_class = PrunedTimmNet


def PrunedTimm(**spec) -> PrunedTimmNet:
    """Rebuild a pruned timm architecture from `constructor_kwargs` (bise_cli.method.prune's loader)."""
    return rebuild_pruned(TimmNet, spec)
