"""Console progress and TensorBoard scalars (rank 0 only)."""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from typing import Optional

import torch

from .. import distributed as D
from ..io.atomic import open_append
from ..loss import MSNLoss
from .flops import mfu

log = logging.getLogger("msn_ds")


def setup_logging() -> None:
    level = logging.INFO if D.rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def peak_memory_gib(device: Optional[torch.device] = None) -> float:
    """Peak memory of this process: allocated on the GPU, or resident on the CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Monitor:
    """Averages step statistics over the log interval and across processes, then prints a
    progress line and writes TensorBoard scalars. Statistics stay on the device between log
    intervals, so the step never waits on the host for them.

    Performance scalars: images/s (global), MFU (with ``flops_per_image`` and the device's
    ``peak_flops``), peak memory and the fraction of wall time the loop spent waiting for
    the loader (``data_wait`` seconds passed to :meth:`update`).

    Vector statistics (:data:`HISTOGRAMS`: the loss's ``proto_hits``, target argmax hits per
    prototype over the global batch) are summed over the interval on the device, on the
    process that writes TensorBoard only, and written there as a histogram at log steps;
    they stay out of the progress line and ``metrics.jsonl``."""

    HISTOGRAMS = {"proto_hits": "train/prototype_usage"}  # stat -> TensorBoard histogram tag

    def __init__(self, folder: str, total_steps: int, global_batch: int, log_every: int,
                 tensorboard: bool = True, flops_per_image: Optional[float] = None,
                 peak_flops: Optional[float] = None, device: Optional[torch.device] = None):
        self.total_steps, self.global_batch, self.log_every = total_steps, global_batch, log_every
        self.flops_per_image, self.peak_flops, self.device = flops_per_image, peak_flops, device
        self._wait = 0.0
        self.writer = None
        self.metrics_path = os.path.join(folder, "metrics.jsonl")
        if tensorboard and D.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=os.path.join(folder, "tb"))
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._vectors: dict[str, torch.Tensor] = {}  # HISTOGRAMS' sums over the interval
        self._t0 = time.perf_counter()
        self._start = self._t0
        self._steps_since = 0
        self.history: list[dict[str, float]] = []
        self.last_eval: dict[str, float] = {}

    def update(self, stats: dict[str, torch.Tensor], data_wait: float = 0.0) -> None:
        """Accumulate on the device (no host sync). Every statistic must be a tensor on the
        step's device: :meth:`log` stacks them, and a stray CPU tensor would fail there."""
        self._wait += data_wait
        for k, v in stats.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"step statistic {k!r} is a {type(v).__name__}, not a tensor")
            if self.device is not None and v.device != self.device:
                raise ValueError(f"step statistic {k!r} is on {v.device}; the step runs on "
                                 f"{self.device}")
            if k in self.HISTOGRAMS:  # a vector, for TensorBoard only
                if self.writer is not None:
                    v = v.detach().float()
                    self._vectors[k] = self._vectors[k] + v if k in self._vectors else v.clone()
                continue
            v = v.detach().float().reshape(())
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
            self._counts[k] = self._counts.get(k, 0) + 1
        self._steps_since += 1

    def _means(self) -> torch.Tensor:
        """The interval's means, one vector on the step's device (sorted keys)."""
        return torch.stack([self._sums[k] / self._counts[k] for k in sorted(self._sums)])

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def log(self, step: int, epoch: int, hparams: dict[str, float],
            extra: Optional[dict[str, float]] = None) -> dict[str, float]:
        """``step`` is the number of steps done. Returns the averaged scalars."""
        keys = sorted(self._sums)
        vec = self._means()
        if D.world_size() > 1:
            vec = vec.to(torch.float64)
            D.all_reduce_sum_(vec)
            vec /= D.world_size()
        scalars = dict(zip(keys, vec.tolist()))
        scalars.update(hparams)
        scalars.update(extra or {})
        now = time.perf_counter()
        dt = now - self._t0
        scalars["img_per_s"] = self._steps_since * self.global_batch / max(dt, 1e-9)
        scalars["data_wait_frac"] = min(1.0, self._wait / max(dt, 1e-9))
        scalars["peak_mem_gib"] = peak_memory_gib(self.device)
        if self.flops_per_image:
            per_device = scalars["img_per_s"] / D.world_size()
            scalars["tflops_per_device"] = per_device * self.flops_per_image / 1e12
            utilisation = mfu(per_device, self.flops_per_image, self.peak_flops)
            if utilisation is not None:
                scalars["mfu"] = utilisation
        eta = (self.total_steps - step) * dt / max(1, self._steps_since)
        self.history.append({"step": step, **scalars})
        if D.is_main():
            os.makedirs(os.path.dirname(self.metrics_path), exist_ok=True)
            with open_append(self.metrics_path) as f:
                # epochs count from 1, as in the progress line
                f.write(json.dumps({"step": step, "epoch": epoch + 1, **scalars}) + "\n")
            log.info("[ep %d step %d/%d] loss %.4f %s | lr %.2e wd %.3f m %.5f T %.3f%s | "
                     "%.1f img/s%s data %.0f%% mem %.1f GiB ETA %s%s",
                     epoch + 1, step, self.total_steps, scalars.get("loss", float("nan")),
                     MSNLoss.describe(scalars), hparams["lr"],
                     hparams["wd"], hparams["momentum"], hparams["T"],
                     f" gnorm {scalars['grad_norm']:.3f}" if "grad_norm" in scalars else "",
                     scalars["img_per_s"],
                     f" MFU {100 * scalars['mfu']:.1f}%" if "mfu" in scalars else "",
                     100 * scalars["data_wait_frac"], scalars["peak_mem_gib"], _fmt_eta(eta),
                     f" | knn {self.last_eval['knn_top1']:.1f}%" if self.last_eval else "")
            if self.writer is not None:
                for k, v in scalars.items():
                    group = ("train" if k in ("loss", *MSNLoss.STATS, "grad_norm", "skipped",
                                              "rankme") else
                             "hparams" if k in hparams else
                             "data" if k in ("bad_images", "data_wait_frac") else "perf")
                    self.writer.add_scalar(f"{group}/{k}", v, step)
                for k, v in self._vectors.items():  # the host copy: a log step's read
                    self.writer.add_histogram(self.HISTOGRAMS[k], v.cpu(), step)
                self.writer.flush()
        self._vectors = {}
        self._sums, self._counts, self._steps_since, self._t0, self._wait = {}, {}, 0, now, 0.0
        return scalars

    def log_eval(self, step: int, scalars: dict[str, float], describe: str = "") -> None:
        """An evaluation during training (rank 0's result): a log line, ``metrics.jsonl``
        and TensorBoard ``eval/*``; its top-1 also joins the following progress lines."""
        self.last_eval = scalars
        if not D.is_main() or not scalars:  # not rank 0, or no readable image left
            return
        with open_append(self.metrics_path) as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        log.info("[step %d] k-NN top-1 %.2f%% top-5 %.2f%% (%s; %.1f s)%s", step,
                 scalars["knn_top1"], scalars["knn_top5"], describe, scalars["knn_seconds"],
                 f"; {scalars['knn_unreadable']} unreadable images left out"
                 if scalars.get("knn_unreadable") else "")
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"eval/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
