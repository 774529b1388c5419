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


class PlainEMA:
    """The target update for ZeRO stages 0-2: full fp32 target beside the engine."""

    def __init__(self, target: nn.Module, anchor: nn.Module):
        self.target, self.anchor = target, anchor

    def update(self, m: float) -> None:
        ema_update_(self.target.parameters(), self.anchor.parameters(), m)

    def state_dict(self) -> dict:
        return self.target.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state)


def make_target(encoder: nn.Module) -> nn.Module:
    """An fp32 copy of ``encoder`` that takes no gradient."""
    import copy

    target = copy.deepcopy(encoder).float()
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class ShardedEMA:
    """The target update under ZeRO-3, on each process's own slices: no gather, no full copy.

    The target encoder is partitioned exactly like the anchor (same world size, same
    flattening), so slice ``i`` of target parameter ``p`` and slice ``i`` of the anchor's
    fp32 master copy of ``p`` hold the same elements. The target keeps its own fp32 slices
    (a bf16 target could not absorb updates of size (1 - m) * delta as m -> 1) and writes
    them into its working partitions (``ds_tensor``, in the engine's dtype) after each update.
    The target must be partitioned with ``stage3_param_persistence_threshold: 0``: a
    persisted parameter lives whole in ``.data`` and would go stale.
    """

    def __init__(self, target: nn.Module, anchor: nn.Module):
        from deepspeed.utils import safe_get_local_fp32_param

        self._local_fp32 = safe_get_local_fp32_param
        self.module = target
        self.names = [n for n, _ in target.named_parameters()]
        self.target = [p for p in target.parameters()]
        self.anchor = [p for p in anchor.parameters()]
        if len(self.target) != len(self.anchor):
            raise ValueError(f"target has {len(self.target)} parameters, anchor {len(self.anchor)}")
        for t, a in zip(self.target, self.anchor):
            if not hasattr(t, "ds_tensor") or t.ds_tensor.numel() != self._local_fp32(a).numel():
                raise ValueError("target and anchor are not partitioned alike (ZeRO-3 with the "
                                 "same world size is required)")
        # start from the anchor's fp32 master slices: exact, whatever the engines' dtype
        self.slices = [self._local_fp32(a).detach().float().clone() for a in self.anchor]
        self._write()

    @torch.no_grad()
    def update(self, m: float) -> None:
        online = [self._local_fp32(a).detach().float() for a in self.anchor]
        torch._foreach_lerp_(self.slices, online, 1.0 - m)
        self._write()

    @torch.no_grad()
    def _write(self) -> None:
        for p, s in zip(self.target, self.slices):
            p.ds_tensor.copy_(s.view_as(p.ds_tensor))

    def state_dict(self) -> dict:
        """This process's fp32 slices (with names and full shapes, for consolidation) and
        the target's buffers (BatchNorm statistics are replicated, not partitioned)."""
        return {"names": self.names, "shapes": [list(p.ds_shape) for p in self.target],
                "slices": [s.clone() for s in self.slices],
                "buffers": {k: v.clone() for k, v in self.module.named_buffers()}}

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Re-slice whole fp32 parameters (and buffers) for this process: resuming at
        another world size."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        for name, s in zip(self.names, self.slices):
            s.copy_(slice_for_rank(full[name], s.numel(), rank))
        buffers = dict(self.module.named_buffers())
        for k, v in buffers.items():
            v.copy_(full[k])
        self._write()

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError("saved target slices do not match this target encoder")
        for s, saved in zip(self.slices, state["slices"]):
            s.copy_(saved)
        buffers = dict(self.module.named_buffers())
        for k, v in state["buffers"].items():
            buffers[k].copy_(v)
        self._write()


def slice_for_rank(full: torch.Tensor, part: int, rank: int) -> torch.Tensor:
    """ZeRO-3's partition of a flattened parameter: padded to world x part, rank's piece."""
    flat = full.flatten()
    flat = torch.nn.functional.pad(flat, (0, max(0, part * (rank + 1) - flat.numel())))
    return flat[rank * part:(rank + 1) * part]


def assemble_slices(rank_states: list[dict]) -> dict[str, torch.Tensor]:
    """Full fp32 parameters (and buffers) from every process's :class:`ShardedEMA` state."""
    first = rank_states[0]
    full = {}
    for i, (name, shape) in enumerate(zip(first["names"], first["shapes"])):
        flat = torch.cat([r["slices"][i].flatten() for r in rank_states])
        numel = 1
        for d in shape:
            numel *= d
        full[name] = flat[:numel].view(shape).clone()
    full.update(first["buffers"])
    return full
