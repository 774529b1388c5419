"""The patch mask of a training step, from numbers only: which patch tokens of the random
anchor views are kept is a function of ``(seed, step, num_patches, mask_ratio, batch,
per_sample)``. The encoder drops tokens with it and the views grid greys out the same
patches, so neither needs the other (nor the trainer)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .seeding import seed_for

MASK_KEY = 0x6D61736B  # "mask": keeps the mask's stream apart from the data's


def mask_generator(seed: int, step: int) -> torch.Generator:
    """The token-drop permutation is a function of (seed, step): identical on every process,
    on every device type and after a resume (drawn on the CPU; see :func:`keep_indices`)."""
    return torch.Generator().manual_seed(seed_for(seed, step, MASK_KEY))


def keep_indices(num_patches: int, mask_ratio: float, batch: int, per_sample: bool,
                 generator: Optional[torch.Generator], device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """Indices of the patch tokens to keep: ``floor(N * (1 - r))`` of them, sorted.

    One permutation shared by the batch (shape ``[keep]``), as in the reference, or one per
    sample (shape ``[B, keep]``). Drawn on the CPU so that a seeded generator gives the same
    mask on every device; sent to a GPU from pinned memory without blocking the host (the
    caching host allocator keeps the buffer alive until the copy is done).
    """
    keep = int(math.floor(num_patches * (1.0 - mask_ratio)))
    if keep < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps no patch of {num_patches}")
    if per_sample:
        noise = torch.rand(batch, num_patches, generator=generator)
        idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    else:
        idx = torch.randperm(num_patches, generator=generator)[:keep].sort().values
    if torch.device(device).type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)
