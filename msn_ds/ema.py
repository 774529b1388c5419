"""Target-encoder update: an fp32 exponential moving average of the anchor encoder."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], m: float) -> None:
    """``t <- m * t + (1 - m) * o`` for each pair, in the target's (fp32) precision.

    Buffers (BatchNorm running statistics) are not averaged, as in the reference.
    """
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"target has {len(target)} parameters, online {len(online)}")
    online = [o.detach().to(t.dtype) for t, o in zip(target, online)]
    torch._foreach_lerp_(target, online, 1.0 - m)


def make_target(encoder: nn.Module) -> nn.Module:
    """An fp32 copy of ``encoder`` that takes no gradient."""
    import copy

    target = copy.deepcopy(encoder).float()
    for p in target.parameters():
        p.requires_grad_(False)
    return target
