"""The pretraining data, as the training loop sees it: :class:`PretrainData`, built by
:func:`build_pretrain_data` from the ``data`` section (``data.loader`` = ``dali`` | ``torch``
| ``auto``).

Both loaders read the same :class:`MultiViewDataset` (an image source: the training folder,
or ``data.shards``, tar shards; labels; seeded transform) in the same
:class:`GlobalBatchSampler` order and yield ``(views, labels, skipped)``; ``auto`` picks DALI
where it pays (a CUDA GPU and DALI installed), else torch.
"""
from __future__ import annotations

import itertools
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


class PretrainData:
    """What the training loop, the views grid and the benchmarks use of the data layer, so
    that none of them reaches into a dataset or a loader: ``len`` (images), ``name`` (for
    messages), ``batches_per_epoch``, ``set_epoch``, iteration (``(views, labels,
    skipped)`` per global step's batch of this process), the unreadable samples found so far
    (here, or by every process) and a ``preview`` of the first images' views.

    ``dataset``, ``sampler`` and ``loader`` stay reachable for tests of the loaders
    themselves."""

    def __init__(self, dataset: MultiViewDataset, sampler: GlobalBatchSampler, loader,
                 kind: str, device_id: Optional[int] = None):
        self.dataset, self.sampler, self.loader = dataset, sampler, loader
        self.kind, self.device_id = kind, device_id

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def name(self) -> str:
        """The folder, or the shard pattern, as messages name the data."""
        return self.dataset.root

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch=start_batch)

    def __iter__(self):
        return iter(self.loader)

    def unreadable_indices(self) -> list[int]:
        """Sample indices found unreadable so far on this process, each once however many
        epochs passed over it: DALI's host record, or the shared mask the torch loader's
        workers write."""
        if self.kind == "dali":
            return sorted(self.loader.bad_indices)
        return self.dataset.bad.nonzero().flatten().tolist()

    def unreadable(self) -> list[str]:
        """The names (path, or ``shard.tar:key``) of :meth:`unreadable_indices`."""
        return [self.dataset.samples[i][0] for i in self.unreadable_indices()]

    def count_unreadable(self) -> int:
        """Cheap enough for every step that skipped a sample (a host-side record)."""
        if self.kind == "dali":
            return len(self.loader.bad_indices)
        return int(self.dataset.bad.sum())

    def count_unreadable_everywhere(self) -> int:
        """Distinct unreadable samples found by any process: the union of their index sets (a
        sample met by two processes in different epochs counts once). Collective, at log
        intervals."""
        mine = self.unreadable_indices()
        if not D.is_dist() or D.world_size() == 1:
            return len(mine)
        everyone: list = [None] * D.world_size()
        torch.distributed.all_gather_object(everyone, mine)
        return len(set().union(*everyone))

    def preview(self, num_samples: int, epoch: int = 0) -> list[torch.Tensor]:
        """The views of the first ``num_samples`` images of ``epoch`` in the global order (it
        does not depend on the batch size), on the CPU, through a separate small loader of
        this kind: the training loader's position is not touched."""
        sampler = GlobalBatchSampler(len(self.dataset), num_samples, seed=self.dataset.seed)
        sampler.set_epoch(epoch)
        if self.kind == "dali":
            it = DaliMultiCropLoader(self.dataset, sampler, num_threads=1,
                                     device_id=self.device_id, host_workers=0)
            try:
                views, _, _ = next(iter(it))
            finally:
                it.close()
            return [v.cpu() for v in views]
        first = itertools.islice(iter(sampler), num_samples)  # the first batch only
        views, _, _ = collate_views([self.dataset[i] for i in first])
        return views

    def close(self) -> None:
        """Stop DALI's host workers (torch's stop with the loader)."""
        if self.kind == "dali":
            self.loader.close()


def build_pretrain_data(data: dict, root: str, batch_size: int, seed: int, world_size: int = 1,
                        rank: int = 0, device_id: Optional[int] = None,
                        loader: Optional[str] = None) -> PretrainData:
    """:class:`PretrainData` from the ``data`` config section: the images of
    ``data.shards`` when set (:class:`~.shards.ShardSource`), else of the folder ``root``;
    ``batch_size`` images per process and step. ``device_id``: the GPU DALI decodes on
    (None: DALI on the CPU; ignored by the torch loader). ``loader`` overrides
    ``data.loader``."""
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
        return PretrainData(dataset, sampler, it, kind, device_id)
    it = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=data["num_workers"],
        pin_memory=data["pin_mem"] and torch.cuda.is_available(), collate_fn=collate_views,
        drop_last=True, persistent_workers=data["num_workers"] > 0,
        worker_init_fn=D.shield_worker)
    log.info("data: torch loader (%d workers)", data["num_workers"])
    return PretrainData(dataset, sampler, it, kind, device_id)
