"""The paper's five models as configs: each loads, builds (on the ``meta`` device, no memory),
has the paper's values and parameter count, and agrees with its comments, its DeepSpeed
config and the table in configs/README.md."""
import math
import re
from pathlib import Path

import pytest
import torch

from msn_ds.config import ConfigError, load_config
from msn_ds.deepspeed_config import read_ds_config, resolve_ds_config
from msn_ds.models import MSNEncoder
from msn_ds.monitor.flops import StepShape, vit_forward_flops

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 1024  # the paper's, for every model

# config -> (arch, mask ratio, epochs, the paper's nominal encoder size) (docs/method.md section 1)
PAPER = {
    "msn_vits16.yaml": ("vit_small_16", 0.15, 800, 22e6),
    "msn_vitb16.yaml": ("vit_base_16", 0.3, 600, 86e6),
    "msn_vitl16.yaml": ("vit_large_16", 0.5, 600, 304e6),
    "msn_vitb4.yaml": ("vit_base_4", 0.7, 300, 86e6),
    "msn_vitl7.yaml": ("vit_large_7", 0.7, 200, 304e6),
}
LABEL = {"msn_vits16.yaml": "ViT-S/16", "msn_vitb16.yaml": "ViT-B/16",
         "msn_vitl16.yaml": "ViT-L/16", "msn_vitb4.yaml": "ViT-B/4", "msn_vitl7.yaml": "ViT-L/7"}


def _path(name: str) -> Path:
    return ROOT / "configs" / "pretrain" / name


def vit_params(d: int, depth: int, patch: int, tokens: int) -> int:
    """A timm ViT with qkv bias and MLP ratio 4, counted by hand: patch conv, class token,
    position embedding, per block 2 LayerNorms + qkv + proj + 2 MLP layers, final LayerNorm."""
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return (3 * patch * patch * d + d) + d + tokens * d + depth * block + 2 * d


def build(name: str):
    cfg = load_config(str(_path(name)), check_paths=False)
    with torch.device("meta"):
        enc = MSNEncoder(cfg["meta"]["model_name"], img_size=cfg["data"]["rand_size"],
                         hidden_dim=cfg["meta"]["hidden_dim"], output_dim=cfg["meta"]["output_dim"],
                         use_bn=cfg["meta"]["use_bn"])
    return cfg, enc


def split(name: str, cfg: dict) -> tuple[int, int]:
    """``(GPUs, per GPU)`` as the config's comments state the global batch."""
    text = _path(name).read_text()
    m = re.search(r"(?:Global batch|global batch)[^\n]*?(\d+)\s*=\s*(\d+) GPUs x (\d+)", text)
    assert m, f"{name}: no 'global batch 1024 = N GPUs x b' comment"
    total, gpus, per_gpu = map(int, m.groups())
    assert total == gpus * per_gpu == GLOBAL_BATCH, f"{name}: {m.group(0)}"
    assert per_gpu == cfg["criterion"]["batch_size"], f"{name}: comment says {per_gpu} per GPU"
    return gpus, per_gpu


@pytest.mark.parametrize("name", list(PAPER))
def test_config_has_the_papers_values_and_size(name):
    arch, mask, epochs, nominal = PAPER[name]
    cfg, enc = build(name)
    assert enc.spec.name == arch
    assert cfg["data"]["patch_drop"] == mask and cfg["optimization"]["epochs"] == epochs
    # the recipe the paper shares across models (the reference's ViT-S/16 values)
    shared = {("optimization", "lr"): 1e-3, ("optimization", "start_lr"): 2e-4,
              ("optimization", "final_lr"): 1e-6, ("optimization", "warmup"): 15,
              ("optimization", "weight_decay"): 0.04,
              ("optimization", "final_weight_decay"): 0.4,
              ("optimization", "start_momentum"): 0.996, ("optimization", "final_momentum"): 1.0,
              ("criterion", "num_proto"): 1024, ("criterion", "temperature"): 0.1,
              ("data", "rand_views"): 1, ("data", "focal_views"): 10,
              ("data", "rand_size"): 224, ("data", "focal_size"): 96,
              ("meta", "drop_path_rate"): 0.0}
    for (section, key), want in shared.items():
        assert cfg[section][key] == want, f"{name}: {section}.{key}"
    s = enc.spec
    tokens = (224 // s.patch_size) ** 2 + 1
    n = sum(p.numel() for p in enc.backbone.parameters())
    assert all(p.device.type == "meta" for p in enc.parameters())
    assert n == vit_params(s.embed_dim, s.depth, s.patch_size, tokens)
    assert abs(n - nominal) / nominal < 0.02, f"{name}: {n / 1e6:.1f} M vs {nominal / 1e6:.0f} M"
    # a masked 224 view and a focal view run through the blocks (on meta: shapes only)
    with torch.no_grad():
        masked = enc.tokens(torch.empty(2, 3, 224, 224, device="meta"), mask_ratio=mask)
        focal = enc.tokens(torch.empty(2, 3, 96, 96, device="meta"))
    assert masked.shape == (2, math.floor((tokens - 1) * (1 - mask)) + 1, s.embed_dim)
    assert focal.shape[1] == (96 // s.patch_size) ** 2 + 1


def test_vit_l7_is_304m():
    _, enc = build("msn_vitl7.yaml")
    n = sum(p.numel() for p in enc.backbone.parameters())
    assert 303e6 < n < 305e6, n


@pytest.mark.parametrize("name", list(PAPER))
def test_global_batch_and_deepspeed_config(name):
    """The comments' GPU split gives 1024, and the named DeepSpeed config accepts the YAML at
    that world size (DeepSpeed's own parser)."""
    cfg, _ = build(name)
    gpus, _ = split(name, cfg)
    m = re.search(r"DeepSpeed: (ds_configs/\S+?\.json)", _path(name).read_text())
    assert m, f"{name}: names no DeepSpeed config"
    ds = resolve_ds_config(read_ds_config(str(ROOT / m.group(1))), cfg, gpus, m.group(1))
    assert ds["train_batch_size"] == GLOBAL_BATCH
    assert ds["bf16"]["enabled"], "bf16: the default mixed precision (docs/method.md section 4)"
    if name in ("msn_vitb4.yaml", "msn_vitl7.yaml"):
        k = cfg["meta"]["activation_checkpointing"]
        text = _path(name).read_text()
        assert k >= 1 and f"activation checkpointing every {k} blocks" in text
        assert f"ZeRO stage {ds['zero_optimization']['stage']}" in text


def readme_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ROOT / "configs" / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[1].startswith("`pretrain/"):
            rows[cells[1].strip("`").split("/")[1]] = cells
    return rows


def test_readme_table_is_recomputed():
    """configs/README.md's table equals what the configs, the models and flops.py give."""
    rows = readme_rows()
    assert set(rows) == set(PAPER)
    for name, cells in rows.items():
        cfg, enc = build(name)
        s, mask = enc.spec, cfg["data"]["patch_drop"]
        n224, n96 = (224 // s.patch_size) ** 2, (96 // s.patch_size) ** 2
        gpus, per_gpu = split(name, cfg)
        ds = re.search(r"DeepSpeed: ds_configs/(\S+?\.json)", _path(name).read_text()).group(1)
        k = cfg["meta"]["activation_checkpointing"]
        want = [LABEL[name], f"`pretrain/{name}`", f"{n224 + 1} / {n96 + 1}",
                str(math.floor(n224 * (1 - mask)) + 1),
                f"{sum(p.numel() for p in enc.backbone.parameters()) / 1e6:.1f} M",
                f"{vit_forward_flops(s, 224) / 1e9:.1f}",
                f"{StepShape.from_config(cfg).flops_per_image() / 1e9:.1f}",
                f"{mask:g}", str(cfg["optimization"]["epochs"]), f"{gpus} x {per_gpu}",
                *(on_gpus(name, g) for g in (8, 64)),
                f"`{ds}`", f"every {k} blocks" if k else "off", "not yet"]
        assert cells == want, name


def on_gpus(name: str, gpus: int) -> str:
    """The table's "on N GPUs" cell, from what resolve_ds_config makes of the config there
    (the per-GPU batch lowered to fit 1024 where it must, as the cell says)."""
    cfg, _ = build(name)
    path = re.search(r"DeepSpeed: (ds_configs/\S+?\.json)", _path(name).read_text()).group(1)
    per = cfg["criterion"]["batch_size"]
    note = ""
    if cfg["criterion"]["global_batch_size"] is None:  # the reference's form
        if gpus == 8:
            cfg["criterion"]["global_batch_size"] = GLOBAL_BATCH
            ds = resolve_ds_config(read_ds_config(str(ROOT / path)), cfg, gpus, path)
            return (f"{gpus} x {per} = {gpus * per} (`criterion.global_batch_size=1024`: "
                    f"{gpus} x {per} x {ds['gradient_accumulation_steps']})")
        cfg["criterion"]["global_batch_size"] = GLOBAL_BATCH
    if per * gpus > GLOBAL_BATCH:
        per = GLOBAL_BATCH // gpus
        cfg["criterion"]["batch_size"], note = per, f" (`criterion.batch_size={per}`)"
    with pytest.raises(ConfigError, match="is not a multiple"):
        resolve_ds_config(read_ds_config(str(ROOT / path)), cfg, gpus * 3, path)
    ds = resolve_ds_config(read_ds_config(str(ROOT / path)), cfg, gpus, path)
    a = ds["gradient_accumulation_steps"]
    assert ds["train_batch_size"] == GLOBAL_BATCH == gpus * per * a
    if gpus == 8:
        return f"{gpus} x {per} x {a}{note}"
    return f"{gpus} x {per}" + (f" x {a}" if a > 1 else "") + note
