"""Encoders: shapes for every architecture, token dropping, view grouping, position
embedding resampling as in the reference, parameter groups."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from msn_ds.models import ARCHS, REFERENCE_NAMES, MSNEncoder, MSNModel, resolve_arch
from msn_ds.models.vit import resample_pos_embed

EMBED = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280}


@pytest.mark.parametrize("arch", ARCHS + tuple(REFERENCE_NAMES))
def test_every_encoder_shape_on_meta(arch):
    """Full-size models on the meta device: shapes without memory or compute."""
    spec = resolve_arch(arch)
    with torch.device("meta"):
        enc = MSNEncoder(arch, img_size=224, hidden_dim=2048, output_dim=256)
        views = [torch.empty(2, 3, 224, 224), torch.empty(2, 3, 96, 96), torch.empty(2, 3, 96, 96)]
        h, z = enc(views, masked_views=1, mask_ratio=0.3, return_before_head=True)
    assert h.shape == (6, spec.embed_dim) and z.shape == (6, 256)
    assert spec.embed_dim == EMBED[spec.name.split("_")[1]]
    assert enc.backbone.blocks[0].attn.qkv.bias is not None
    assert enc.backbone.norm.eps == 1e-6


def test_reference_names_resolve():
    assert resolve_arch("deit_small") == resolve_arch("vit_small_16")
    assert resolve_arch("deit_large_p7").patch_size == 7
    assert resolve_arch("deit_base_p4").patch_size == 4
    with pytest.raises(ValueError, match="unknown model_name 'resnet50'"):
        resolve_arch("resnet50")


@pytest.mark.parametrize("size,patch,ratio,per_sample", [
    (224, 16, 0.15, False), (224, 16, 0.3, True), (224, 7, 0.7, False), (96, 7, 0.0, False),
    (32, 4, 0.5, True)])
def test_token_counts_after_masking(size, patch, ratio, per_sample):
    enc = MSNEncoder(f"vit_pico_{patch}", img_size=224, hidden_dim=32, output_dim=16)
    n = (size // patch) ** 2  # floor: 96 px at patch 7 is 13 x 13
    tokens = enc.tokens(torch.randn(3, 3, size, size), mask_ratio=ratio, per_sample_mask=per_sample)
    assert tokens.shape == (3, 1 + math.floor(n * (1 - ratio)), 128)


def test_mask_shared_or_per_sample():
    enc = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16).eval()
    x = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1).contiguous()  # four equal images
    shared = enc.tokens(x, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    per = enc.tokens(x, mask_ratio=0.5, per_sample_mask=True, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shared[0], shared[3])  # one permutation for the batch
    assert not torch.allclose(per[0], per[3])  # a different one per sample
    again = enc.tokens(x, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shared, again)  # the generator fixes the mask


def test_dropped_tokens_are_the_unmasked_subset():
    """Masking equals running the blocks on the kept tokens of the unmasked sequence."""
    enc = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    g = torch.Generator().manual_seed(1)
    from msn_ds.masking import keep_indices
    idx = keep_indices(64, 0.25, 2, False, torch.Generator().manual_seed(1), x.device) + 1
    masked = enc.tokens(x, mask_ratio=0.25, generator=g)
    vit = enc.backbone
    full = vit.patch_embed(x)
    full = torch.cat([vit.cls_token.expand(2, -1, -1), full], 1) + vit.pos_embed
    kept = torch.cat([full[:, :1], full[:, idx]], 1)
    want = vit.norm(vit.blocks(kept))
    torch.testing.assert_close(masked, want, atol=1e-5, rtol=1e-5)


def test_views_grouped_by_size_view_major():
    enc = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16).eval()
    views = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    z = enc(views)
    each = torch.cat([enc(v) for v in views])
    torch.testing.assert_close(z, each, atol=1e-5, rtol=1e-5)
    # consecutive equal sizes run as one batch: masking applies to the masked views only
    z_masked = enc(views, masked_views=2, mask_ratio=0.5,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z_masked[6:], each[6:], atol=1e-5, rtol=1e-5)
    assert (z_masked[:6] - each[:6]).abs().max() > 0.05 * each[:6].abs().max()


def test_only_the_named_views_are_masked_when_focal_size_equals_rand_size():
    """rand_size == focal_size: the focal views are not masked along with the random anchor
    views; they run whole, as a group of their own (BatchNorm statistics of their own)."""
    enc = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16).eval()
    views = [torch.randn(3, 3, 32, 32) for _ in range(4)]  # 1 random anchor view, 3 focal
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **kw):
        calls.append((q.shape[0], q.shape[-2]))
        return real(q, *a, **kw)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        z = enc(views, masked_views=1, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert calls == [(3, 1 + 32)] * 4 + [(9, 1 + 64)] * 4  # 64 patches: half dropped, whole
    torch.testing.assert_close(z[3:], enc(views[1:]), atol=1e-5, rtol=1e-5)
    alone = enc(views[:1], masked_views=1, mask_ratio=0.5,
                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z[:3], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="masked_views"):
        enc(views, mask_ratio=0.5)


def test_pos_embed_resampling_matches_reference_formula():
    """The reference interpolates with ``scale_factor=sqrt(N'/N)``, bicubic, no antialias."""
    pos = torch.randn(1, 1 + 14 * 14, 8)
    for side in (6, 13, 32):
        got = resample_pos_embed(pos, (side, side))
        patch = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
        ref = F.interpolate(patch, scale_factor=math.sqrt(side * side / 196), mode="bicubic")
        ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, -1, 8)], 1)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert resample_pos_embed(pos, (14, 14)) is pos


def test_backbone_is_a_plain_timm_vit():
    enc = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16).eval()
    plain = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=0)
    plain.load_state_dict(enc.backbone.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), enc.forward_features(x), atol=1e-5, rtol=1e-5)


def test_param_groups_follow_reference():
    from msn_ds.engine import param_groups
    model = MSNModel(MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16), 10, 16)
    groups = {g["name"]: g for g in param_groups(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "encoder.backbone.blocks.0.attn.qkv.weight" in decay
    assert "encoder.backbone.pos_embed" in decay  # 3-D, as in the reference
    assert "encoder.backbone.blocks.0.attn.qkv.bias" in no_decay
    assert "encoder.backbone.norm.weight" in no_decay
    assert "encoder.head.bn1.weight" in no_decay
    assert groups["prototypes"]["params"][0] is model.prototypes.weight
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every):
    torch.manual_seed(0)
    plain = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16)
    ckpt = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16, checkpoint_every=every)
    ckpt.load_state_dict(plain.state_dict())
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    grads = []
    for enc in (plain, ckpt):
        z = enc(views, masked_views=1, mask_ratio=0.3, generator=torch.Generator().manual_seed(0))
        z.square().sum().backward()
        grads.append([p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _loss_and_grads(cfg, views):
    from msn_ds.engine import build_models
    from msn_ds.trainer import build_criterion

    model, target = build_models(cfg)
    with torch.no_grad():
        t = target(views[0])
    z, protos = model(views[1:], masked_views=cfg["data"]["rand_views"],
                      mask_ratio=cfg["data"]["patch_drop"],
                      generator=torch.Generator().manual_seed(0))
    loss, _ = build_criterion(cfg)(z, t, protos)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """meta.compile: the same loss and gradients as eager (aot_eager: the compile path
    without a C++ toolchain; inductor is the same wrapping with generated kernels)."""
    from msn_ds.config import load_config

    cfg = load_config("configs/demo_cpu.yaml", check_paths=False)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(4, 3, 16, 16, generator=g) for _ in range(4)]
    eager_loss, eager_grads = _loss_and_grads(cfg, views)
    cfg["meta"]["compile"] = "aot_eager"
    loss, grads = _loss_and_grads(cfg, views)
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], rtol=1e-4, atol=1e-6), name


def test_compile_config_errors():
    from msn_ds.config import ConfigError, load_config
    from msn_ds.deepspeed_config import resolve_ds_config

    with pytest.raises(ConfigError, match="meta.compile"):
        load_config("configs/demo_cpu.yaml", ["meta.compile=tensorrt"], check_paths=False)
    cfg = load_config("configs/demo_cpu.yaml", ["meta.compile=inductor"], check_paths=False)
    with pytest.raises(ConfigError, match="ZeRO-3"):
        resolve_ds_config({"zero_optimization": {"stage": 3}}, cfg, 1, "z3.json")


def test_attention_runs_through_sdpa():
    """Every block's attention calls F.scaled_dot_product_attention (flash / memory-efficient
    kernels on the GPU) for every view size, masked or not."""
    enc = MSNEncoder("vit_pico_4", img_size=32)
    assert all(block.attn.fused_attn for block in enc.backbone.blocks)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **kw):
        calls.append(q.shape[-2])
        return real(q, *a, **kw)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        enc([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)], masked_views=1, mask_ratio=0.5)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert calls == [1 + 32] * 4 + [1 + 16] * 4  # 64 patches half dropped; 16 patches whole
