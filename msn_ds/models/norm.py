"""BatchNorm for the projection head: fp32 statistics, global over processes.

``torch.nn.SyncBatchNorm`` refuses CPU tensors and the CPU ``batch_norm`` kernel refuses a
bf16 input with fp32 running statistics. This layer computes in fp32 whatever the input
dtype, and with more than one process all-reduces ``[sum, sum of squares, count]`` (one
collective per layer, differentiable), so that outputs and gradients equal one process's
on the concatenated batch, on any device and backend. State-dict keys are BatchNorm1d's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..distributed import all_reduce_sum, world_size


class BatchNorm1d(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.training or not self.track_running_stats:
            mean, var, n = self._batch_stats(xf)
            if self.training and self.track_running_stats:
                self._update_running(mean, var, n)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype)

    def _batch_stats(self, xf: torch.Tensor):
        channels = xf.shape[1]
        count = torch.full((1,), float(xf.shape[0]), dtype=torch.float32, device=xf.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), count])
        if world_size() > 1:
            stats = all_reduce_sum(stats)
        total, total_sq, n = stats[:channels], stats[channels:2 * channels], stats[-1]
        mean = total / n
        return mean, (total_sq / n - mean * mean).clamp_min(0.0), n

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        m = self.momentum if self.momentum is not None else 0.1
        unbiased = var * n / (n - 1).clamp_min(1.0)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        self.num_batches_tracked += 1
