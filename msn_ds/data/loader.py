"""Pretraining loader factory: ``data.loader`` = ``dali`` | ``torch`` | ``auto``.

Both loaders read the same :class:`MultiViewDataset` (an image source: the training folder,
or ``data.shards``, tar shards; labels; seeded transform) in the same
:class:`GlobalBatchSampler` order and yield ``(views, labels, skipped)``; ``auto`` picks DALI
where it pays (a CUDA GPU and DALI installed), else torch.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import distributed as D
from .dali import DaliMultiCropLoader, dali_available
from .dataset import MultiViewDataset, MultiViewImageFolder, collate_views
from .sampler import GlobalBatchSampler
from .transforms import MultiCropTransform

log = logging.getLogger(__name__)


def resolve_loader(name: str) -> str:
    if name == "auto":
        return "dali" if torch.cuda.is_available() and dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise RuntimeError("data.loader=dali but NVIDIA DALI is not installed "
                           "(pip install nvidia-dali-cuda130, or data.loader=torch)")
    if name not in ("dali", "torch"):
        raise ValueError(f"data.loader must be dali, torch or auto, got {name!r}")
    return name


def count_unreadable(dataset, loader) -> int:
    """How many distinct unreadable files were found so far, each counted once however many
    epochs passed over it: the DALI loader's own record, else the dataset's shared mask (the
    torch loader's workers write it). Cheap enough for every step."""
    bad = getattr(loader, "bad_indices", None)
    return len(bad) if bad is not None else int(dataset.bad.sum())


def unreadable_indices(dataset, loader) -> list[int]:
    """The dataset indices :func:`count_unreadable` counts."""
    bad = getattr(loader, "bad_indices", None)
    return sorted(bad) if bad is not None else dataset.bad.nonzero().flatten().tolist()


def count_unreadable_everywhere(dataset, loader) -> int:
    """Distinct unreadable files found by any process: the union of their index sets (a file
    met by two processes in different epochs counts once). Collective, at log intervals."""
    mine = unreadable_indices(dataset, loader)
    if not D.is_dist() or D.world_size() == 1:
        return len(mine)
    everyone: list = [None] * D.world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return len(set().union(*everyone))


PREFETCH_FACTOR = 2  # torch's default: batches each worker keeps in flight


def batch_bytes(data: dict, batch_size: int) -> int:
    """Bytes of one batch of views as the torch loader's workers hand it over (float32)."""
    pixels = ((data["rand_views"] + 1) * data["rand_size"] ** 2
              + data["focal_views"] * data["focal_size"] ** 2)
    return batch_size * 3 * 4 * pixels


def shm_problem(data: dict, batch_size: int, shm: str = "/dev/shm") -> Optional[str]:
    """Why the torch loader's workers would fail at the first batch, or None. Workers pass
    batches to the trainer through shared memory: a small ``/dev/shm`` (Docker's default is
    64 MiB) fails with a bus error or ``No space left on device`` once training has
    started."""
    if data.get("loader", "auto") == "dali" or not data["num_workers"]:
        return None
    try:
        import shutil

        free = shutil.disk_usage(shm).free
    except OSError:  # no /dev/shm here: torch falls back to file descriptors
        return None
    # in flight: every worker's prefetched batches, plus the one the trainer holds
    needed = batch_bytes(data, batch_size) * (data["num_workers"] * PREFETCH_FACTOR + 1)
    if free >= needed:
        return None
    mib = 2 ** 20
    return (f"data.num_workers={data['num_workers']}: {shm} has {free / mib:.0f} MiB free, and "
            f"the loader's workers keep about {needed / mib:.0f} MiB of batches there. Give it "
            "more room (Docker: --shm-size=8g or --ipc=host), or lower data.num_workers or "
            "criterion.batch_size (data.num_workers=0 needs none)")


def build_pretrain_loader(data: dict, root: str, batch_size: int, seed: int, world_size: int = 1,
                          rank: int = 0, device_id: Optional[int] = None,
                          loader: Optional[str] = None):
    """``(dataset, sampler, loader)`` from the ``data`` config section: the images of
    ``data.shards`` when set (:class:`~.shards.ShardSource`), else of the folder ``root``.
    ``device_id``: the GPU DALI decodes on (None: DALI on the CPU; ignored by the torch
    loader)."""
    transform = MultiCropTransform.from_config(data)
    if data.get("shards"):
        from .shards import ShardSource

        dataset = MultiViewDataset(ShardSource(data["shards"]), transform, seed=seed)
    else:
        dataset = MultiViewImageFolder(root, transform, seed=seed)
    sampler = GlobalBatchSampler(len(dataset), batch_size, world_size, rank, seed=seed)
    kind = resolve_loader(loader or data.get("loader", "auto"))
    if kind == "dali":
        # data.num_workers: DALI's threads, and the host processes that read files and
        # replay the views' random draws off the training thread (capped: ~0.4 GB each)
        it = DaliMultiCropLoader(dataset, sampler, num_threads=max(1, data["num_workers"]),
                                 device_id=device_id, host_workers=min(data["num_workers"], 4))
        log.info("data: DALI loader (%s, %d threads in %d pipelines, %d host workers)",
                 "CPU" if device_id is None else f"GPU {device_id}", it.num_threads,
                 it.pipelines, it.host_workers)
        return dataset, sampler, it
    it = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=data["num_workers"],
        pin_memory=data["pin_mem"] and torch.cuda.is_available(), collate_fn=collate_views,
        drop_last=True, persistent_workers=data["num_workers"] > 0,
        worker_init_fn=D.shield_worker)
    log.info("data: torch loader (%d workers)", data["num_workers"])
    return dataset, sampler, it
