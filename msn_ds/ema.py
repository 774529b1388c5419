"""Target-encoder update: an exponential moving average of the anchor's fp32 master weights.

Three placements, one rule (the target follows the fp32 master weights, whatever the stage):

* :class:`PlainEMA`: the engine computes in fp32, so its weights *are* the masters; the
  target is an fp32 copy updated in place from them.
* :class:`PartitionedEMA`: ZeRO-0 in bf16/fp16 and ZeRO-1/2. The optimiser keeps the fp32
  masters flat (partitioned across processes at ZeRO-1/2); each process keeps the fp32 EMA of
  its own partition, writes it into the target (which computes in the engine's dtype, or
  in fp32 with ``meta.target_dtype: fp32``) and the target's partitions are all-gathered:
  the same traffic as the stage's own weight all-gather (twice it for an fp32 target), and
  no full fp32 copy beside the target.
* :class:`ShardedEMA`: ZeRO-3. The target is a second partitioned engine; the EMA runs on
  the fp32 slices and the engine gathers on use.

``update(m, gate)``: ``gate`` is a 0-d tensor on the step's device (1: update, 0: skip this
step), so that a non-finite step leaves the target untouched without a host sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


def _weight(m: float, gate: Optional[torch.Tensor], device: torch.device):
    """``1 - m``, or ``(1 - m) * gate`` on ``device`` (a device-side skip)."""
    if gate is None:
        return 1.0 - m
    return (gate.to(device=device, dtype=torch.float32) * (1.0 - m))


def _foreach_lerp_(target: list[torch.Tensor], online: list[torch.Tensor], weight) -> None:
    """``torch._foreach_lerp_`` with a float, or with a device tensor passed as a list (its
    single-tensor overload reads the weight back to the host: a sync per step)."""
    if isinstance(weight, torch.Tensor):
        weight = [weight] * len(target)
    torch._foreach_lerp_(target, online, weight)


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], m: float,
                gate: Optional[torch.Tensor] = None) -> None:
    """``t <- m * t + (1 - m) * o`` for each pair, in place; both lists in one dtype.

    Buffers (BatchNorm running statistics) are not averaged, as in the reference.
    """
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"target has {len(target)} parameters, online {len(online)}")
    if not target:
        return
    for t, o in zip(target, online):
        if t.dtype != o.dtype:
            raise TypeError(f"EMA of {o.dtype} into {t.dtype}: the target must follow the fp32 "
                            "masters (a cast here would copy every parameter every step)")
    _foreach_lerp_(target, [o.detach() for o in online], _weight(m, gate, target[0].device))


class PlainEMA:
    """fp32 engine weights are the master weights: the fp32 target follows them in place."""

    def __init__(self, target: nn.Module, anchor: nn.Module):
        self.target, self.anchor = target, anchor
        if any(p.dtype != torch.float32 for p in anchor.parameters()):
            raise TypeError("PlainEMA needs an fp32 anchor; use PartitionedEMA under bf16/fp16")

    def update(self, m: float, gate: Optional[torch.Tensor] = None) -> None:
        ema_update_(self.target.parameters(), self.anchor.parameters(), m, gate)

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


@dataclass
class _FlatGroup:
    """One optimiser group: the target's flat buffer mirrors the engine's flat buffer (same
    size and offsets), so partition ``r`` of one holds the same parameters as the other's."""
    master: torch.Tensor  # fp32, this process's partition of the optimiser's master copy
    ema: torch.Tensor  # fp32, same shape and device as ``master``
    flat: torch.Tensor  # the target's whole buffer, in the engine's dtype, on its device
    parts: Optional[list[torch.Tensor]]  # every process's view of ``flat`` (None: whole)
    rank: int
    group: Optional[object]
    shared: bool = False  # ``ema`` is ``local`` itself (an fp32 target): nothing to copy

    @property
    def local(self) -> torch.Tensor:
        return self.flat if self.parts is None else self.parts[self.rank]


def _optimizer_layout(opt) -> list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor,
                                         Optional[list[torch.Tensor]], int, Optional[object]]]:
    """Per group: (engine params, engine flat buffer, fp32 master partition, every process's
    partition of the flat buffer or None, this process's partition index, process group),
    read from DeepSpeed's mixed-precision / ZeRO-1/2 optimisers."""
    name = type(opt).__name__
    if name == "DeepSpeedZeroOptimizer":  # ZeRO-1/2
        groups = []
        for i, params in enumerate(opt.bit16_groups):
            pg = opt.real_dp_process_group[i]
            groups.append((params, opt.bit16_groups_flat[i], opt.single_partition_of_fp32_groups[i],
                           opt.parallel_partitioned_bit16_groups[i], dist.get_rank(group=pg), pg))
        return groups
    if name == "BF16_Optimizer":  # bf16 ZeRO-1 with fp32 gradient accumulation
        return [(params, opt.bf16_groups_flat[i], opt.fp32_groups_flat_partition[i],
                 opt.bf16_partitioned_groups[i], dist.get_rank(group=opt.real_dp_process_group[i]),
                 opt.real_dp_process_group[i]) for i, params in enumerate(opt.bf16_groups)]
    if name == "FP16_Optimizer":  # ZeRO-0 in fp16/bf16: flat, not partitioned
        return [(params, opt.fp16_groups_flat[i], opt.fp32_groups_flat[i], None, 0, None)
                for i, params in enumerate(opt.fp16_groups)]
    if name == "FP16_UnfusedOptimizer":  # ZeRO-0 in fp16/bf16 without a fused optimiser
        return [([p], p.data.view(-1), m.view(-1), None, 0, None)
                for params, masters in zip(opt.fp16_groups, opt.fp32_groups)
                for p, m in zip(params, masters)]
    raise TypeError(f"don't know where {name} keeps the fp32 master weights; the target "
                    "EMA supports DeepSpeed's ZeRO-1/2, BF16 and FP16 optimisers")


class PartitionedEMA:
    """The target update at ZeRO-0 (bf16/fp16) and ZeRO-1/2, from the fp32 masters.

    The target computes in its own parameters' dtype: the engine's (bf16/fp16), or fp32
    (``meta.target_dtype: fp32``). Its trained parameters become views of flat buffers in
    that dtype laid out exactly like the optimiser's, so this process's fp32 EMA partition
    maps onto one contiguous slice; after the update each process writes its slice and one
    all-gather per group makes the target whole again. An fp32 target's slice *is* the EMA
    partition (no second copy) when it lives on the masters' device. Parameters the
    optimiser does not hold (frozen ones) keep their initial values, as they would under an
    EMA.
    """

    def __init__(self, target: nn.Module, anchor: nn.Module, optimizer):
        self.module = target
        self.names = [n for n, _ in target.named_parameters()]
        dtype = next(target.parameters()).dtype
        by_anchor = {id(a): (n, t) for a, (n, t) in zip(anchor.parameters(),
                                                         target.named_parameters())}
        if len(by_anchor) != len(self.names):
            raise ValueError("target and anchor have different parameters")
        self.groups: list[_FlatGroup] = []
        self.where: dict[str, tuple[int, int]] = {}  # name -> (group, offset in its flat)
        for params, flat, master, parts, rank, pg in _optimizer_layout(optimizer):
            mine = [p for p in params if id(p) in by_anchor]
            if not mine:
                continue  # e.g. the prototypes' group
            tflat = torch.zeros(flat.numel(), dtype=dtype, device=flat.device)
            for p in mine:
                offset = _offset(p, flat)
                name, t = by_anchor[id(p)]
                t.data = tflat.narrow(0, offset, p.numel()).view_as(t)
                self.where[name] = (len(self.groups), offset)
            tparts = None if parts is None else [
                tflat.narrow(0, _offset(q, flat), q.numel()) for q in parts]
            local = tflat if tparts is None else tparts[rank]
            shared = (dtype == torch.float32 and master.device == tflat.device
                      and master.numel() == local.numel())
            ema = local.view_as(master).copy_(master.detach()) if shared else \
                master.detach().float().clone()
            self.groups.append(_FlatGroup(master=master, ema=ema, flat=tflat, parts=tparts,
                                          rank=rank, group=pg, shared=shared))
        self._write_and_gather()

    @torch.no_grad()
    def update(self, m: float, gate: Optional[torch.Tensor] = None) -> None:
        for g in self.groups:
            g.ema.lerp_(g.master.detach(), _weight(m, gate, g.ema.device))
        self._write_and_gather()

    @torch.no_grad()
    def _write_and_gather(self) -> None:
        for g in self.groups:
            if not g.shared:
                g.local.copy_(g.ema.view_as(g.local))
            if g.parts is not None and len(g.parts) > 1:
                _all_gather_into(g.flat, g.parts, g.rank, g.group)

    @torch.no_grad()
    def _full_flats(self) -> list[torch.Tensor]:
        """Each group's whole fp32 EMA (collective under ZeRO-1/2)."""
        fulls = []
        for g in self.groups:
            local = g.ema.reshape(-1).to(g.flat.device)
            if g.parts is None or len(g.parts) == 1:
                fulls.append(local)
                continue
            pieces = [torch.empty(q.numel(), dtype=torch.float32, device=g.flat.device)
                      for q in g.parts]
            dist.all_gather(pieces, local, group=g.group)
            fulls.append(torch.cat(pieces))
        return fulls

    def state_dict(self) -> dict:
        """The whole fp32 target and its buffers, like :class:`PlainEMA` (so consolidation
        and resuming at another world size need nothing else). Collective: every process
        calls it when a checkpoint is saved."""
        fulls = self._full_flats()
        state = {}
        for name, t in zip(self.names, self.module.parameters()):
            if name in self.where:
                gi, offset = self.where[name]
                state[name] = fulls[gi][offset:offset + t.numel()].view(t.shape).cpu().clone()
            else:
                state[name] = t.detach().float().cpu().clone()
        for name, b in self.module.named_buffers():
            state[name] = (b.float() if b.is_floating_point() else b).detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"target state lacks {missing[:3]}")
        for name, t in zip(self.names, self.module.parameters()):
            t.copy_(state[name])
        for name, b in self.module.named_buffers():
            b.copy_(state[name])
        # the fp32 EMA partitions from the exact saved values, not from the cast copies
        fulls = [torch.zeros(g.flat.numel(), dtype=torch.float32) for g in self.groups]
        for name, (gi, offset) in self.where.items():
            value = state[name].reshape(-1).float()
            fulls[gi][offset:offset + value.numel()] = value
        for g, full in zip(self.groups, fulls):
            start = _offset(g.local, g.flat)
            g.ema.copy_(full[start:start + g.ema.numel()].view_as(g.ema))


def _offset(view: torch.Tensor, flat: torch.Tensor) -> int:
    """Where ``view`` starts inside the 1-D ``flat`` (they share storage)."""
    if view.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
        raise ValueError("an engine parameter does not live in its group's flat buffer")
    offset = (view.data_ptr() - flat.data_ptr()) // flat.element_size()
    if not 0 <= offset <= flat.numel() - view.numel():
        raise ValueError("an engine parameter lies outside its group's flat buffer")
    return offset


def _all_gather_into(flat: torch.Tensor, parts: list[torch.Tensor], rank: int, group) -> None:
    """In-place all-gather of equal or unequal partitions of ``flat``."""
    sizes = {q.numel() for q in parts}
    contiguous = all(parts[i + 1].data_ptr() == parts[i].data_ptr() + parts[i].numel() *
                     flat.element_size() for i in range(len(parts) - 1))
    if len(sizes) == 1 and contiguous and parts[0].data_ptr() == flat.data_ptr() and \
            flat.numel() == len(parts) * parts[0].numel():
        dist.all_gather_into_tensor(flat, parts[rank], group=group)
    else:
        dist.all_gather(list(parts), parts[rank].clone(), group=group)


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
        self._sources: Optional[list[torch.Tensor]] = None  # see _online
        self._owner: Optional[tuple] = None
        online = self._online()
        for t, o in zip(self.target, online):
            if not hasattr(t, "ds_tensor") or t.ds_tensor.numel() != o.numel():
                raise ValueError("target and anchor are not partitioned alike (ZeRO-3 with the "
                                 "same world size is required)")
        # start from the anchor's fp32 master slices: exact, whatever the engines' dtype
        self.slices = [o.detach().float().clone() for o in online]
        self._write()

    def _online(self) -> list[torch.Tensor]:
        """The anchor's fp32 master slices on this process.

        Each ``safe_get_local_fp32_param`` synchronises ZeRO-3's ``reduce_and_partition_stream``
        on CUDA (``stage3.py``, ``_get_fp32_opt_state_partition``): one host wait per
        parameter per step if asked every step. What it returns is a view (``narrow``) of the
        optimiser's persistent flat fp32 partition (``fp32_partitioned_groups_flat``), which
        its step updates in place on the compute stream, the stream this EMA runs on. So the
        views are looked up once and kept. They are looked up again only if the optimiser
        has rebuilt those buffers (a new list, a new tensor or new storage: checked on the
        host, from Python identities and data pointers, no device access). Under optimiser
        offload on a GPU the accessor returns a device copy of a host partition, not a view:
        then nothing is kept and each update asks again (that step waits for the host
        optimiser anyway)."""
        if self._sources is not None and self._owner_unchanged():
            return self._sources
        online = [self._local_fp32(a) for a in self.anchor]
        self._sources, self._owner = None, None
        opt = getattr(self.anchor[0], "_z3_optimizer", None)
        flats = getattr(opt, "fp32_partitioned_groups_flat", None)
        if flats and all(any(_is_view_of(o, f) for f in flats) for o in online):
            self._sources = [o.detach() for o in online]
            self._owner = (opt, flats, list(flats), [_storage_ptr(f) for f in flats])
        return online

    def _owner_unchanged(self) -> bool:
        opt, flats, tensors, ptrs = self._owner
        now = opt.fp32_partitioned_groups_flat
        return now is flats and len(now) == len(tensors) and all(
            a is b and _storage_ptr(a) == p for a, b, p in zip(now, tensors, ptrs))

    @torch.no_grad()
    def update(self, m: float, gate: Optional[torch.Tensor] = None) -> None:
        online = [o.detach() for o in self._online()]
        _foreach_lerp_(self.slices, online, _weight(m, gate, self.slices[0].device))
        self._write()

    @torch.no_grad()
    def _write(self) -> None:
        # The target engine runs with overlap_comm off (engine.init_target), so its next
        # all-gather is issued on this stream, after these writes.
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


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _is_view_of(view: torch.Tensor, flat: torch.Tensor) -> bool:
    """``view`` shares ``flat``'s storage and lies inside it (host-side pointers only)."""
    if view.device != flat.device or _storage_ptr(view) != _storage_ptr(flat):
        return False
    start = view.data_ptr() - flat.data_ptr()
    return 0 <= start and start + view.numel() * view.element_size() <= \
        flat.numel() * flat.element_size()


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
