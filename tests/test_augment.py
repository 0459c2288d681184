"""The batched training augmentation: seeded, shaped as asked, and greyscale on the share asked for."""

import torch

from museum.image.augment import augment, resize_batch


def _batch(n=32, side=40, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _grey_rows(x):
    return (x.std(dim=1).amax(dim=(1, 2)) < 1e-6)


def test_augment_is_seeded_and_sized():
    batch = _batch()
    first = augment(batch, 24, torch.Generator().manual_seed(3))
    again = augment(batch, 24, torch.Generator().manual_seed(3))
    other = augment(batch, 24, torch.Generator().manual_seed(4))
    assert first.shape == (32, 3, 24, 24) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert 0.0 <= first.min() and first.max() <= 1.0  # without mean/std: scaled to 0..1 only


def test_grayscale_share():
    batch = _batch(n=400)
    colour = augment(batch, 16, torch.Generator().manual_seed(0))
    assert not _grey_rows(colour).any()  # random colour images never come out grey by chance
    assert _grey_rows(augment(batch, 16, torch.Generator().manual_seed(0), grayscale=1.0)).all()
    share = _grey_rows(augment(batch, 16, torch.Generator().manual_seed(0), grayscale=0.25)).float().mean().item()
    assert 0.18 < share < 0.32
    # Off (the default) draws no extra random numbers, so earlier runs repeat exactly.
    assert torch.equal(colour, augment(batch, 16, torch.Generator().manual_seed(0), grayscale=0.0))


def test_grayscale_before_normalising():
    batch = _batch(n=8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    raw = augment(batch, 16, torch.Generator().manual_seed(1), grayscale=1.0)
    normed = augment(batch, 16, torch.Generator().manual_seed(1), mean=mean, std=std, grayscale=1.0)
    assert torch.allclose(normed, (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-6)


def test_resize_batch_keeps_uint8():
    batch = _batch(n=2, side=40)
    assert resize_batch(batch, 40) is batch
    small = resize_batch(batch, 20)
    assert small.shape == (2, 3, 20, 20) and small.dtype == torch.uint8
