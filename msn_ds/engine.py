"""What the training step runs on: the models (anchor + prototypes, and the target), their
parameter groups and optimiser, the DeepSpeed engine, the target's engine and EMA, and the
precision. The order they are made in is :func:`.trainer.build`'s."""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from .config import ConfigError
from .deepspeed_config import zero_stage
from .ema import PartitionedEMA, PlainEMA, ShardedEMA, make_target
from .models import MSNEncoder, MSNModel


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
    from .io.weights import HEAD_PREFIX, TARGET_PREFIX, has_trained_head, read_weights
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
    if has_trained_head(meta):
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
    norm_stats_fp32_(target)
    return target, PartitionedEMA(target, engine.module.encoder, engine.optimizer)


def configure_precision(device: torch.device) -> None:
    """TF32 tensor cores for fp32 matrix products on CUDA (fp32 runs; bf16 runs are
    unaffected). cuDNN convolutions already default to TF32."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")


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
    norm_stats_fp32_(engine.module)
    return engine


def norm_stats_fp32_(module: nn.Module) -> None:
    """BatchNorm running statistics back to fp32 after a cast of the whole module (DeepSpeed
    casts its module to bf16/fp16 at ZeRO-0/1/2, and so does :func:`init_target`): a bf16
    running variance would round every update of momentum 0.1 (``models.norm`` computes in
    fp32 and writes into the buffers' dtype). Done right after the cast, while the
    statistics still hold their exact initial 0/1; a checkpoint loads into fp32 buffers."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                b = getattr(m, name)
                if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                    setattr(m, name, b.float())
