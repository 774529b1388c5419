"""Exact large-batch MSN through gradient accumulation: the gradient cache (Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

MSN's Sinkhorn targets, its me-max regulariser and the heads' BatchNorm span the whole
batch, so summing the gradients of micro-batches would train another model. Instead, a step
over a per-process batch of ``A`` micro-batches (DeepSpeed's ``gradient_accumulation_steps``)
runs in three phases:

1. without autograd: the target encoder's backbone over every micro-batch, its head over
   the whole batch; the anchor backbone over every micro-batch, keeping only its outputs
   (the class tokens that enter the projection head, one small tensor per group of views);
2. with autograd: the anchor heads, the prototypes and the loss on the whole per-process
   batch, exactly as one large step computes them; the backward gives the heads' and the
   prototypes' gradients, and ``dL/dh`` at every cached backbone output;
3. per micro-batch: the anchor backbone again, with autograd, and the backward of
   ``sum(h * dL/dh)``, whose gradient is the large step's.

Masks and stochastic layers replay identically in phases 1 and 3: each micro-batch draws its
patch mask from a generator made afresh from ``(seed, step)`` (the large step's shared mask
exactly; a per-sample mask from ``(seed, step, micro-batch)``), and when a layer draws from
the global RNG (drop path) its state is put back before the second forward.

DeepSpeed sees ``A + 1`` backward calls and one ``engine.step()`` per optimizer step: every
backward but the last runs with ``set_gradient_accumulation_boundary(False)``, so ZeRO-0/1
reduce once, at the last; ``scale_wrt_gas=False``, as the cached gradient already is the
whole batch's (ZeRO-2 and ZeRO-3 reduce-scatter during each backward, as under DeepSpeed's
own accumulation). Under ZeRO-3 two things differ: phase 3's first backward restarts
ZeRO-3's accumulation window (:func:`first_backbone_backward`), and phase 1 gathers the
target backbone's own parameters around its passes (:func:`whole_backbone_params`).
``A = 1`` never comes here: :meth:`.trainer.MSNTrainer.step` is unchanged. Under fp16 the
cached gradient is unscaled before phase 3 (:func:`loss_scale`). With ``A > 1``, ZeRO-Offload
and ``meta.compile`` are refused before any work
(:func:`.deepspeed_config.refuse_accumulation`).

A cost left to DeepSpeed under ZeRO-3: its parameter coordinator records the order in which
modules fetch their parameters between two forwards of the engine's module, and prefetches
along it while the next pass repeats it. The passes here differ (backbone without autograd,
heads with their backward, backbone with its backward), so at each change of kind it
records again, and every new record is checked across processes
(``partitioned_param_coordinator.py``, ``reset_step`` -> ``assert_ints_same_as_other_ranks``:
broadcasts read on the host). That is a fixed number per step whatever ``A`` (8 host
reads on the CPU at ``A`` = 2 and 4), not one per micro-batch; the passes right after a
change fetch without prefetching, and the target's passes (called outside its engine's
forward) always do.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .loss import effective_rank
from .masking import MASK_KEY, mask_generator
from .seeding import seed_for


def micro_generator(seed: int, step: int, micro: int, per_sample: bool) -> torch.Generator:
    """The patch-mask generator of micro-batch ``micro`` of ``step``. A shared mask (one
    permutation for the batch) is the large step's own: ``mask_generator(seed, step)`` for
    every micro-batch. A per-sample mask is drawn per micro-batch, from its index too."""
    if not per_sample:
        return mask_generator(seed, step)
    return torch.Generator().manual_seed(seed_for(seed, step, MASK_KEY, micro))


def draws_from_global_rng(module: torch.nn.Module) -> bool:
    """Whether a training forward draws from the global RNG (timm's drop path, dropout)."""
    return any((getattr(m, "drop_prob", 0.0) or 0.0) > 0.0
               or isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0.0
               for m in module.modules())


def rng_state(device: torch.device) -> tuple:
    """The global RNG state a forward on ``device`` draws from (host copies, no device
    wait: a CUDA generator's state is its seed and offset)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def whole_backbone_params(target):
    """Under ZeRO-3, the target backbone's own parameters (the class token and the position
    embedding) gathered for phase 1, which calls the target's halves outside its engine's
    forward: the engine gathers the parameters a module reads without calling it (ZeRO-3's
    "external parameters") only inside ``engine.forward``, and the target engine partitions
    every parameter (``stage3_param_persistence_threshold: 0``, :func:`.engine.init_target`).
    Every submodule the halves call gathers its own around its forward, as ever. Elsewhere
    (ZeRO-0/1/2) a no-op."""
    backbone = getattr(target, "module", target).backbone
    own = [p for p in backbone.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not own:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(own)


def first_backbone_backward(engine) -> None:
    """Before phase 3's first backward: under ZeRO-3 it writes the backbone's gradient
    partitions afresh. ZeRO-3 overwrites a parameter's gradient partition in the first
    backward of an accumulation window (``micro_step_id == 0``) and adds to it in the later
    ones (``stage3.py``, ``partition_grads``); the counter is raised at each forward that
    follows a backward. The first backward here (phase 2) reaches only the heads and the
    prototypes, so without this the backbone's gradients would be added to the previous
    step's. Phase 2 and phase 3 reach disjoint parameters (phase 2 starts from the cached
    outputs, detached; phase 3 ends at them), so each parameter is overwritten once, at its
    first gradient of the step, and accumulated after, as in one large step. ZeRO-0/1/2
    start each step from cleared gradients: nothing to do."""
    if engine.zero_optimization_stage() != 3:
        return
    opt = engine.optimizer
    if not hasattr(opt, "micro_step_id"):  # a DeepSpeed that keeps the window elsewhere
        raise RuntimeError("gradient accumulation under ZeRO-3 needs DeepSpeed's "
                           "DeepSpeedZeroOptimizer_Stage3.micro_step_id (DeepSpeed 0.19); "
                           f"{type(opt).__name__} has none")
    opt.micro_step_id = 0


def loss_scale(engine) -> float:
    """The factor ``engine.backward`` multiplies a loss by: fp16's current loss scale (a
    host number DeepSpeed keeps, no device read), else 1. Phase 2's backward leaves the
    cached gradient scaled by it; phase 3's backwards scale their surrogates again, so the
    cached gradient is divided by it first, and the backbone's gradients carry the scale
    once, as the heads' do (DeepSpeed unscales, checks for overflow and skips alike)."""
    if not engine.fp16_enabled():
        return 1.0
    scale = engine.optimizer.loss_scale
    return 1.0 if scale is None else float(scale)


def split(views: list[torch.Tensor], parts: int) -> tuple[list[list[torch.Tensor]], int]:
    """The per-process batch as ``parts`` micro-batches of every view, and their size."""
    batch = views[0].shape[0]
    if batch % parts:
        raise ValueError(f"a batch of {batch} images does not split into {parts} micro-batches "
                         "(gradient_accumulation_steps)")
    size = batch // parts
    return [[v[k * size:(k + 1) * size] for v in views] for k in range(parts)], size


def join(chunks: list[torch.Tensor], size: int) -> torch.Tensor:
    """One group's rows of every micro-batch in the large step's order, as a new leaf.
    ``chunks[k]``: micro-batch ``k``'s ``[n views x size images, D]``, view-major; returns
    ``[n views x A*size images, D]``, view-major."""
    dim = chunks[0].shape[-1]
    return torch.cat([c.view(-1, size, dim) for c in chunks], dim=1).reshape(-1, dim)


def unjoin(whole: torch.Tensor, parts: int, size: int) -> list[torch.Tensor]:
    """:func:`join` undone: micro-batch ``k``'s rows of ``whole``."""
    dim = whole.shape[-1]
    grid = whole.view(-1, parts * size, dim)
    return [grid[:, k * size:(k + 1) * size].reshape(-1, dim) for k in range(parts)]


def accumulated_step(tr, views: list[torch.Tensor], step: int, log: bool,
                     stop: int) -> tuple[torch.Tensor, dict, dict, torch.Tensor]:
    """One optimizer step of :class:`.trainer.MSNTrainer` ``tr`` over ``tr.accumulation``
    micro-batches; returns ``(loss, stats, sched, skipped)`` as the single-pass step does."""
    engine, parts = tr.engine, tr.accumulation
    sched = tr.schedules.at(step)
    tr.set_hparams(sched["lr"], sched["wd"])
    views = [v.to(tr.device, non_blocking=True) for v in views]
    micro, size = split(views, parts)
    norm_stats = [b.clone() for b in tr.norm_stats]
    mask = dict(masked_views=tr.masked_views, mask_ratio=tr.mask_ratio,
                per_sample_mask=tr.per_sample_mask)
    replay = draws_from_global_rng(tr.model)

    def anchor_features(k: int) -> tuple[torch.Tensor, ...]:
        return engine([v.to(tr.dtype) for v in micro[k][1:]], part="features",
                      generator=micro_generator(tr.seed, step, k, tr.per_sample_mask), **mask)

    # phase 1: no autograd through the encoders
    states: list[Optional[tuple]] = []
    with torch.no_grad():
        with whole_backbone_params(tr.target):
            target_h = torch.cat([tr.target.forward_features(m[0].to(tr.target_dtype))
                                  for m in micro])
        target_z = tr.target.head(target_h)
        cached = []
        for k in range(parts):
            states.append(rng_state(tr.device) if replay else None)
            cached.append(anchor_features(k))
    after = rng_state(tr.device) if replay else None

    # phase 2: heads, prototypes and loss on the whole per-process batch
    leaves = [join([c[g] for c in cached], size).requires_grad_()
              for g in range(len(cached[0]))]
    del cached
    anchor_z, prototypes = engine(leaves, part="head")
    loss, stats = tr.criterion(anchor_z, target_z, prototypes, sched["T"])
    flags = tr._agree(loss, stop)
    finite = flags[0]
    tr.flags.push(step, flags)
    with torch.no_grad():
        for now, before in zip(tr.norm_stats, norm_stats):
            now.copy_(torch.where(finite > 0.5, now, before))

    def backward() -> None:
        engine.set_gradient_accumulation_boundary(False)
        engine.backward(loss, scale_wrt_gas=False)
        # fp16: the backward scaled the loss; the surrogates' backwards scale it once more
        unscale = 1.0 / loss_scale(engine)
        grads = [unjoin(leaf.grad.float() * unscale, parts, size) for leaf in leaves]
        # phase 3: per micro-batch, the backbone again and the cached gradient through it
        for k in range(parts):
            if replay:
                set_rng_state(states[k], tr.device)
            engine.set_gradient_accumulation_boundary(k == parts - 1)
            feats = anchor_features(k)
            if k == 0:
                first_backbone_backward(engine)
            surrogate = sum((h.float() * g[k]).sum() for h, g in zip(feats, grads))
            engine.backward(surrogate, scale_wrt_gas=False)
        if replay:
            set_rng_state(after, tr.device)

    if tr.gated:
        backward()
        grad_norm = tr._clip() if tr.clip_grad else (tr._grad_norm_stage0() if log else None)
        tr.optimizer.found_inf = 1.0 - finite  # fused AdamW skips on the device
        engine.step()
        tr.ema.update(sched["momentum"], gate=finite)
    elif bool(finite.item()):  # host-side optimiser: it waits for the host anyway
        backward()
        grad_norm = tr._clip() if tr.clip_grad else (tr._grad_norm_stage0() if log else None)
        engine.step()
        tr.ema.update(sched["momentum"])
    else:
        grad_norm = None
    if log:
        grad_norm = grad_norm if grad_norm is not None else tr._grad_norm_engine()
        if grad_norm is not None:
            stats["grad_norm"] = grad_norm
        stats["rankme"] = effective_rank(target_h)
    return loss.detach(), stats, sched, 1.0 - finite
