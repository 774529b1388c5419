"""NVIDIA DALI multi-crop loader: one decode per image, all views cropped from it, outputs
left where DALI made them (GPU memory in GPU mode).

Same interface and same data as the torch path (``train.py`` cannot tell them apart):
iterating yields ``(views, labels, skipped)`` with ``views = [target, random anchors...,
focal anchors...]``, each ``(B, 3, H, W)`` float32, ImageNet-normalised; the images come in
:class:`GlobalBatchSampler`'s order (world-size invariant; ``set_epoch(e, start_batch)``
resumes inside an epoch); unreadable samples are replaced by the next readable one in index
order and counted, by the source's one rule (:func:`.source.first_readable`).

How DALI is fed: the host reads each sample's bytes from the dataset's
:class:`~.source.ImageSource` (a folder, tar shards) in the sampler's order and passes them
with ``fn.external_source`` (no DALI file reader, whose sharding and shuffling would not
follow our global order). The random parameters of every view are *replayed* from the torch
path's own transform objects seeded with ``seed_for(seed, epoch, index, view)``
(:mod:`.replay`), and passed as per-sample arguments. So for the same image and view both
loaders use the same crop window, flip, jitter factors, grayscale and blur sigma.

Where the host work runs: reading, probing and replaying cost about 0.3-0.7 s per batch of
256 on one core, which would otherwise sit on the training thread (DALI calls the source
there). With ``host_workers > 0`` spawned processes compute the next ``2 * host_workers``
batches while the step runs, and the callback only collects them in sampler order. Every
worker's file caches are functions of the files' bytes (plus the corrections ``_recover``
sends), so the batches are bit-identical to ``host_workers=0``, which does it in-thread.
DALI's own ``parallel=True`` source is not used: it freezes the callback at build time
(epoch, resume point, corrections) and has no way back for the files a worker finds
unreadable, which must be counted and logged once.

Pipelines on the CPU: one DALI pipeline runs one iteration at a time, each operator split
over the batch's samples with a barrier after it, so its threads idle at every uneven op
(72-85 % of 2 cores measured, 8.5-9.7 ms/img wall for 13.6 CPU ms/img). Two pipelines of
half the threads each, fed alternate batches, fill each other's gaps (99.5 %, 6.1 ms/img
wall for 12.1 CPU ms/img). Batch ``j`` after a build is dealt to pipeline ``j % P`` and
the outputs are taken in the same turn, so the order, and every batch, is unchanged.

What matches torchvision exactly: the file order, which files are skipped (as far as the
probe below agrees with PIL), every random parameter above, the crop box in pixels,
ImageNet normalisation, the pixels of any file that is not a plain 8-bit RGB/gray JPEG/PNG
(those are decoded by PIL on the host, see :mod:`.probe`).

What differs (pixel values only; measured in ``tests/test_dali.py``):
* JPEG decoding: DALI's decoder (libjpeg-turbo on the CPU, nvJPEG on the GPU) vs PIL's
  libjpeg-turbo; EXIF orientation is ignored by both.
* resize: DALI's antialiased linear filter over the crop window vs PIL's bilinear resample
  of the cropped image; they agree to about one grey level except at the crop border.
* colour jitter: a fixed order (brightness and contrast together, then saturation and hue)
  instead of torchvision's random order. Brightness, contrast (around the crop's mean luma,
  as torchvision) and saturation commute exactly up to clipping, so only hue's position
  matters; hue is a rotation about the grey axis (DALI ``hsv``) rather than an HSV hue shift.
  Clipping to [0, 255] happens once per op group rather than after each op.
* grayscale: saturation set to 0 in the same ``hsv`` op (luma, as torchvision, up to
  rounding).
* blur: torchvision's 1-D kernel for the same sigma (taps under 1e-7 cut, as the torch path
  cuts them) and reflect padding, one pass per axis rounded to uint8 in between; rounding
  differs by about one grey level.
"""
from __future__ import annotations

import itertools
import logging
import math
import pickle
import weakref
from collections import deque
from typing import Optional, Sequence

import numpy as np
import torch

from .. import distributed as D
from ..seeding import seed_for
from .probe import BAD, RAW, TRANSCODE, decode_rgb, probe, to_ppm
from .replay import ViewParams, replay
from .sampler import GlobalBatchSampler
from .source import first_readable
from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform

log = logging.getLogger(__name__)

# per-view argument vector (view_vector): roi y0 x0 y1 x1, flip, brightness, contrast,
# saturation, hue (degrees), blur sigma, blur window


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def view_vector(p: ViewParams) -> np.ndarray:
    """The per-sample DALI arguments of one view."""
    b = c = s = 1.0
    hue = 0.0
    if p.jitter is not None:
        j = p.jitter
        b = 1.0 if j["brightness_factor"] is None else j["brightness_factor"]
        c = 1.0 if j["contrast_factor"] is None else j["contrast_factor"]
        s = 1.0 if j["saturation_factor"] is None else j["saturation_factor"]
        hue = 0.0 if j["hue_factor"] is None else 360.0 * j["hue_factor"]
    if p.gray:  # luma of the jittered image; saturation does not change luma
        s = 0.0
    sigma, window = (p.sigma, p.kernel) if p.sigma is not None else (1.0, 1)  # window 1: no-op
    return np.array([p.top, p.left, p.top + p.height, p.left + p.width, float(p.flip),
                     b, c, s, hue, sigma, window], dtype=np.float32)


# Blur on the CPU: DALI's ``filter`` (a separable pass per axis, uint8 in and out) with
# torchvision's 1-D kernel, computed on the host per view, without its taps below 1e-7; only
# the views that draw a blur run it (a conditional: DALI splits the batch). DALI's
# ``gaussian_blur`` costs 6x more on the CPU (2.3 ms instead of 0.35 ms for a 13-tap 224-px
# view, 1 thread), and ran on every view, a 1-tap window costing a full pass. On the GPU the
# graph keeps ``gaussian_blur`` on every view (cheap there, and untested on a GPU so far).


def blur_kernels(views: np.ndarray) -> list[np.ndarray]:
    """torchvision's 1-D Gaussian kernel, as a (1, k) row, for each view vector (..., 11) that
    draws a blur, ``[[1]]`` for the others; flattened in the vectors' order, taps under 1e-7
    cut."""
    flat = views.reshape(-1, views.shape[-1])
    out = [np.ones((1, 1), np.float32)] * len(flat)
    for j in np.flatnonzero(flat[:, 10] > 1):
        size, sigma = int(flat[j, 10]), float(flat[j, 9])
        lim = (size - 1) / (2.0 * math.sqrt(2.0))
        x = np.linspace(-lim, lim, size, dtype=np.float32) / np.float32(sigma)
        k = np.exp(-(x * x) - np.max(-(x * x)))
        k = (k / k.sum()).astype(np.float32)
        keep = np.flatnonzero(k > 1e-7)
        reach = max(size // 2 - keep[0], keep[-1] - size // 2)
        out[j] = k[None, size // 2 - reach: size // 2 + reach + 1]
    return out


def build_pipeline(source, view_sizes: Sequence[int], batch_size: int, num_threads: int,
                   device_id: Optional[int], prefetch: int = 2):
    """The DALI graph: decode once, then per view ROI-resize, jitter, blur (only the views
    that draw one), flip+normalise.

    ``source()`` returns one batch ``(encoded, meta, view args..., blur kernels...)``, two
    per view (:func:`view_vector`, :func:`blur_kernels`; no kernels for a GPU graph), or
    raises StopIteration at the end of the epoch."""
    from nvidia.dali import fn, pipeline_def, types

    conv = getattr(fn, "filter", None) or fn.experimental.filter  # DALI < 1.42: experimental

    gpu = device_id is not None
    mean = [255.0 * m for m in IMAGENET_MEAN]
    std = [255.0 * s for s in IMAGENET_STD]
    n = len(view_sizes)

    inputs_per_view = 1 if gpu else 2  # the GPU graph takes no blur kernels

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, enable_conditionals=not gpu)
    def pipe():
        encoded, meta, *inputs = fn.external_source(
            source=source, num_outputs=2 + inputs_per_view * n, batch=True,
            dtype=[types.UINT8, types.INT64] + [types.FLOAT] * (inputs_per_view * n))
        args, kernels = inputs[:n], (inputs[n:] or [None] * n)
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                  output_type=types.RGB, adjust_orientation=False)
        outputs = []
        for p, kernel, size in zip(args, kernels, view_sizes):
            x = fn.resize(image, size=[size, size], roi_start=p[0:2], roi_end=p[2:4],
                          roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
            luma = fn.reductions.mean(fn.color_space_conversion(
                x, image_type=types.RGB, output_type=types.GRAY))
            if gpu:
                luma = luma.cpu()
            x = fn.brightness_contrast(x, brightness=p[5], contrast=p[6], contrast_center=luma)
            x = fn.hsv(x, saturation=p[7], hue=p[8])
            if gpu:  # cheap there; the GPU graph is the one prepared for its first run
                x = fn.gaussian_blur(x, sigma=p[9],
                                     window_size=fn.cast(p[10], dtype=types.INT32))
            elif p[10] > 1:
                x = conv(x, kernel, border="reflect_101")  # along the rows: (1, k)
                x = conv(x, fn.reshape(kernel, src_dims=[1, 0]), border="reflect_101")
            outputs.append(fn.crop_mirror_normalize(
                x, mirror=fn.cast(p[4], dtype=types.INT32), mean=mean, std=std,
                dtype=types.FLOAT, output_layout="CHW"))
        return (*outputs, meta)

    return pipe()


# Host worker processes when the caller does not say, with a GPU: two take the host half
# (0.3-0.7 s per batch of 256 on one core) off the training thread for any step of 0.35 s or
# more. On the CPU (tests, previews; never chosen by data.loader=auto) none: DALI's own
# threads already use the cores, and a one-batch preview should not start processes.
DEFAULT_GPU_HOST_WORKERS = 2

# Pipelines when the caller does not say: on the CPU two (see the module docstring; each
# holds ``prefetch`` batches of outputs, so more would only add memory), on the GPU one (the
# augmentation runs on the GPU; the CPU threads only decode).
DEFAULT_CPU_PIPELINES = 2


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


class _HostReader:
    """The host half of a batch: each sample's bytes, read through the dataset's
    :class:`~.source.ImageSource` (the next readable sample from the requested index, by
    the source's one rule, :func:`~.source.first_readable`), and its views' replayed
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
        """The next readable sample from ``index`` (:func:`~.source.first_readable`), with
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


_worker_reader: Optional[_HostReader] = None


def _worker_init(state: bytes) -> None:
    global _worker_reader
    D.shield_worker()  # a signal to the process group is the trainer's to act on
    torch.set_num_threads(1)  # tiny tensors only; more threads just contend
    _worker_reader = pickle.loads(state)


def _worker_batch(items: list[tuple[int, int]], forced: dict):
    """One batch in a host worker, after the loader's corrections (``_recover``)."""
    r = _worker_reader
    for i, (status, h, w) in forced.items():
        r.status[i], r.shape[i] = status, (h, w)
    return r.batch(items)


class DaliMultiCropLoader:
    """Iterates ``(views, labels, skipped)`` over ``dataset`` in ``sampler``'s order.

    ``dataset`` supplies ``source`` (the :class:`~.source.ImageSource` read: a folder or
    shards), ``multi_transform`` (whose random draws are replayed) and ``seed``: a
    :class:`MultiViewDataset`, so both loaders share one sample list. Unreadable samples go
    to ``bad_indices``/``bad_files`` (keys, in the order found) and the source's record. ``device_id=None`` runs DALI on the CPU. ``host_workers``: processes that read
    files and replay parameters ahead of DALI (0: in the consumer's thread; None:
    ``DEFAULT_GPU_HOST_WORKERS`` with a GPU, else 0); the batches do not depend on it. They
    start with the first epoch and stop on :meth:`close` or when the loader is collected.
    ``pipelines``: DALI pipelines fed alternate batches, sharing the ``num_threads`` threads
    (None: ``DEFAULT_CPU_PIPELINES`` on the CPU, at most one per thread, else 1); the
    batches do not depend on it either.
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
        self.host_workers = max(0, host_workers)
        if pipelines is None:
            pipelines = 1 if device_id is not None else DEFAULT_CPU_PIPELINES
        self.pipelines = max(1, min(pipelines, self.num_threads))
        self.source = dataset.source
        n = len(self.source)
        self._status = np.zeros(n, np.int8)
        self._shape = np.zeros((n, 2), np.int32)
        self._reader = _HostReader(self.source, self.transform, dataset.seed, self._status,
                                   self._shape)
        self._pipes: list = []
        self._clean = False
        self._source = iter(())
        # batches dealt to the pipelines and not yet yielded, in sampler order (the order
        # they are dealt in and yielded in); a pipeline's dealt but not yet fed host inputs
        self._pending: deque = deque()
        self._ready: list[deque] = []
        self._dealt = self._turn = 0  # batches dealt this epoch; the pipeline yielding next
        self._started = False  # whether this epoch's pipelines were scheduled
        self._pool, self._finalizer = None, None
        self._inflight: deque = deque()  # (items, future) submitted ahead, in sampler order
        self._forced: dict = {}  # file -> (status, h, w) from _recover; replaced, not mutated,
        # as queued worker tasks hold it
        self._copied = None  # CUDA event after the last copy out of DALI
        self.bad_indices: set[int] = set()  # unreadable files found, as dataset indices
        self.bad_files: list[str] = []  # the same, as paths in the order found

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

    # host side -------------------------------------------------------------------------
    def _batches(self):
        items = []
        for item in self.sampler:
            items.append(item)
            if len(items) == self.batch_size:
                yield items
                items = []

    def _start_pool(self) -> None:
        """Spawn (never fork: CUDA may be initialised here) the host workers, each with a
        copy of the reader as it is now; pickled once, not once per worker."""
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        state = pickle.dumps(self._reader, protocol=pickle.HIGHEST_PROTOCOL)
        self._pool = ProcessPoolExecutor(self.host_workers, mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init, initargs=(state,))
        # on garbage collection or at exit: cancel what is queued; the workers finish the
        # batch in hand and exit (no wait here)
        self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False,
                                           cancel_futures=True)

    def close(self) -> None:
        """Stop the host workers and wait for them to exit."""
        self._drop_inflight()
        if self._pool is not None:
            self._finalizer.detach()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = self._finalizer = None

    def _next_items(self) -> list[tuple[int, int]]:
        """The next batch's items; with workers, first keep ``2 * host_workers`` batches
        submitted ahead (in order: each future is collected in submission order)."""
        if self._pool is None:
            return next(self._source)
        while len(self._inflight) < 2 * self.host_workers:
            items = next(self._source, None)
            if items is None:
                break
            self._inflight.append((items, self._pool.submit(_worker_batch, items, self._forced)))
        if not self._inflight:
            raise StopIteration
        return self._inflight[0][0]

    def _drop_inflight(self) -> list:
        """Forget the batches submitted ahead (an epoch left early, or computed before a
        correction); returns their items, in order."""
        items = [it for it, _ in self._inflight]
        for _, future in self._inflight:
            future.cancel()  # a running one finishes in its worker and is ignored
        self._inflight.clear()
        return items

    def _host_batch(self, items: list[tuple[int, int]]):
        """The host inputs of one batch: collected from the worker that computed it ahead,
        or computed here (no workers)."""
        if self._pool is None:
            data, meta, views, seen = self._reader.batch(items)
        else:
            submitted, future = self._inflight.popleft()
            assert submitted is items
            data, meta, views, seen = future.result()
        self._learn(seen)
        return items, [np.frombuffer(d, np.uint8) for d in data], meta, views

    def _learn(self, seen) -> None:
        """Merge what the reader that made a batch found out about its files."""
        for i, status, h, w, reason in seen:
            if status == BAD:
                self._mark_bad(i, reason)
            elif self._status[i] == 0:
                self._status[i], self._shape[i] = status, (h, w)

    def _mark_bad(self, i: int, reason: str) -> None:
        self._status[i] = BAD
        if i not in self.bad_indices:
            self.bad_indices.add(i)
            self.bad_files.append(self.source.key(i))
            self.source.mark_bad(i, reason)  # the shared record; logs it

    # DALI side -------------------------------------------------------------------------
    def _deal(self) -> None:
        """Compute the next batch's host inputs and deal it to its pipeline."""
        try:
            items = self._next_items()  # StopIteration ends the epoch
            _, encoded, meta, views = self._host_batch(items)
        except (StopIteration, HostError):
            raise
        except Exception as e:  # e.g. a worker died
            raise HostError(f"host side of a batch of {self.dataset.root} failed: "
                            f"{type(e).__name__}: {e}") from e
        if self.device_id is None:
            kernels, b = blur_kernels(views), len(encoded)
            inputs = (encoded, meta, *views,
                      *(kernels[v * b:(v + 1) * b] for v in range(len(views))))
        else:
            inputs = (encoded, meta, *views)
        self._pending.append(items)
        self._ready[self._dealt % len(self._pipes)].append(inputs)
        self._dealt += 1

    def _callback(self, pipe: int):
        """Called by DALI for pipeline ``pipe`` (in the consumer's thread, ``prefetch``
        batches ahead of use): its next batch, dealing the batches before it to the others."""
        while not self._ready[pipe]:
            self._deal()
        return self._ready[pipe].popleft()

    def _source_of(self, pipe: int):
        # no parameters: DALI passes batch info to a source callback that takes any
        return lambda: self._callback(pipe)

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
        """One copy out of DALI's buffers into torch memory on DALI's device: no host round
        trip in GPU mode.

        GPU ordering: this runs in the consumer's thread inside its ``next()``, so
        ``current_stream`` is the stream the consumer uses the batch on; the fresh tensors are
        allocated for it and the copies queued on it, so the consumer's kernels follow them.
        A copy may still wait there behind earlier work when DALI is free to reuse its source
        (``outputs()`` "returns the outputs of the pipeline and releases previous buffer",
        DALI docs, Pipeline Run Methods). DALI's non-blocking ``copy_to_external`` orders the
        source's own stream after the copy, but rather than rely on that internal, the event
        recorded here is waited for before the next ``outputs()`` of any pipeline, a rebuild or
        a reset (``_wait_for_copies``). ``schedule_run()`` before the copy is safe: it starts
        an iteration in another buffer and releases none."""
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
        if self.host_workers and self._pool is None:
            self._start_pool()
        self._source, self._pending, self._clean = self._batches(), deque(), False
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
            self._drop_inflight()
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
        """Decide the failed batch's files with PIL (skip or transcode), tell the workers,
        rebuild the pipeline and feed the batches in flight again."""
        if not self._pending:
            raise error
        changed = False
        n = len(self.source)
        for _, index in self._pending[0]:
            i = next((j % n for j in range(index, index + n) if self._status[j % n] != BAD), None)
            if i is not None and self._status[i] == RAW:
                try:
                    decode_rgb(self.source.read(i))
                    self._status[i] = TRANSCODE
                except Exception as e:
                    self._mark_bad(i, f"{type(e).__name__}: {e}")
                h, w = (int(x) for x in self._shape[i])
                self._forced = {**self._forced, i: (int(self._status[i]), h, w)}
                changed = True
        if not changed:
            raise RuntimeError(f"DALI failed on a batch of {self.dataset.root} whose files PIL "
                               f"reads: {error}") from error
        text = str(error).strip()
        log.warning("DALI could not decode a batch; its files were re-checked with PIL (%s)",
                    text.splitlines()[0] if text else type(error).__name__)
        # the batches computed ahead used the old statuses: compute them again
        self._source = itertools.chain(list(self._pending) + self._drop_inflight(), self._source)
        self._pending = deque()
        self._build()
