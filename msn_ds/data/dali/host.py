"""The host half of the DALI loader: each sample's bytes, read through the dataset's
:class:`~..source.ImageSource`, and its views' replayed random parameters, computed in this
thread or ahead in spawned worker processes (:class:`HostFeed`).

Reading, probing and replaying cost about 0.3-0.7 s per batch of 256 on one core, which
would otherwise sit on the training thread (DALI calls the source there). With
``workers > 0`` spawned processes compute the next ``2 * workers`` batches while the step
runs, and the callback only collects them in sampler order. Every worker's file caches are
functions of the files' bytes (plus the corrections :meth:`HostFeed.recheck` sends), so the
batches are bit-identical to ``workers=0``, which does it in-thread. DALI's own
``parallel=True`` source is not used: it freezes the callback at build time (epoch, resume
point, corrections) and has no way back for the files a worker finds unreadable, which must
be counted and logged once.
"""
from __future__ import annotations

import pickle
import weakref
from collections import deque
from typing import Optional

import numpy as np
import torch

from ... import distributed as D
from ...seeding import seed_for
from ..probe import BAD, RAW, TRANSCODE, decode_rgb, probe, to_ppm
from ..replay import replay
from ..source import first_readable
from ..transforms import MultiCropTransform
from .pipeline import view_vector


class HostError(RuntimeError):
    """The host half of a batch failed (no readable file, a worker died): raised as it is,
    never taken for a file DALI cannot decode."""


class _Unreadable(Exception):
    """A sample the host reader found unreadable (its reason is in ``reasons``)."""


class _Lookup:
    """``obj[i]`` calls ``fn(i)``: a mask computed on demand."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, i: int):
        return self.fn(i)


class HostReader:
    """The host half of a batch: each sample's bytes, read through the dataset's
    :class:`~..source.ImageSource` (the next readable sample from the requested index, by
    the source's one rule, :func:`~..source.first_readable`), and its views' replayed
    parameters.

    Picklable, so that every host worker holds its own copy. Its caches (probe status and
    size per file, why a file is unreadable) are functions of the files' bytes alone, so all
    copies produce the same batch for the same items; what a copy learns is returned with the
    batch (``seen``) for the loader to merge, count and log once.
    """

    def __init__(self, source, transform: MultiCropTransform, seed: int,
                 status: np.ndarray, shape: np.ndarray):
        self.source, self.transform, self.seed = source, transform, seed
        self.status, self.shape = status, shape
        self.reasons: dict[int, str] = {}

    def _bad(self, i: int, reason: str) -> None:
        self.status[i] = BAD
        self.reasons.setdefault(i, reason)

    def read(self, i: int) -> Optional[bytes]:
        """Bytes to hand DALI for file ``i``, or None if it is unreadable."""
        try:
            data = self.source.read(i)  # a FIFO raises instead of blocking
        except OSError as e:
            self._bad(i, f"{type(e).__name__}: {e}")
            return None
        if self.status[i] == 0:
            pr = probe(data)
            if pr.status == BAD:
                self._bad(i, pr.reason)
                return None
            self.status[i], self.shape[i] = pr.status, (pr.height, pr.width)
        if self.status[i] == TRANSCODE:
            try:
                return to_ppm(decode_rgb(data))
            except Exception as e:  # changed on disk since the probe
                self._bad(i, f"{type(e).__name__}: {e}")
                return None
        return data if self.status[i] == RAW else None

    def sample(self, epoch: int, index: int, seen: list):
        """The next readable sample from ``index`` (:func:`~..source.first_readable`), with
        the views seeded by the *requested* index."""
        def known_bad(i: int) -> bool:  # passed over unread, and reported again
            if self.status[i] != BAD:
                return False
            seen.append((i, BAD, 0, 0, self.reasons.get(i, "")))
            return True

        def open_one(i: int) -> bytes:
            data = self.read(i)
            if data is None:
                raise _Unreadable(self.reasons.get(i, ""))
            return data

        def mark_bad(i: int, _) -> None:  # the loader merges, counts and logs it (_learn)
            seen.append((i, BAD, 0, 0, self.reasons.get(i, "")))

        try:
            i, data, attempt = first_readable(len(self.source), index, _Lookup(known_bad),
                                              open_one, mark_bad, self.source.name)
        except RuntimeError as e:
            raise HostError(str(e)) from None
        h, w = (int(x) for x in self.shape[i])
        seen.append((i, int(self.status[i]), h, w, ""))
        params = []
        for v in range(self.transform.num_views):
            t = self.transform.rand if v < self.transform.num_rand else self.transform.focal
            torch.default_generator.manual_seed(seed_for(self.seed, epoch, index, v))
            params.append(view_vector(replay(t, h, w)))
        return i, data, params, attempt

    def batch(self, items: list[tuple[int, int]]):
        """``(bytes per sample, meta (B, 2) int64 [label, skipped], view arguments (views,
        B, 11) float32, seen: (file, status, height, width, reason) of every file looked at)``."""
        data, meta, seen = [], [], []
        views = np.empty((self.transform.num_views, len(items), 11), np.float32)
        with torch.random.fork_rng(devices=[]):  # the replay must not move the caller's RNG
            for b, (epoch, index) in enumerate(items):
                i, d, params, skipped = self.sample(epoch, index, seen)
                data.append(d)
                meta.append((self.source.label(i), skipped))
                views[:, b] = params
        return data, np.array(meta, np.int64), views, seen


_worker_reader: Optional[HostReader] = None


def _worker_init(state: bytes) -> None:
    global _worker_reader
    D.shield_worker()  # a signal to the process group is the trainer's to act on
    torch.set_num_threads(1)  # tiny tensors only; more threads just contend
    _worker_reader = pickle.loads(state)


def _worker_batch(items: list[tuple[int, int]], forced: dict):
    """One batch in a host worker, after the loader's corrections (:meth:`HostFeed.recheck`)."""
    r = _worker_reader
    for i, (status, h, w) in forced.items():
        r.status[i], r.shape[i] = status, (h, w)
    return r.batch(items)


class HostFeed:
    """The host inputs of the DALI loader's batches, in the order asked for, and the record
    of what the readers found: each file's probe status and size (``status``, ``shape``) and
    the unreadable ones (``bad_indices``; ``bad_files``, their keys in the order found), each
    logged once through the source's record.

    ``workers``: processes that compute batches ahead (0: in the caller's thread). They are
    spawned (never forked: CUDA may be initialised) on :meth:`start`, and stop on
    :meth:`close` or when the feed is collected.
    """

    def __init__(self, source, transform: MultiCropTransform, seed: int, workers: int = 0):
        self.source, self.workers = source, max(0, workers)
        n = len(source)
        self.status = np.zeros(n, np.int8)
        self.shape = np.zeros((n, 2), np.int32)
        self.reader = HostReader(source, transform, seed, self.status, self.shape)
        self.pool, self._finalizer = None, None
        self.inflight: deque = deque()  # (items, future) submitted ahead, in sampler order
        self.forced: dict = {}  # file -> (status, h, w) from recheck; replaced, not mutated,
        # as queued worker tasks hold it
        self.bad_indices: set[int] = set()
        self.bad_files: list[str] = []

    def start(self) -> None:
        """Spawn the workers (if any and not yet), each with a copy of the reader as it is
        now; pickled once, not once per worker."""
        if not self.workers or self.pool is not None:
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        state = pickle.dumps(self.reader, protocol=pickle.HIGHEST_PROTOCOL)
        self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                        initializer=_worker_init, initargs=(state,))
        # on garbage collection or at exit: cancel what is queued; the workers finish the
        # batch in hand and exit (no wait here)
        self._finalizer = weakref.finalize(self, self.pool.shutdown, wait=False,
                                           cancel_futures=True)

    def close(self) -> None:
        """Stop the workers and wait for them to exit."""
        self.drop_inflight()
        if self.pool is not None:
            self._finalizer.detach()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = self._finalizer = None

    def next_items(self, batches) -> list[tuple[int, int]]:
        """The next batch's items from the iterator ``batches``; with workers, first keep
        ``2 * workers`` batches submitted ahead (each collected in submission order).
        StopIteration at the end."""
        if self.pool is None:
            return next(batches)
        while len(self.inflight) < 2 * self.workers:
            items = next(batches, None)
            if items is None:
                break
            self.inflight.append((items, self.pool.submit(_worker_batch, items, self.forced)))
        if not self.inflight:
            raise StopIteration
        return self.inflight[0][0]

    def drop_inflight(self) -> list:
        """Forget the batches submitted ahead (an epoch left early, or computed before a
        correction); returns their items, in order."""
        items = [it for it, _ in self.inflight]
        for _, future in self.inflight:
            future.cancel()  # a running one finishes in its worker and is ignored
        self.inflight.clear()
        return items

    def batch(self, items: list[tuple[int, int]]):
        """``(encoded bytes per sample, meta, view arguments)`` of the batch ``items``:
        collected from the worker that computed it ahead, or computed here."""
        if self.pool is None:
            data, meta, views, seen = self.reader.batch(items)
        else:
            submitted, future = self.inflight.popleft()
            assert submitted is items
            data, meta, views, seen = future.result()
        self._learn(seen)
        return [np.frombuffer(d, np.uint8) for d in data], meta, views

    def _learn(self, seen) -> None:
        """Merge what the reader that made a batch found out about its files."""
        for i, status, h, w, reason in seen:
            if status == BAD:
                self.mark_bad(i, reason)
            elif self.status[i] == 0:
                self.status[i], self.shape[i] = status, (h, w)

    def mark_bad(self, i: int, reason: str) -> None:
        self.status[i] = BAD
        if i not in self.bad_indices:
            self.bad_indices.add(i)
            self.bad_files.append(self.source.key(i))
            self.source.mark_bad(i, reason)  # the shared record; logs it

    def recheck(self, items: list[tuple[int, int]]) -> bool:
        """After DALI failed on the batch ``items``: decide its files with PIL (transcode
        the ones PIL reads, skip the others) and send the workers the new statuses. Whether
        any file changed (if none did, the failure is not a file's)."""
        changed = False
        n = len(self.source)
        for _, index in items:
            i = next((j % n for j in range(index, index + n) if self.status[j % n] != BAD), None)
            if i is not None and self.status[i] == RAW:
                try:
                    decode_rgb(self.source.read(i))
                    self.status[i] = TRANSCODE
                except Exception as e:
                    self.mark_bad(i, f"{type(e).__name__}: {e}")
                h, w = (int(x) for x in self.shape[i])
                self.forced = {**self.forced, i: (int(self.status[i]), h, w)}
                changed = True
        return changed
