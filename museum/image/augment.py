"""Batched augmentation on uint8 image tensors: random resized crop, flip, colour jitter, greyscale.

One `grid_sample` call crops, rescales and flips a whole batch, so augmenting costs a few
per cent of a training step instead of a per-image PIL pipeline in worker processes.
Random numbers come from a seeded `torch.Generator`: one seed gives the same run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalize(batch_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float, scaled to 0..1 and standardised with ImageNet mean/std."""
    x = batch_uint8.float().div_(255.0)
    return x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def augment(batch_uint8: torch.Tensor, size: int, generator: torch.Generator, crop_scale: float = 0.35,
            jitter: float = 0.3, mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
            grayscale: float = 0.0) -> torch.Tensor:
    """Randomly crop (area share in [crop_scale, 1], aspect 3/4..4/3), flip and colour-jitter a batch,
    and turn a `grayscale` share of its images grey.

    Returns a normalised float batch (B, 3, size, size) on the input's device.
    """
    b, device = batch_uint8.shape[0], batch_uint8.device
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(device)  # noqa: E731
    x = batch_uint8.float().div_(255.0)

    area = crop_scale + (1.0 - crop_scale) * rand(b)
    log_ratio = (rand(b) * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (rand(b) * 2 - 1) * (1 - w)
    cy = (rand(b) * 2 - 1) * (1 - h)
    flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    if jitter > 0:
        def factor():
            return (1 + (rand(b) * 2 - 1) * jitter).view(b, 1, 1, 1)

        x = x * factor()  # brightness
        mean_grey = _grey(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean_grey) * factor() + mean_grey  # contrast
        grey = _grey(x)
        x = (x - grey) * factor() + grey  # saturation
        x = x.clamp_(0.0, 1.0)

    if grayscale > 0:
        grey_rows = (rand(b) < grayscale).view(b, 1, 1, 1)
        x = torch.where(grey_rows, _grey(x).expand_as(x), x)

    if mean is not None and std is not None:
        x = x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
    return x


def resize_batch(batch_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation-time resize of a cached uint8 batch when the cache size differs from `size`."""
    if batch_uint8.shape[-1] == size and batch_uint8.shape[-2] == size:
        return batch_uint8
    x = F.interpolate(batch_uint8.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)
