"""Training-time augmentations of uint8 image batches, vectorised over the batch and driven only by the given
torch.Generator (the same generator and batch give the same output).

`crop_flip` is torchvision's RandomCrop(size, padding=4) (zero padding) followed by RandomHorizontalFlip(0.5), the
Corrupted CIFAR-10 train transform; `hflip` is RandomHorizontalFlip(0.5) alone, the CelebA train transform.

Every decision and index is drawn on the images' device, so a batch on a GPU never meets a CPU tensor and the
host never waits: on the CPU from the given generator itself, elsewhere from a device generator seeded by one
draw of it (`bise_cli.core.precision.device_generator`), which keeps the result reproducible on every device.
"""

from __future__ import annotations

import torch

from bise_cli.core.precision import device_generator


def _generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def hflip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip each image of the (B, C, H, W) batch left-right with probability 1/2."""
    g = device_generator(_generator(generator), x.device)
    flip = torch.rand(len(x), generator=g, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(x: torch.Tensor, generator: torch.Generator | None, padding: int = 4) -> torch.Tensor:
    """Zero-pad each side by `padding`, then cut an H x W window at a uniform offset per image."""
    n, _, height, width = x.shape
    g = device_generator(_generator(generator), x.device)
    device = x.device
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=device)
    rows = (top[:, None] + torch.arange(height, device=device))[:, :, None]     # (B, H, 1)
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, :]     # (B, 1, W)
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 puts the channel dim last: (B, H, W, C) -> (B, C, H, W).
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def crop_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """RandomCrop(H, padding=4) then RandomHorizontalFlip(0.5), per image."""
    g = _generator(generator)
    return hflip(random_crop(x, g), g)
