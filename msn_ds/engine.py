"""DeepSpeed engine, parameter groups, precision and the MSN training step.

One engine holds what the optimiser trains (anchor encoder + prototypes, ``MSNModel``); the
target encoder sits beside it as an fp32 EMA copy. The step reads top to bottom:
schedules -> target forward -> masked anchor forward -> loss -> backward/step -> EMA.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from . import distributed as D
from .config import ConfigError
from .data.sampler import seed_for
from .ema import PlainEMA, ShardedEMA, make_target
from .loss import MSNLoss
from .models import MSNEncoder, MSNModel
from .schedules import Schedules


def build_models(cfg: dict) -> tuple[MSNModel, MSNEncoder]:
    """Anchor encoder + prototypes (trained), and the target encoder (EMA, fp32). The heads'
    BatchNorm layers are global across processes by construction (``models.norm``)."""
    meta, crit, data = cfg["meta"], cfg["criterion"], cfg["data"]
    torch.manual_seed(meta["seed"])
    encoder = MSNEncoder(meta["model_name"], img_size=data["rand_size"],
                         hidden_dim=meta["hidden_dim"], output_dim=meta["output_dim"],
                         use_bn=meta["use_bn"], drop_path_rate=meta["drop_path_rate"],
                         checkpoint_every=meta["activation_checkpointing"])
    model = MSNModel(encoder, crit["num_proto"], meta["output_dim"],
                     freeze_proto=crit["freeze_proto"])
    target = make_target(encoder)
    if meta["compile"]:
        compile_blocks(encoder, meta["compile"])
        compile_blocks(target, meta["compile"])
    return model, target


def compile_blocks(encoder: MSNEncoder, backend: str) -> None:
    """``torch.compile`` each ViT block in place (fused LayerNorm/GELU/residual kernels under
    inductor). Blocks, not the whole encoder: the token drop, the view grouping and the
    activation checkpointing around them stay eager, and each view size compiles once."""
    for block in encoder.backbone.blocks:
        block.compile(backend=backend, dynamic=False)


def build_criterion(cfg: dict) -> MSNLoss:
    crit = cfg["criterion"]
    return MSNLoss(temperature=crit["temperature"],
                   me_max_weight=crit["memax_weight"] if crit["me_max"] else 0.0,
                   entropy_weight=crit["ent_weight"] if crit["use_ent"] else 0.0,
                   use_sinkhorn=crit["use_sinkhorn"],
                   label_smoothing=cfg["data"]["label_smoothing"],
                   sinkhorn_iters=crit["sinkhorn_iters"])


def build_schedules(cfg: dict, steps_per_epoch: int) -> Schedules:
    opt, crit = cfg["optimization"], cfg["criterion"]
    return Schedules(steps_per_epoch=steps_per_epoch, epochs=opt["epochs"],
                     warmup_epochs=opt["warmup"], start_lr=opt["start_lr"], ref_lr=opt["lr"],
                     final_lr=opt["final_lr"], start_wd=opt["weight_decay"],
                     final_wd=opt["final_weight_decay"], start_momentum=opt["start_momentum"],
                     final_momentum=opt["final_momentum"], start_sharpen=crit["start_sharpen"],
                     final_sharpen=crit["final_sharpen"], ipe_scale=opt["ipe_scale"])


def param_groups(model: MSNModel) -> list[dict[str, Any]]:
    """The reference's groups: weight decay on weights; none on biases, norm parameters,
    other 1-D parameters and the prototypes. ``wd_exclude`` marks the latter for the
    weight-decay schedule."""
    decay, no_decay = [], []
    for name, p in model.encoder.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias") or ".bn" in name or p.ndim == 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "name": "decay"},
              {"params": no_decay, "name": "no_decay", "weight_decay": 0.0, "wd_exclude": True}]
    if model.prototypes.weight.requires_grad:
        groups.append({"params": [model.prototypes.weight], "name": "prototypes", "weight_decay": 0.0,
                       "wd_exclude": True})
    return groups


def read_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None


def resolve_ds_config(ds: dict, cfg: dict, world_size: int, source: str = "<ds_config>") -> dict:
    """Make the DeepSpeed config agree with the YAML: batch size per process comes from
    ``criterion.batch_size`` and clipping from ``optimization.clip_grad``. A value the JSON
    also sets must agree; a contradiction names both."""
    ds = copy.deepcopy(ds)
    micro = cfg["criterion"]["batch_size"]
    accum = ds.get("gradient_accumulation_steps", 1)
    if accum != 1:
        raise ConfigError(f"{source}: gradient_accumulation_steps={accum}: MSN's Sinkhorn and "
                          "me-max need the whole batch in one step; raise criterion.batch_size")
    checks = {"train_micro_batch_size_per_gpu": micro,
              "train_batch_size": micro * world_size,
              "gradient_clipping": float(cfg["optimization"]["clip_grad"])}
    yaml_key = {"train_micro_batch_size_per_gpu": "criterion.batch_size",
                "train_batch_size": f"criterion.batch_size x {world_size} processes",
                "gradient_clipping": "optimization.clip_grad"}
    for key, want in checks.items():
        if key in ds and ds[key] != "auto" and float(ds[key]) != float(want):
            raise ConfigError(f"{source}: {key}={ds[key]} contradicts {yaml_key[key]}={want}")
        ds[key] = want
    ds["gradient_accumulation_steps"] = 1
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{source}: remove 'optimizer'/'scheduler': msn_ds builds AdamW with "
                          "the method's parameter groups and schedules them per step")
    if cfg["meta"]["compile"] and zero_stage(ds) == 3:
        raise ConfigError(f"{source}: meta.compile={cfg['meta']['compile']!r} with ZeRO-3: "
                          "its parameter-gathering hooks break the compiled graphs; use "
                          "ZeRO-1/2 or meta.compile=''")
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ConfigError(f"{source}: fp16 needs a GPU (DeepSpeed's CPU accelerator rejects it);"
                          " use a bf16 or fp32 config")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def mask_generator(seed: int, step: int) -> torch.Generator:
    """The token-drop permutation is a function of (seed, step): identical on every process
    and after a resume."""
    return torch.Generator().manual_seed(seed_for(seed, step, 0x6D61736B))


@dataclass
class StepOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    sched: dict[str, float]
    skipped: bool


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def init_target(target: nn.Module, engine, ds_config: dict):
    """The target encoder and its EMA. Under ZeRO-3 the target becomes a second engine
    partitioned exactly like the anchor (no optimiser; persistence threshold 0 so that every
    parameter is sliced) and the EMA runs on the slices; otherwise it is a plain fp32 copy."""
    if zero_stage(ds_config) == 3:
        import deepspeed

        cfg = copy.deepcopy(ds_config)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        target_engine, *_ = deepspeed.initialize(model=target, config=cfg)
        return target_engine, ShardedEMA(target_engine.module, engine.module.encoder)
    target.to(engine.device)
    return target, PlainEMA(target, engine.module.encoder)


class MSNTrainer:
    """Holds the engine, the target encoder and its EMA, the criterion and the schedules."""

    def __init__(self, engine, target, ema, criterion: MSNLoss, schedules: Schedules,
                 cfg: dict):
        self.engine = engine
        self.target = target
        self.ema = ema
        self.criterion = criterion
        self.schedules = schedules
        self.mask_ratio = cfg["data"]["patch_drop"]
        self.per_sample_mask = cfg["criterion"]["per_sample_mask"]
        self.seed = cfg["meta"]["seed"]
        self.nonfinite_patience = cfg["meta"]["nonfinite_patience"]
        self.nonfinite_run = 0

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

    def step(self, views: list[torch.Tensor], step: int, want_grad_norm: bool = False
             ) -> StepOutput:
        sched = self.schedules.at(step)
        self.set_hparams(sched["lr"], sched["wd"])
        device = self.engine.device
        views = [v.to(device, non_blocking=True) for v in views]

        with torch.no_grad():
            target_z = self.target(views[:1][0].to(next(self.target.parameters()).dtype))
        anchor_z, prototypes = self.engine([v.to(self.dtype) for v in views[1:]],
                                           mask_ratio=self.mask_ratio,
                                           per_sample_mask=self.per_sample_mask,
                                           generator=mask_generator(self.seed, step))
        loss, stats = self.criterion(anchor_z, target_z, prototypes, sched["T"])

        if not self._all_finite(loss):
            self.nonfinite_run += 1
            if self.nonfinite_run >= self.nonfinite_patience:
                raise FloatingPointError(f"{self.nonfinite_run} consecutive non-finite losses "
                                         f"(last at step {step}); stopping")
            return StepOutput(loss.detach(), stats, sched, skipped=True)
        self.nonfinite_run = 0

        self.engine.backward(loss)
        if want_grad_norm and self.engine.zero_optimization_stage() == 0:
            # DeepSpeed reports the norm only from its ZeRO / mixed-precision optimisers.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            stats["grad_norm"] = torch.nn.utils.get_total_norm(grads).detach()
        self.engine.step()
        if want_grad_norm and "grad_norm" not in stats and self.grad_norm() is not None:
            stats["grad_norm"] = torch.tensor(self.grad_norm())
        self.ema.update(sched["momentum"])
        return StepOutput(loss.detach(), stats, sched, skipped=False)

    @property
    def sharded(self) -> bool:
        return isinstance(self.ema, ShardedEMA)

    def client_state(self, step: int, config_yaml: str) -> dict[str, Any]:
        """What a resume needs beside DeepSpeed's own state: position, RNG and the fp32
        target (here when whole; per process in :meth:`rank_state` when sharded)."""
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

    @staticmethod
    def _all_finite(loss: torch.Tensor) -> bool:
        """Agreed across processes, so that every rank skips or steps together."""
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        if D.world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


def build_optimizer(groups: list[dict[str, Any]], ds_config: dict) -> torch.optim.Optimizer:
    """AdamW with the method's groups: DeepSpeedCPUAdam when the optimiser state is offloaded
    to the CPU (what ZeRO-Offload needs), torch's fused AdamW on CUDA, plain AdamW otherwise.
    (apex's kernels are not on the package registries; torch's fused AdamW does the same.)"""
    kw = dict(lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {})
    if offload.get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available() or None, **kw)


def init_deepspeed(model: MSNModel, ds_config: dict):
    """Build the DeepSpeed engine with our optimiser and parameter groups."""
    import deepspeed

    optimizer = build_optimizer(param_groups(model), ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
