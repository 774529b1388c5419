"""Deterministic, world-size-invariant sampling.

The global order of images in an epoch is a function of ``(seed, epoch)`` only. Global batch
``b`` is ``order[b*G:(b+1)*G]`` with ``G = batch_size * world_size``, and process ``r`` takes
its ``r``-th slice; so one process with batch ``G`` sees exactly the images that ``W``
processes with batch ``G/W`` see together, step by step. The sampler yields
``(epoch, index)`` pairs so that the dataset can seed each view from them.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..seeding import seed_for


class GlobalBatchSampler(Sampler):
    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        if num_samples < batch_size * world_size:
            raise ValueError(f"{num_samples} images cannot fill one global batch of "
                             f"{batch_size} x {world_size} processes")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` skips batches already trained (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def global_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(seed_for(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.global_order(self.epoch)
        g_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * g_batch + self.rank * self.batch_size
            for idx in order[lo:lo + self.batch_size].tolist():
                yield self.epoch, idx

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

