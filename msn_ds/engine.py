"""DeepSpeed engine, parameter groups, precision and the MSN training step.

One engine holds what the optimiser trains (anchor encoder + prototypes, ``MSNModel``); the
target encoder sits beside it, an EMA of the fp32 master weights computing in the engine's
dtype (:mod:`.ema`). The step reads top to bottom:
schedules -> target forward -> masked anchor forward -> loss -> backward/step -> EMA.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from . import distributed as D
from .config import ConfigError
from .ema import PartitionedEMA, PlainEMA, ShardedEMA, make_target
from .loss import MSNLoss
from .masking import mask_generator
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
    if meta["init_weights"]:
        init_encoder_(encoder, meta["init_weights"])
    model = MSNModel(encoder, crit["num_proto"], meta["output_dim"],
                     freeze_proto=crit["freeze_proto"])
    target = make_target(encoder)
    if meta["compile"]:
        compile_blocks(encoder, meta["compile"])
        compile_blocks(target, meta["compile"])
    return model, target


def init_encoder_(encoder: MSNEncoder, path: str, assign: bool = False) -> None:
    """Start from a weights file's target encoder (ours, or one made by
    ``scripts/import_hf.py``/``import_msn.py``): the backbone always, its position embedding
    resampled to this run's grid; the head when the file has a trained one
    (metadata ``head`` is not ``absent``). The target then starts as a copy."""
    from .checkpoint import HEAD_PREFIX, TARGET_PREFIX, read_weights
    from .models.vit import resample_pos_embed

    try:
        tensors, meta = read_weights(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"meta.init_weights: {e}") from None
    if meta["arch"] != encoder.spec.name:
        raise ConfigError(f"meta.init_weights: {path} holds {meta['arch']}, this run builds "
                          f"{encoder.spec.name}")
    backbone = {k[len(TARGET_PREFIX):]: v for k, v in tensors.items() if k.startswith(TARGET_PREFIX)}
    if "pos_embed" in backbone:
        side = math.isqrt(encoder.backbone.pos_embed.shape[1] - 1)
        backbone["pos_embed"] = resample_pos_embed(backbone["pos_embed"], (side, side))
    parts = [(encoder.backbone, backbone)]
    if meta.get("head", "present") != "absent":
        parts.append((encoder.head, {k[len(HEAD_PREFIX):]: v for k, v in tensors.items()
                                     if k.startswith(HEAD_PREFIX)}))
    for module, state in parts:
        try:
            module.load_state_dict(state, strict=True, assign=assign)
        except RuntimeError as e:
            detail = " ".join(str(e).split("\n")[1:]).strip()
            raise ConfigError(f"meta.init_weights: {path} does not fit this run's "
                              f"{type(module).__name__}: {detail} "
                              "(meta.hidden_dim/output_dim/use_bn must match the file)") from None


def check_init_weights(cfg: dict) -> None:
    """``meta.init_weights`` checked before any work: the file loads into this run's encoder
    (built on the ``meta`` device, so nothing is computed or allocated)."""
    if cfg["meta"]["init_weights"]:
        meta, data = cfg["meta"], cfg["data"]
        with torch.device("meta"):
            encoder = MSNEncoder(meta["model_name"], img_size=data["rand_size"],
                                 hidden_dim=meta["hidden_dim"], output_dim=meta["output_dim"],
                                 use_bn=meta["use_bn"])
        init_encoder_(encoder, meta["init_weights"], assign=True)


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
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: must be a JSON object of DeepSpeed sections, got a "
                          f"{type(ds).__name__}")
    return ds


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
    check_ds_config(ds, source)
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{source}: remove 'optimizer'/'scheduler': msn_ds builds AdamW with "
                          "the method's parameter groups and schedules them per step")
    if cfg["meta"]["compile"] and zero_stage(ds) == 3:
        raise ConfigError(f"{source}: meta.compile={cfg['meta']['compile']!r} with ZeRO-3: "
                          "its parameter-gathering hooks break the compiled graphs; use "
                          "ZeRO-1/2 or meta.compile=''")
    if ds.get("fp16", {}).get("enabled") and D.accelerator_name() != "cuda":
        raise ConfigError(f"{source}: fp16 needs a GPU (DeepSpeed's CPU accelerator rejects it);"
                          " use a bf16 or fp32 config")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def check_ds_config(ds: dict, source: str) -> None:
    """What DeepSpeed would reject after the engine starts, refused now: its own validation
    (ZeRO stage, unknown keys inside a section), plus unknown top-level keys, which it
    silently ignores (a typo such as ``zero_optimisation`` would drop ZeRO altogether)."""
    import difflib

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger
    from pydantic import ValidationError

    known = deepspeed_keys()
    for key in ds:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown DeepSpeed key {key!r}{hint}")
    probe = {k: v for k, v in ds.items() if k != "train_batch_size"}  # world size unknown yet
    quiet = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # its parser logs the world size it guessed
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        err = e.errors()[0]
        section = _DS_SECTIONS.get(e.title, e.title)
        where = ".".join(str(x) for x in (section, *err["loc"]))
        raise ConfigError(f"{source}: {where}: {err['msg']}"
                          + (f" (got {err['input']!r})" if "input" in err
                             and not isinstance(err["input"], dict) else "")) from None
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{source}: DeepSpeed rejects it: {type(e).__name__}: {e}") from None
    finally:
        ds_logger.setLevel(quiet)


_DS_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                "DeepSpeedFP16Config": "fp16", "DeepSpeedZeroOffloadParamConfig":
                "zero_optimization.offload_param", "DeepSpeedZeroOffloadOptimizerConfig":
                "zero_optimization.offload_optimizer"}


@functools.lru_cache(maxsize=1)
def deepspeed_keys() -> frozenset[str]:
    """The top-level keys this DeepSpeed knows: those its config parser reads (recorded on an
    empty config) and the key names in its config and constants modules."""
    import ast
    import pathlib

    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recorder(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __copy__(self):
            return self

    try:
        DeepSpeedConfig(Recorder(train_micro_batch_size_per_gpu=1))
    except Exception:  # the recorded keys are what matters
        pass
    root = pathlib.Path(deepspeed.__file__).parent
    for path in root.rglob("*.py"):
        if "constants" in path.name or "config" in path.name:
            try:
                tree = ast.parse(path.read_text())
            except (SyntaxError, UnicodeDecodeError):
                continue
            seen.update(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                        and isinstance(n.value, str) and n.value.isidentifier()
                        and n.value.islower())
    return frozenset(seen)


@dataclass
class StepOutput:
    """What a step hands out: tensors on the step's device (``skipped``: 1.0 if the update
    and the EMA were skipped for a non-finite loss), the schedules' values as floats."""
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    sched: dict[str, float]
    skipped: torch.Tensor


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def init_target(target: nn.Module, engine, ds_config: dict):
    """The target encoder and its EMA, computing in the engine's dtype at every stage and
    following the fp32 master weights (see :mod:`.ema`).

    Under ZeRO-3 the target becomes a second engine partitioned exactly like the anchor (no
    optimiser; persistence threshold 0 so that every parameter is sliced). Its
    ``overlap_comm`` is forced off: the EMA writes its slices on the compute stream, and an
    all-gather on DeepSpeed's side stream could read them before the writes land."""
    if zero_stage(ds_config) == 3:
        import deepspeed

        cfg = copy.deepcopy(ds_config)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        cfg["zero_optimization"]["overlap_comm"] = False
        target_engine, *_ = deepspeed.initialize(model=target, config=cfg)
        return target_engine, ShardedEMA(target_engine.module, engine.module.encoder)
    dtype = next(engine.module.parameters()).dtype
    target.to(engine.device)
    if dtype == torch.float32:
        return target, PlainEMA(target, engine.module.encoder)
    target.to(dtype)
    return target, PartitionedEMA(target, engine.module.encoder, engine.optimizer)


def configure_precision(device: torch.device) -> None:
    """TF32 tensor cores for fp32 matrix products on CUDA (fp32 runs; bf16 runs are
    unaffected). cuDNN convolutions already default to TF32."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")


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

    def __init__(self, engine, target, ema, criterion: MSNLoss, schedules: Schedules,
                 cfg: dict):
        self.engine = engine
        self.target = target
        self.ema = ema
        self.criterion = criterion
        self.schedules = schedules
        self.mask_ratio = cfg["data"]["patch_drop"]
        self.masked_views = cfg["data"]["rand_views"]
        self.per_sample_mask = cfg["criterion"]["per_sample_mask"]
        self.seed = cfg["meta"]["seed"]
        self.nonfinite_patience = cfg["meta"]["nonfinite_patience"]
        self.nonfinite_run = 0
        self.stop_agreed = False
        self.device = torch.device(engine.device)
        self.flags = HostFlags(self.device)
        self.optimizer = getattr(engine, "basic_optimizer", None) or engine.optimizer
        self.gated = bool(getattr(self.optimizer, "defaults", {}).get("fused"))
        self.target_dtype = next(self.target.parameters()).dtype

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
             stop: bool = False) -> StepOutput:
        """One update. ``log``: a logging step, where the gradient norm is read (the one
        place a host sync is allowed). ``stop``: this process wants to stop (a signal)."""
        sched = self.schedules.at(step)
        self.set_hparams(sched["lr"], sched["wd"])
        views = [v.to(self.device, non_blocking=True) for v in views]

        with torch.no_grad():
            target_z = self.target(views[0].to(self.target_dtype))
        anchor_z, prototypes = self.engine([v.to(self.dtype) for v in views[1:]],
                                           masked_views=self.masked_views,
                                           mask_ratio=self.mask_ratio,
                                           per_sample_mask=self.per_sample_mask,
                                           generator=mask_generator(self.seed, step))
        loss, stats = self.criterion(anchor_z, target_z, prototypes, sched["T"])
        flags = self._agree(loss, stop)
        finite = flags[0]
        self.flags.push(step, flags)

        if self.gated:
            self.engine.backward(loss)
            grad_norm = self._grad_norm_stage0() if log else None
            self.optimizer.found_inf = 1.0 - finite  # fused AdamW skips on the device
            self.engine.step()
            self.ema.update(sched["momentum"], gate=finite)
        elif bool(finite.item()):  # host-side optimiser: it waits for the host anyway
            self.engine.backward(loss)
            grad_norm = self._grad_norm_stage0() if log else None
            self.engine.step()
            self.ema.update(sched["momentum"])
        else:
            grad_norm = None
        if log:
            grad_norm = grad_norm if grad_norm is not None else self._grad_norm_engine()
            if grad_norm is not None:
                stats["grad_norm"] = grad_norm
        return StepOutput(loss.detach(), stats, sched, skipped=1.0 - finite)

    def _agree(self, loss: torch.Tensor, stop: bool) -> torch.Tensor:
        """``[finite, -stop]`` reduced with MIN over processes: the loss is finite
        everywhere, and some process asked to stop. Stays on the device."""
        finite = torch.isfinite(loss.detach()).all().to(torch.float32)
        flags = torch.stack([finite, torch.full_like(finite, -1.0 if stop else 0.0)])
        if D.world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        return flags

    def poll(self, upto: Optional[int] = None) -> list[tuple[int, int]]:
        """Read the flags of the steps ``<= upto`` (all when None): returns ``(step, skips in
        a row)`` for the steps that were skipped, sets :attr:`stop_agreed`, and raises FloatingPointError after
        ``nonfinite_patience`` consecutive skips. Every process reads the same reduced
        flags at the same step, so all of them stop together."""
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
            self.stop_agreed = self.stop_agreed or neg_stop < -0.5
        return skipped

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


def build_optimizer(groups: list[dict[str, Any]], ds_config: dict) -> torch.optim.Optimizer:
    """AdamW with the method's groups: DeepSpeedCPUAdam when the optimiser state is offloaded
    to the CPU (what ZeRO-Offload needs), torch's fused AdamW on CUDA, plain AdamW otherwise.
    (apex's kernels are not on the package registries; torch's fused AdamW does the same.)"""
    kw = dict(lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {})
    if offload.get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    # fused: one kernel per step on CUDA (and the CPU), and the device-side skip of a
    # non-finite step through ``found_inf`` (MSNTrainer.step)
    return torch.optim.AdamW(groups, fused=True, **kw)


def init_deepspeed(model: MSNModel, ds_config: dict):
    """Build the DeepSpeed engine with our optimiser and parameter groups."""
    import deepspeed

    optimizer = build_optimizer(param_groups(model), ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
