"""``meta.init_weights`` from the formats people have, with no conversion step: a timm ViT
state dict (safetensors or a torch file), a Hugging Face ViTModel folder or weights file, a
DINOv2 state dict. Every file here is made locally (nothing is downloaded): a timm
``VisionTransformer`` of the demo's shape, a ``transformers.ViTModel`` from a ``ViTConfig``,
and a DINOv2 dict renamed the way DINOv2's checkpoints name their tensors."""
import logging
from functools import partial

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from helpers import ROOT
from msn_ds.config import ConfigError, load_config
from msn_ds.engine import build_models, check_init_weights
from msn_ds.io.weights import encoder_metadata, save_weights
from msn_ds.models import MSNEncoder, resample_pos_embed

DEMO = str(ROOT / "configs" / "demo_cpu.yaml")  # vit_pico_4 (width 128, depth 4), 32 px


def timm_vit(img=32, width=128, depth=4, patch=4, classes=0, seed=3, **kw):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img, patch_size=patch, embed_dim=width, depth=depth,
                             num_heads=4, mlp_ratio=4.0, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=classes,
                             **kw).eval()


def config(path, *extra):
    return load_config(DEMO, [f"meta.init_weights={path}", *extra], check_paths=False)


def fresh_head_and_prototypes(cfg):
    """This run's own seeded initialisation of the head and prototypes (no init_weights)."""
    model, _ = build_models({**cfg, "meta": {**cfg["meta"], "init_weights": None}})
    return model.encoder.head.state_dict(), model.prototypes.weight.detach().clone()


def assert_backbone(module, state):
    got = module.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v.float()), k


def assert_fresh(model, cfg):
    head, protos = fresh_head_and_prototypes(cfg)
    assert all(torch.equal(model.encoder.head.state_dict()[k], v) for k, v in head.items())
    assert torch.equal(model.prototypes.weight, protos)


@pytest.mark.parametrize("kind", ["safetensors", "pth", "pth-wrapped"])
def test_timm_state_dict(tmp_path, caplog, kind):
    vit = timm_vit(classes=10)  # an ImageNet-style classifier head: dropped
    state = vit.state_dict()
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state} if kind == "pth-wrapped" else state, path)
    cfg = config(path)
    check_init_weights(cfg)
    with caplog.at_level(logging.INFO, logger="msn_ds"):
        model, target = build_models(cfg)
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    assert_backbone(model.encoder.backbone, backbone)
    assert_backbone(target.backbone, backbone)
    assert_fresh(model, cfg)
    assert "is a timm ViT's weights" in caplog.text
    assert "dropped (not the backbone's): head.bias, head.weight" in caplog.text
    assert "head and prototypes start fresh" in caplog.text


def test_position_embedding_resampled(tmp_path, caplog):
    vit = timm_vit(img=48)  # a 12 x 12 grid, this run's is 8 x 8
    save_file(vit.state_dict(), str(tmp_path / "w.safetensors"))
    with caplog.at_level(logging.INFO, logger="msn_ds"):
        model, _ = build_models(config(tmp_path / "w.safetensors"))
    assert torch.equal(model.encoder.backbone.pos_embed, resample_pos_embed(vit.pos_embed, (8, 8)))
    assert torch.equal(model.encoder.backbone.blocks[3].mlp.fc2.weight,
                       vit.blocks[3].mlp.fc2.weight)
    assert "position embedding resampled from [1, 145, 128] to [1, 65, 128]" in caplog.text


@pytest.mark.parametrize("kw, theirs", [
    (dict(width=192), "patch 4, width 192, depth 4 (patch_embed.proj.weight [192, 3, 4, 4])"),
    (dict(depth=2), "patch 4, width 128, depth 2 (patch_embed.proj.weight [128, 3, 4, 4])"),
    (dict(patch=8), "patch 8, width 128, depth 4 (patch_embed.proj.weight [128, 3, 8, 8])"),
])
def test_patch_width_and_depth_must_match(tmp_path, kw, theirs):
    save_file(timm_vit(**kw).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError) as e:
        check_init_weights(config(tmp_path / "w.safetensors"))
    assert f"holds a timm ViT: {theirs}" in str(e.value)
    assert ("this run builds vit_pico_4: patch 4, width 128, depth 4 (patch_embed.proj.weight "
            "[128, 3, 4, 4])") in str(e.value)
    assert str(tmp_path / "w.safetensors") in str(e.value)


def test_missing_and_unexpected_keys_listed_and_strict(tmp_path, caplog):
    vit = timm_vit()
    state = dict(vit.state_dict())
    del state["norm.weight"], state["blocks.2.attn.proj.bias"]
    state["extra.scale"] = torch.ones(3)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"missing from the file: blocks\.2\.attn\.proj\.bias, "
                       r"norm\.weight; unexpected: extra\.scale \(meta\.init_strict=false"):
        check_init_weights(config(tmp_path / "w.safetensors"))
    cfg = config(tmp_path / "w.safetensors", "meta.init_strict=false")
    check_init_weights(cfg)
    with caplog.at_level(logging.INFO, logger="msn_ds"):
        model, _ = build_models(cfg)
    assert "meta.init_strict=false: missing from the file: blocks.2.attn.proj.bias" in caplog.text
    backbone = model.encoder.backbone
    assert torch.equal(backbone.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert torch.equal(backbone.norm.weight, torch.ones(128))  # kept this run's init
    assert torch.equal(backbone.blocks[2].attn.proj.bias, torch.zeros(128))


def dinov2_state(vit, registers=0, layerscale=False):
    """A timm ViT's tensors named as DINOv2's checkpoints name them: the blocks in chunks
    (``blocks.C.N.``, N the global index), a ``mask_token``, optional ``register_tokens``
    and LayerScale ``ls1/ls2.gamma``."""
    out = {}
    for k, v in vit.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
        out[k] = v
    out["mask_token"] = torch.zeros(1, 128)
    if registers:
        out["register_tokens"] = torch.zeros(1, registers, 128)
    if layerscale:
        for i in range(4):
            out[f"blocks.{i // 2}.{i}.ls1.gamma"] = torch.full((128,), 1e-5)
            out[f"blocks.{i // 2}.{i}.ls2.gamma"] = torch.full((128,), 1e-5)
    return out


def test_dinov2_state_dict(tmp_path, caplog):
    vit = timm_vit(img=40)  # 10 x 10 grid
    torch.save(dinov2_state(vit), tmp_path / "dinov2.pth")
    with caplog.at_level(logging.INFO, logger="msn_ds"):
        model, _ = build_models(config(tmp_path / "dinov2.pth"))
    assert "is a DINOv2 ViT's weights" in caplog.text and "mask_token" in caplog.text
    state = {k: v for k, v in vit.state_dict().items() if k != "pos_embed"}
    assert_backbone(model.encoder.backbone, state)
    assert torch.equal(model.encoder.backbone.pos_embed, resample_pos_embed(vit.pos_embed, (8, 8)))


@pytest.mark.parametrize("extra, message", [
    (dict(registers=4), r"DINOv2 ViT has 4 register tokens \(register_tokens \[1, 4, 128\]\); "
                        r"msn_ds's ViT has none"),
    (dict(layerscale=True), r"DINOv2 ViT uses LayerScale \(blocks\.0\.0\.ls1\.gamma \[128\] and 7 "
                            r"more\); msn_ds's ViT has no LayerScale"),
])
def test_dinov2_registers_and_layerscale_refused(tmp_path, extra, message):
    torch.save(dinov2_state(timm_vit(), **extra), tmp_path / "dinov2.pth")
    for strict in ("true", "false"):  # not a key mismatch: the weights would compute otherwise
        with pytest.raises(ConfigError, match=message):
            check_init_weights(config(tmp_path / "dinov2.pth", f"meta.init_strict={strict}"))


def hf_vit(tmp_path, eps=1e-6, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.ViTConfig(**{"hidden_size": 128, "num_hidden_layers": 4,
                                    "num_attention_heads": 4, "intermediate_size": 512,
                                    "image_size": 32, "patch_size": 4, "layer_norm_eps": eps,
                                    **kw})
    model = transformers.ViTModel(cfg).eval()  # with its pooler: dropped
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("where", ["folder", "file"])
def test_hugging_face_vitmodel(tmp_path, caplog, where):
    hf = hf_vit(tmp_path)
    path = tmp_path / "hf" if where == "folder" else tmp_path / "hf" / "model.safetensors"
    cfg = config(path)
    check_init_weights(cfg)
    with caplog.at_level(logging.INFO, logger="msn_ds"):
        model, target = build_models(cfg)
    assert "is a Hugging Face ViT's weights" in caplog.text and "pooler.dense" in caplog.text
    assert_fresh(model, cfg)
    # the backbone computes what the Hugging Face model computes: the class token
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state[:, 0]
        for enc in (model.encoder.eval(), target.eval()):
            torch.testing.assert_close(enc.forward_features(x), want, atol=1e-5, rtol=1e-5)


def test_hugging_face_config_checked(tmp_path, caplog):
    hf_vit(tmp_path, eps=1e-12, num_attention_heads=8)
    with pytest.raises(ConfigError, match=r"config\.json has 8 attention heads, this run's "
                       r"vit_pico_4 has 4"):
        check_init_weights(config(tmp_path / "hf"))
    hf_vit(tmp_path, eps=1e-12)  # ViTConfig's default eps: a note, not an error
    with caplog.at_level(logging.INFO, logger="msn_ds"):
        build_models(config(tmp_path / "hf"))
    assert "layer_norm_eps is 1e-12, msn_ds's ViT uses 1e-06" in caplog.text


def test_our_file_brings_its_head_and_prototypes(tmp_path, caplog):
    torch.manual_seed(5)
    enc = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=512, output_dim=128)
    protos = torch.randn(64, 128)
    save_weights(str(tmp_path / "w.safetensors"), enc, protos,
                 encoder_metadata(enc, 32, 512, 128, True))
    with caplog.at_level(logging.INFO, logger="msn_ds"):
        model, _ = build_models(config(tmp_path / "w.safetensors"))
    assert "is msn_ds's own weights" in caplog.text
    assert "head and prototypes from the file" in caplog.text
    assert torch.equal(model.prototypes.weight, protos)
    assert torch.equal(model.encoder.head.fc3.weight, enc.head.fc3.weight)
    # another criterion.num_proto: an error, or with init_strict false fresh prototypes
    with pytest.raises(ConfigError, match=r"prototypes are \[64, 128\], this run's \[32, 128\]"):
        check_init_weights(config(tmp_path / "w.safetensors", "criterion.num_proto=32"))
    cfg = config(tmp_path / "w.safetensors", "criterion.num_proto=32", "meta.init_strict=false")
    model, _ = build_models(cfg)
    assert torch.equal(model.prototypes.weight, fresh_head_and_prototypes(cfg)[1])


def test_resume_ignores_init_weights(tmp_path, caplog):
    save_file(timm_vit().state_dict(), str(tmp_path / "w.safetensors"))
    cfg = config(tmp_path / "w.safetensors")
    with caplog.at_level(logging.INFO, logger="msn_ds"):
        model, _ = build_models(cfg, resuming=True)
    assert "ignored: this run resumes, and the checkpoint's weights win" in caplog.text
    fresh, _ = build_models({**cfg, "meta": {**cfg["meta"], "init_weights": None}})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values()))


def test_unknown_or_unreadable_file(tmp_path):
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ConfigError, match=r"resnet\.safetensors: not a ViT state dict msn_ds "
                       r"knows \(its keys: conv1\.weight\)"):
        check_init_weights(config(tmp_path / "resnet.safetensors"))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match=r"junk\.pth: not a readable weights file"):
        check_init_weights(config(tmp_path / "junk.pth"))
