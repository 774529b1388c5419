"""What the training step runs on: the models (anchor + prototypes, and the target), their
parameter groups and optimiser, the DeepSpeed engine, the target's engine and EMA, and the
precision. The order they are made in is :func:`.trainer.build`'s."""
from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn as nn

from .config import ConfigError
from .deepspeed_config import zero_stage
from .ema import PartitionedEMA, PlainEMA, ShardedEMA, make_target
from .models import MSNEncoder, MSNModel

log = logging.getLogger("msn_ds")

def build_models(cfg: dict, resuming: bool = False) -> tuple[MSNModel, MSNEncoder]:
    """Anchor encoder + prototypes (trained), and the target encoder (EMA, fp32). The heads'
    BatchNorm layers are global across processes by construction (``models.norm``).
    ``resuming``: ``meta.init_weights`` is not read (the checkpoint's weights win), and the
    log says so."""
    meta, crit, data = cfg["meta"], cfg["criterion"], cfg["data"]
    torch.manual_seed(meta["seed"])
    encoder = MSNEncoder(meta["model_name"], img_size=data["rand_size"],
                         hidden_dim=meta["hidden_dim"], output_dim=meta["output_dim"],
                         use_bn=meta["use_bn"], drop_path_rate=meta["drop_path_rate"],
                         checkpoint_every=meta["activation_checkpointing"])
    init = None
    if meta["init_weights"] and resuming:
        log.info("meta.init_weights=%s ignored: this run resumes, and the checkpoint's "
                 "weights win", meta["init_weights"])
    elif meta["init_weights"]:
        init = init_encoder_(encoder, meta["init_weights"], strict=meta["init_strict"])
    model = MSNModel(encoder, crit["num_proto"], meta["output_dim"],
                     freeze_proto=crit["freeze_proto"])
    if init is not None and fit_prototypes(init, tuple(model.prototypes.weight.shape),
                                           meta["init_weights"], meta["init_strict"]):
        with torch.no_grad():
            model.prototypes.weight.copy_(init.prototypes)
    target = make_target(encoder)
    if meta["compile"]:
        compile_blocks(encoder, meta["compile"])
        compile_blocks(target, meta["compile"])
    return model, target


def init_encoder_(encoder: MSNEncoder, path: str, assign: bool = False, strict: bool = True,
                  quiet: bool = False):
    """Start ``encoder`` from ``path`` (``meta.init_weights``): an msn_ds weights file, a timm
    or DINOv2 ViT state dict, or a Hugging Face ViTModel/ViTMSNModel folder or file, the
    format told from the keys (:mod:`.io.foreign`) and logged. The backbone always, its
    position embedding resampled to this run's grid; the head only from our own file with a
    trained head (metadata ``head`` not ``absent``), else it keeps this run's
    initialisation. The patch size, width and depth must be this run's. Keys missing from the
    file or unknown to the ViT are listed, an error with ``strict`` (else a warning, the
    missing ones keep their initialisation). Returns the file's
    :class:`~.io.foreign.InitWeights` (its prototypes: :func:`fit_prototypes`). Raises
    :class:`ConfigError` naming the file and the problem."""
    from .io.foreign import MSN_DS, ForeignWeightsError, listing, read_init_weights, vit_shape
    from .models.vit import resample_pos_embed

    where = f"meta.init_weights: {path}"
    try:
        w = read_init_weights(path)
    except ForeignWeightsError as e:
        raise ConfigError(f"meta.init_weights: {e}") from None
    spec = encoder.spec
    own = encoder.backbone.state_dict()
    ours = (spec.patch_size, spec.embed_dim, spec.depth)
    theirs = vit_shape(w.backbone)
    if theirs is not None and theirs != ours:
        held = w.arch if w.format == MSN_DS else f"a {w.format} ViT"
        raise ConfigError(
            f"{where}: the file holds {held}: patch {theirs[0]}, width "
            f"{theirs[1]}, depth {theirs[2]} (patch_embed.proj.weight "
            f"{list(w.backbone['patch_embed.proj.weight'].shape)}); this run builds "
            f"{spec.name}: patch {ours[0]}, width {ours[1]}, depth {ours[2]} "
            f"(patch_embed.proj.weight {list(own['patch_embed.proj.weight'].shape)}); "
            "meta.model_name must match the file")
    if w.format == MSN_DS and w.arch != spec.name:
        raise ConfigError(f"{where} holds {w.arch}, this run builds {spec.name}")
    if w.heads is not None and w.heads != spec.num_heads:
        raise ConfigError(f"{where}: config.json has {w.heads} attention heads, this run's "
                          f"{spec.name} has {spec.num_heads}")
    backbone = dict(w.backbone)
    pos, want = backbone.get("pos_embed"), own["pos_embed"].shape
    if (pos is not None and pos.ndim == 3 and pos.shape[-1] == want[-1]
            and pos.shape[1] != want[1] and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1):
        side = math.isqrt(want[1] - 1)
        backbone["pos_embed"] = resample_pos_embed(pos, (side, side))
    wrong = [f"{k} {list(v.shape)} in the file, {list(own[k].shape)} in this run"
             for k, v in backbone.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ConfigError(f"{where}: does not fit this run's {spec.name}: {'; '.join(wrong[:4])}")
    missing = [k for k in own if k not in backbone]
    unexpected = [k for k in backbone if k not in own] + w.unexpected
    if missing or unexpected:
        found = "; ".join(f"{what} {listing(keys)}" for what, keys in
                          (("missing from the file:", missing), ("unexpected:", unexpected))
                          if keys)
        if strict:
            raise ConfigError(f"{where} ({w.format}) does not match this run's {spec.name}: "
                              f"{found} (meta.init_strict=false loads the rest; missing "
                              "tensors keep this run's initialisation)")
        if not quiet:
            log.warning("%s (%s), meta.init_strict=false: %s", where, w.format, found)
    try:
        encoder.backbone.load_state_dict({k: v for k, v in backbone.items() if k in own},
                                         strict=False, assign=assign)
        if w.head is not None:
            encoder.head.load_state_dict(w.head, strict=True, assign=assign)
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n")[1:]).strip()
        raise ConfigError(f"{where} does not fit this run's ProjectionHead: {detail} "
                          "(meta.hidden_dim/output_dim/use_bn must match the file)") from None
    if not quiet:
        fresh = [name for name, got in (("head", w.head), ("prototypes", w.prototypes))
                 if got is None]
        log.info("meta.init_weights: %s is %s weights (detected from its keys): backbone "
                 "loaded%s%s%s", path,
                 "msn_ds's own" if w.format == MSN_DS else f"a {w.format} ViT's",
                 "" if pos is None or pos.shape == want else
                 f", position embedding resampled from {list(pos.shape)} to {list(want)}",
                 f"; {' and '.join(fresh)} start fresh" if fresh else
                 "; head and prototypes from the file",
                 f"; dropped (not the backbone's): {listing(w.dropped)}" if w.dropped else "")
        for note in w.notes:
            log.info("meta.init_weights: %s", note)
    return w


def fit_prototypes(init, shape: tuple[int, int], path: str, strict: bool) -> bool:
    """Whether the file's prototypes (our own file with a trained head) go into this run's
    ``shape`` (``[criterion.num_proto, meta.output_dim]``); one of another shape is an error,
    or with ``strict`` false a warning, the prototypes then starting fresh."""
    if init.prototypes is None:
        return False
    if tuple(init.prototypes.shape) == tuple(shape):
        return True
    problem = (f"meta.init_weights: {path}: its prototypes are {list(init.prototypes.shape)}, "
               f"this run's {list(shape)} (criterion.num_proto x meta.output_dim)")
    if strict:
        raise ConfigError(problem + "; meta.init_strict=false starts them fresh")
    log.warning("%s: they start fresh (meta.init_strict=false)", problem)
    return False


def check_init_weights(cfg: dict) -> None:
    """``meta.init_weights`` checked before any work: the file loads into this run's encoder
    (built on the ``meta`` device, so nothing is computed or allocated)."""
    if cfg["meta"]["init_weights"]:
        meta, data, crit = cfg["meta"], cfg["data"], cfg["criterion"]
        with torch.device("meta"):
            encoder = MSNEncoder(meta["model_name"], img_size=data["rand_size"],
                                 hidden_dim=meta["hidden_dim"], output_dim=meta["output_dim"],
                                 use_bn=meta["use_bn"])
        init = init_encoder_(encoder, meta["init_weights"], assign=True,
                             strict=meta["init_strict"], quiet=True)
        if meta["init_strict"]:  # else build_models warns, once
            fit_prototypes(init, (crit["num_proto"], meta["output_dim"]), meta["init_weights"],
                           strict=True)


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


def init_target(target: nn.Module, engine, ds_config: dict, target_dtype: str = "model"):
    """The target encoder and its EMA, following the fp32 master weights (see :mod:`.ema`)
    and computing in the engine's dtype at every stage (``target_dtype="model"``), or in
    fp32 from fp32 weights (``"fp32"``, ``meta.target_dtype``; the same as "model" under an
    fp32 engine).

    Under ZeRO-3 the target becomes a second engine partitioned exactly like the anchor (no
    optimiser; persistence threshold 0 so that every parameter is sliced; without the
    JSON's bf16/fp16 section for an fp32 target). Its ``overlap_comm`` is forced off: the
    EMA writes its slices on the compute stream, and an all-gather on DeepSpeed's side
    stream could read them before the writes land."""
    if target_dtype not in ("model", "fp32"):
        raise ValueError(f"target_dtype must be 'model' or 'fp32', got {target_dtype!r}")
    if zero_stage(ds_config) == 3:
        import deepspeed

        cfg = copy.deepcopy(ds_config)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        cfg["zero_optimization"]["overlap_comm"] = False
        if target_dtype == "fp32":
            for key in ("bf16", "bfloat16", "fp16"):
                cfg.pop(key, None)
        target_engine, *_ = deepspeed.initialize(model=target, config=cfg)
        return target_engine, ShardedEMA(target_engine.module, engine.module.encoder)
    dtype = next(engine.module.parameters()).dtype
    target.to(engine.device)
    if dtype == torch.float32:
        return target, PlainEMA(target, engine.module.encoder)
    if target_dtype == "model":
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
