"""The MSN training step, and the one order that builds it (:func:`build`).

One engine holds what the optimiser trains (anchor encoder + prototypes, ``MSNModel``); the
target encoder sits beside it, an EMA of the fp32 master weights computing in the engine's
dtype (:mod:`.ema`). The step reads top to bottom:
schedules -> target forward -> masked anchor forward -> loss -> backward/step -> EMA.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import distributed as D
from .accumulate import accumulated_step
from .ema import ShardedEMA
from .engine import build_models, init_deepspeed, init_target
from .io.checkpoint import (ResumePlan, load_training_checkpoint, plan_resume,
                            save_training_checkpoint)
from .loss import MSNLoss, effective_rank
from .masking import mask_generator
from .models import MSNModel
from .schedules import Schedules


@dataclass
class Training:
    """What :func:`build` makes: the trainer (which holds the engine, the target and its EMA,
    and the schedules, and owns saving and resuming them) and the checked resume plan (None
    for a fresh start; :meth:`MSNTrainer.resume` restores it)."""
    trainer: "MSNTrainer"
    plan: Optional[ResumePlan] = None

    @property
    def engine(self):
        return self.trainer.engine

    @property
    def target(self) -> torch.nn.Module:
        return self.trainer.target

    @property
    def schedules(self) -> Schedules:
        return self.trainer.schedules


def build(cfg: dict, ds_config: dict, steps_per_epoch: int,
          resume_from: Optional[str] = None) -> Training:
    """The one construction order: resume plan -> models -> DeepSpeed -> target/EMA ->
    schedules -> trainer. The plan comes first: it refuses a checkpoint before anything is
    built, and at another world size it converts the checkpoint and tells ``ds_config``
    (changed in place) to load the universal format, which the engine must know when it is
    made. Raises :class:`.io.safe_load.CheckpointError` for a checkpoint that cannot be
    resumed."""
    plan = (plan_resume(resume_from, cfg, D.world_size(), ds_config)
            if resume_from is not None else None)
    model, target = build_models(cfg, resuming=plan is not None)
    engine = init_deepspeed(model, ds_config)
    target, ema = init_target(target, engine, ds_config, cfg["meta"]["target_dtype"])
    schedules = build_schedules(cfg, steps_per_epoch)
    trainer = MSNTrainer(engine, target, ema, build_criterion(cfg), schedules, **step_options(cfg),
                         accumulation=int(ds_config.get("gradient_accumulation_steps", 1)))
    return Training(trainer, plan)


def step_options(cfg: dict) -> dict[str, Any]:
    """The config values :class:`MSNTrainer` reads."""
    return {"masked_views": cfg["data"]["rand_views"], "mask_ratio": cfg["data"]["patch_drop"],
            "per_sample_mask": cfg["criterion"]["per_sample_mask"],
            "seed": cfg["meta"]["seed"], "nonfinite_patience": cfg["meta"]["nonfinite_patience"],
            "clip_grad": float(cfg["optimization"]["clip_grad"])}


def build_criterion(cfg: dict) -> MSNLoss:
    crit = cfg["criterion"]
    return MSNLoss(temperature=crit["temperature"],
                   me_max_weight=crit["memax_weight"] if crit["me_max"] else 0.0,
                   entropy_weight=crit["ent_weight"] if crit["use_ent"] else 0.0,
                   use_sinkhorn=crit["use_sinkhorn"],
                   label_smoothing=cfg["data"]["label_smoothing"],
                   sinkhorn_iters=crit["sinkhorn_iters"], prior=crit["prior"],
                   prior_tau=crit["prior_tau"])


def build_schedules(cfg: dict, steps_per_epoch: int) -> Schedules:
    opt, crit = cfg["optimization"], cfg["criterion"]
    return Schedules(steps_per_epoch=steps_per_epoch, epochs=opt["epochs"],
                     warmup_epochs=opt["warmup"], start_lr=opt["start_lr"], ref_lr=opt["lr"],
                     final_lr=opt["final_lr"], start_wd=opt["weight_decay"],
                     final_wd=opt["final_weight_decay"], start_momentum=opt["start_momentum"],
                     final_momentum=opt["final_momentum"], start_sharpen=crit["start_sharpen"],
                     final_sharpen=crit["final_sharpen"], ipe_scale=opt["ipe_scale"])


@dataclass
class StepOutput:
    """What a step hands out: tensors on the step's device (``skipped``: 1.0 if the update
    and the EMA were skipped for a non-finite loss), the schedules' values as floats."""
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    sched: dict[str, float]
    skipped: torch.Tensor


class HostFlags:
    """Small per-step device values read on the host without stalling the device.

    ``push`` starts a non-blocking copy into pinned host memory and records an event;
    ``ready(upto)`` returns the values of steps up to ``upto`` once their copies have
    landed. Read a step behind, the wait is over before it starts: the device is by then
    busy with the next step's work."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pending: deque = deque()

    def push(self, step: int, values: torch.Tensor) -> None:
        if self.device.type == "meta":  # shapes only: there is nothing to read
            return
        if self.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = values.detach().clone(), None
        self._pending.append((step, host, event))

    def ready(self, upto: Optional[int] = None) -> list[tuple[int, list[float]]]:
        """Values of the steps ``<= upto`` (all when None), oldest first; waits for them."""
        out = []
        while self._pending and (upto is None or self._pending[0][0] <= upto):
            step, host, event = self._pending.popleft()
            if event is not None:
                event.synchronize()
            out.append((step, host.numpy().tolist()))
        return out


class MSNTrainer:
    """Holds the engine, the target encoder and its EMA, the criterion and the schedules.

    The step makes no host sync outside logging steps: a non-finite loss is detected on the
    device and agreed by all processes there (one all-reduce of ``[finite, -stop]``); the
    optimiser skips the update through fused AdamW's ``found_inf`` and the EMA through a
    zero weight. The host learns of skips and of an agreed stop request a step later
    (:meth:`poll`). Optimisers without ``found_inf`` (DeepSpeedCPUAdam under offload, which
    waits for the host anyway) read the flag before the backward instead."""

    def __init__(self, engine, target, ema, criterion: MSNLoss, schedules: Schedules, *,
                 masked_views: int, mask_ratio: float, per_sample_mask: bool, seed: int,
                 nonfinite_patience: int, clip_grad: float = 0.0, accumulation: int = 1):
        self.engine = engine
        self.target = target
        self.ema = ema
        self.criterion = criterion
        self.schedules = schedules
        self.masked_views = masked_views
        self.mask_ratio = mask_ratio
        self.per_sample_mask = per_sample_mask
        self.seed = seed
        self.nonfinite_patience = nonfinite_patience
        self.accumulation = accumulation  # micro-batches per step (msn_ds/accumulate.py)
        self.nonfinite_run = 0
        self.stop_level = 0
        self.device = torch.device(engine.device)
        self.flags = HostFlags(self.device)
        self.optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
        self.gated = bool(getattr(self.optimizer, "defaults", {}).get("fused"))
        self.target_dtype = next(self.target.parameters()).dtype
        # ZeRO-0 fp32: clipped here, on the device (deepspeed_config.trainer_clips); the
        # resolved config has turned DeepSpeed's clipping off. Elsewhere DeepSpeed clips.
        self.clip_grad = clip_grad if (
            clip_grad > 0 and float(getattr(engine, "gradient_clipping", lambda: 0.0)() or 0.0) == 0
            and engine.zero_optimization_stage() == 0 and self.dtype == torch.float32) else 0.0
        # BatchNorm running statistics of both encoders: the forward updates them before the
        # step is known to be finite, so a skipped step puts them back (on the device)
        self.norm_stats = [b for module in (self.model, self.target) for m in module.modules()
                           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                           for b in m.buffers()]

    @property
    def model(self) -> MSNModel:
        return self.engine.module

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def set_hparams(self, lr: float, wd: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("wd_exclude", False):
                group["weight_decay"] = wd

    def step(self, views: list[torch.Tensor], step: int, log: bool = False,
             stop: int = 0) -> StepOutput:
        """One update. ``log``: a logging step, where the gradient norm is read (the one
        place a host sync is allowed). ``stop``: this process wants to stop, at this
        :class:`~msn_ds.distributed.StopRequest` level (0: it does not)."""
        if self.accumulation > 1:  # exact large batch through the gradient cache
            return StepOutput(*accumulated_step(self, views, step, log, stop))
        sched = self.schedules.at(step)
        self.set_hparams(sched["lr"], sched["wd"])
        views = [v.to(self.device, non_blocking=True) for v in views]
        norm_stats = [b.clone() for b in self.norm_stats]

        with torch.no_grad():  # at log steps also the head's input, for the effective rank
            target_z = self.target(views[0].to(self.target_dtype), return_before_head=log)
            target_h, target_z = target_z if log else (None, target_z)
        anchor_z, prototypes = self.engine([v.to(self.dtype) for v in views[1:]],
                                           masked_views=self.masked_views,
                                           mask_ratio=self.mask_ratio,
                                           per_sample_mask=self.per_sample_mask,
                                           generator=mask_generator(self.seed, step))
        loss, stats = self.criterion(anchor_z, target_z, prototypes, sched["T"])
        flags = self._agree(loss, stop)
        finite = flags[0]
        self.flags.push(step, flags)
        with torch.no_grad():
            for now, before in zip(self.norm_stats, norm_stats):
                now.copy_(torch.where(finite > 0.5, now, before))

        if self.gated:
            self.engine.backward(loss)
            grad_norm = self._clip() if self.clip_grad else (
                self._grad_norm_stage0() if log else None)
            self.optimizer.found_inf = 1.0 - finite  # fused AdamW skips on the device
            self.engine.step()
            self.ema.update(sched["momentum"], gate=finite)
        elif bool(finite.item()):  # host-side optimiser: it waits for the host anyway
            self.engine.backward(loss)
            grad_norm = self._clip() if self.clip_grad else (
                self._grad_norm_stage0() if log else None)
            self.engine.step()
            self.ema.update(sched["momentum"])
        else:
            grad_norm = None
        if log:
            grad_norm = grad_norm if grad_norm is not None else self._grad_norm_engine()
            if grad_norm is not None:
                stats["grad_norm"] = grad_norm
            stats["rankme"] = effective_rank(target_h)
        return StepOutput(loss.detach(), stats, sched, skipped=1.0 - finite)

    def _agree(self, loss: torch.Tensor, stop: int) -> torch.Tensor:
        """``[finite, -stop level]`` reduced with MIN over processes: the loss is finite
        everywhere, and the highest stop level asked for. Stays on the device."""
        finite = torch.isfinite(loss.detach()).all().to(torch.float32)
        flags = torch.stack([finite, torch.full_like(finite, -float(stop))])
        if D.world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        return flags

    def poll(self, upto: Optional[int] = None) -> list[tuple[int, int]]:
        """Read the flags of the steps ``<= upto`` (all when None): returns ``(step, skips in
        a row)`` for the steps that were skipped, raises :attr:`stop_level` to the level
        agreed, and raises FloatingPointError after ``nonfinite_patience`` consecutive
        skips. Every process reads the same reduced flags at the same step, so all of them
        stop together."""
        skipped = []
        for step, (finite, neg_stop) in self.flags.ready(upto):
            if finite < 0.5:
                self.nonfinite_run += 1
                skipped.append((step, self.nonfinite_run))
                if self.nonfinite_run >= self.nonfinite_patience:
                    raise FloatingPointError(f"{self.nonfinite_run} consecutive non-finite "
                                             f"losses (last at step {step}); stopping")
            else:
                self.nonfinite_run = 0
            self.stop_level = max(self.stop_level, round(-neg_stop))
        return skipped

    def _clip(self) -> torch.Tensor:
        """Clip the (already averaged) gradients to ``clip_grad`` on the device; returns the
        norm before clipping (DeepSpeed's rule: ``min(1, clip / (norm + 1e-6))``)."""
        grads = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(grads, self.clip_grad, foreach=True).detach()

    def _grad_norm_stage0(self) -> Optional[torch.Tensor]:
        """DeepSpeed reports the norm only from its ZeRO / mixed-precision optimisers."""
        if self.engine.zero_optimization_stage() != 0 or self.dtype != torch.float32:
            return None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).detach()

    def _grad_norm_engine(self) -> Optional[torch.Tensor]:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return torch.as_tensor(norm, dtype=torch.float32).detach().to(self.device)

    @property
    def sharded(self) -> bool:
        return isinstance(self.ema, ShardedEMA)

    def save(self, folder: str, step: int, config_yaml: str, keep_last: int) -> str:
        """Checkpoint ``global_step{step}`` in ``folder`` (every process; atomic:
        :func:`.io.checkpoint.save_training_checkpoint`); returns its path."""
        return save_training_checkpoint(self.engine, folder, step,
                                        self.client_state(step, config_yaml),
                                        keep_last=keep_last, rank_state=self.rank_state())

    def resume(self, plan: ResumePlan) -> int:
        """Restore the engine, the target and the RNG from ``plan``; returns the global step
        to continue from. Raises :class:`.io.safe_load.CheckpointError`."""
        state, rank_states = load_training_checkpoint(self.engine, plan)
        return self.load_client_state(state, rank_states)

    def client_state(self, step: int, config_yaml: str) -> dict[str, Any]:
        """What a resume needs beside DeepSpeed's own state: position, RNG and the fp32
        target (here when whole; per process in :meth:`rank_state` when sharded). Called on
        every process (gathering the target's partitions is collective)."""
        spe = self.schedules.steps_per_epoch
        state = {"step": step, "epoch": step // spe, "batch_in_epoch": step % spe,
                 "world_size": D.world_size(), "config": config_yaml,
                 "rng_torch": torch.get_rng_state()}
        if not self.sharded:
            state["target_encoder"] = self.ema.state_dict()
        return state

    def rank_state(self) -> Optional[dict[str, Any]]:
        return self.ema.state_dict() if self.sharded else None

    def load_client_state(self, state: dict[str, Any], rank_states: list[dict]) -> int:
        """Restore the target encoder and the RNG; returns the global step to continue from.
        ``rank_states``: this process's saved slices, or every process's when the world size
        changed (then re-sliced)."""
        if not self.sharded:
            self.ema.load_state_dict(state["target_encoder"])
        elif len(rank_states) == 1 and D.world_size() == state["world_size"]:
            self.ema.load_state_dict(rank_states[0])
        else:
            from .ema import assemble_slices

            self.ema.load_full(assemble_slices(rank_states))
        torch.set_rng_state(state["rng_torch"])
        return state["step"]
