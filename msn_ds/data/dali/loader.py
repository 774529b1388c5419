"""The DALI loader: host inputs (:class:`.host.HostFeed`) dealt to DALI pipelines
(:func:`.pipeline.build_pipeline`), outputs copied into torch tensors on DALI's device.

Pipelines on the CPU: one DALI pipeline runs one iteration at a time, each operator split
over the batch's samples with a barrier after it, so its threads idle at every uneven op
(72-85 % of 2 cores measured, 8.5-9.7 ms/img wall for 13.6 CPU ms/img). Two pipelines of
half the threads each, fed alternate batches, fill each other's gaps (99.5 %, 6.1 ms/img
wall for 12.1 CPU ms/img). Batch ``j`` after a build is dealt to pipeline ``j % P`` and
the outputs are taken in the same turn, so the order, and every batch, is unchanged.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Optional

import numpy as np
import torch

from ..sampler import GlobalBatchSampler
from ..transforms import MultiCropTransform
from .host import HostError, HostFeed
from .pipeline import blur_kernels, build_pipeline

log = logging.getLogger(__name__)

# Host worker processes when the caller does not say, with a GPU: two take the host half
# (0.3-0.7 s per batch of 256 on one core) off the training thread for any step of 0.35 s or
# more. On the CPU (tests, previews; never chosen by data.loader=auto) none: DALI's own
# threads already use the cores, and a one-batch preview should not start processes.
DEFAULT_GPU_HOST_WORKERS = 2

# Pipelines when the caller does not say: on the CPU two (see the module docstring; each
# holds ``prefetch`` batches of outputs, so more would only add memory), on the GPU one (the
# augmentation runs on the GPU; the CPU threads only decode).
DEFAULT_CPU_PIPELINES = 2


class DaliMultiCropLoader:
    """Iterates ``(views, labels, skipped)`` over ``dataset`` in ``sampler``'s order.

    ``dataset`` supplies ``source`` (the :class:`~..source.ImageSource` read: a folder or
    shards), ``multi_transform`` (whose random draws are replayed) and ``seed``: a
    :class:`MultiViewDataset`, so both loaders share one sample list. Unreadable samples go
    to ``bad_indices``/``bad_files`` (keys, in the order found) and the source's record.
    ``device_id=None`` runs DALI on the CPU. ``host_workers``: processes that read files and
    replay parameters ahead of DALI (None: ``DEFAULT_GPU_HOST_WORKERS`` with a GPU, else 0);
    ``pipelines``: DALI pipelines fed alternate batches, sharing the ``num_threads`` threads
    (None: ``DEFAULT_CPU_PIPELINES`` on the CPU, at most one per thread, else 1). The batches
    depend on neither.
    """

    def __init__(self, dataset, sampler: GlobalBatchSampler, num_threads: int = 2,
                 device_id: Optional[int] = None, prefetch: int = 2,
                 host_workers: Optional[int] = None, pipelines: Optional[int] = None):
        self.dataset, self.sampler = dataset, sampler
        self.transform: MultiCropTransform = dataset.multi_transform
        self.batch_size = sampler.batch_size
        self.num_threads, self.device_id, self.prefetch = max(1, num_threads), device_id, prefetch
        if host_workers is None:
            host_workers = DEFAULT_GPU_HOST_WORKERS if device_id is not None else 0
        if pipelines is None:
            pipelines = 1 if device_id is not None else DEFAULT_CPU_PIPELINES
        self.pipelines = max(1, min(pipelines, self.num_threads))
        self.host = HostFeed(dataset.source, self.transform, dataset.seed, host_workers)
        self._pipes: list = []
        self._clean = False
        self._batches = iter(())
        # batches dealt to the pipelines and not yet yielded, in sampler order (the order
        # they are dealt in and yielded in); a pipeline's dealt but not yet fed host inputs
        self._pending: deque = deque()
        self._ready: list[deque] = []
        self._dealt = self._turn = 0  # batches dealt this epoch; the pipeline yielding next
        self._started = False  # whether this epoch's pipelines were scheduled
        self._copied = None  # CUDA event after the last copy out of DALI

    host_workers = property(lambda self: self.host.workers)
    bad_indices = property(lambda self: self.host.bad_indices)  # dataset indices
    bad_files = property(lambda self: self.host.bad_files)  # their keys, in the order found

    @property
    def view_sizes(self) -> list[int]:
        t = self.transform
        rand, focal = t.rand.transforms[0].size[0], t.focal.transforms[0].size[0]
        return [rand] * t.num_rand + [focal] * t.num_focal

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch - self.sampler.start_batch

    def close(self) -> None:
        """Stop the host workers and wait for them to exit."""
        self.host.close()

    def _sampler_batches(self):
        items = []
        for item in self.sampler:
            items.append(item)
            if len(items) == self.batch_size:
                yield items
                items = []

    def _deal(self) -> None:
        """Compute the next batch's host inputs and deal it to its pipeline."""
        try:
            items = self.host.next_items(self._batches)  # StopIteration ends the epoch
            encoded, meta, views = self.host.batch(items)
        except (StopIteration, HostError):
            raise
        except Exception as e:  # e.g. a worker died
            raise HostError(f"host side of a batch of {self.dataset.root} failed: "
                            f"{type(e).__name__}: {e}") from e
        inputs = (encoded, meta, *views)
        if self.device_id is None:  # the CPU graph takes each view's blur kernels
            kernels, b = blur_kernels(views), len(encoded)
            inputs += tuple(kernels[v * b:(v + 1) * b] for v in range(len(views)))
        self._pending.append(items)
        self._ready[self._dealt % len(self._pipes)].append(inputs)
        self._dealt += 1

    def _source_of(self, pipe: int):
        """DALI's callback for pipeline ``pipe`` (in the consumer's thread, ``prefetch``
        batches ahead of use): its next batch, dealing the batches before it to the others.
        No parameters: DALI passes batch info to a source callback that takes any."""
        def next_batch():
            while not self._ready[pipe]:
                self._deal()
            return self._ready[pipe].popleft()
        return next_batch

    def _build(self) -> None:
        """(Re)build every pipeline; the next batch is dealt to, and taken from, the first."""
        self._pipes = []  # the old ones' buffers go before the new ones allocate theirs
        threads = max(1, self.num_threads // self.pipelines)
        for p in range(self.pipelines):
            pipe = build_pipeline(self._source_of(p), self.view_sizes, self.batch_size,
                                  threads, self.device_id, self.prefetch)
            pipe.build()
            self._pipes.append(pipe)
        self._ready = [deque() for _ in self._pipes]
        self._dealt = self._turn = 0
        self._started = False

    def _to_torch(self, outputs):
        """One copy out of DALI's buffers into torch memory on DALI's device (no host round
        trip on a GPU), queued on the consumer's current stream, where its kernels follow.
        DALI may reuse a source buffer at the next ``outputs()`` ("releases previous buffer",
        DALI docs), so the event recorded here is waited for before that, a rebuild or a
        reset (``_wait_for_copies``); ``schedule_run()`` releases none."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        *views, meta = outputs
        gpu = self.device_id is not None
        device = torch.device("cuda", self.device_id) if gpu else torch.device("cpu")
        stream = torch.cuda.current_stream(device) if gpu else None
        tensors = []
        for tl in views:
            t = tl.as_tensor()
            tensors.append(feed_ndarray(t, torch.empty(t.shape(), dtype=torch.float32,
                                                       device=device), cuda_stream=stream))
        if gpu:
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        meta = torch.from_numpy(np.array(meta.as_tensor()))
        return tensors, meta[:, 0].clone(), int(meta[:, 1].sum())

    def _wait_for_copies(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def __iter__(self):
        if not self._pipes or not self._clean:
            self._build()  # first epoch, or the caller left the previous one early
        self.host.start()
        self._batches, self._pending, self._clean = self._sampler_batches(), deque(), False
        try:
            while True:
                if not self._started:  # every pipeline at work from the epoch's first batch
                    for pipe in self._pipes:
                        pipe.schedule_run()  # the first call prefetches ``prefetch`` batches
                    self._started = True
                self._wait_for_copies()
                pipe = self._pipes[self._turn]
                try:
                    outputs = pipe.outputs()  # releases this pipeline's previous outputs
                except StopIteration:
                    break
                except Exception as e:  # a file DALI cannot decode although the probe passed it
                    self._recover(e)
                    continue
                self._pending.popleft()
                self._turn = (self._turn + 1) % len(self._pipes)
                pipe.schedule_run()  # the next batch, while these outputs are copied
                yield self._to_torch(outputs)
            self._finish_epoch()
        finally:  # also when the consumer leaves the epoch early
            self._wait_for_copies()
            self.host.drop_inflight()
        self._clean = True

    def _finish_epoch(self) -> None:
        """The epoch ended at the turn's pipeline. Every batch dealt was yielded, and each
        other pipeline was scheduled past its last output, so its source has ended too;
        then all start over."""
        for k in range(1, len(self._pipes)):
            try:
                self._pipes[(self._turn + k) % len(self._pipes)].outputs()
            except StopIteration:
                continue
            raise RuntimeError("a DALI pipeline still had a batch after the epoch ended")
        for pipe in self._pipes:
            pipe.reset()
        self._dealt = self._turn = 0
        self._started = False

    def _recover(self, error: Exception) -> None:
        """Re-check the failed batch's files with PIL, rebuild the pipelines and feed the
        batches in flight again (those computed ahead used the old statuses)."""
        if not self._pending:
            raise error
        if not self.host.recheck(self._pending[0]):
            raise RuntimeError(f"DALI failed on a batch of {self.dataset.root} whose files PIL "
                               f"reads: {error}") from error
        text = str(error).strip()
        log.warning("DALI could not decode a batch; its files were re-checked with PIL (%s)",
                    text.splitlines()[0] if text else type(error).__name__)
        self._batches = itertools.chain(list(self._pending) + self.host.drop_inflight(),
                                        self._batches)
        self._pending = deque()
        self._build()
