"""Reference (facebookresearch/msn) checkpoints: import, feature equality with an
independently built timm ViT + head, the export round trip, and the refusals."""
import math
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from msn_ds.io.reference import ReferenceCheckpointError, load_reference
from msn_ds.io.weights import load_encoder, read_weights, save_weights
from helpers import run_cli

HIDDEN, OUT, K = 96, 48, 10  # not the default 2048/256: dims must be read from the shapes


class NotATensor:
    """Stands for anything a weights-only unpickler must refuse."""


def reference_vit() -> VisionTransformer:
    """The reference's deit_tiny: timm layout, qkv bias, LayerNorm eps 1e-6. Built on the
    meta device (timm's init is slow and ``randomise`` overwrites every parameter)."""
    with torch.device("meta"):
        vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=12,
                                num_heads=3, qkv_bias=True, num_classes=0,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6))
    assert not list(vit.buffers())
    return vit.to_empty(device="cpu")


def reference_head(dim: int, use_bn: bool = True) -> nn.Sequential:
    layers = OrderedDict(fc1=nn.Linear(dim, HIDDEN))
    if use_bn:
        layers["bn1"] = nn.BatchNorm1d(HIDDEN)
    layers.update(gelu1=nn.GELU(), fc2=nn.Linear(HIDDEN, HIDDEN))
    if use_bn:
        layers["bn2"] = nn.BatchNorm1d(HIDDEN)
    layers.update(gelu2=nn.GELU(), fc3=nn.Linear(HIDDEN, OUT))
    return nn.Sequential(layers)


@torch.no_grad()
def randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        norm_weight = name.endswith("weight") and p.dim() == 1
        p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if norm_weight else 0.0))
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.num_batches_tracked.fill_(123)
    return module.eval()


def reference_state(vit, head, prefix="module."):
    state = {prefix + k: v for k, v in vit.state_dict().items()}
    state.update({prefix + "fc." + k: v for k, v in head.state_dict().items()})
    return state


def reference_features(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Class token as the reference computes it, position embedding resampled with
    ``scale_factor`` and no anti-aliasing."""
    t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    n, big_n = t.shape[1], vit.pos_embed.shape[1] - 1
    pos = vit.pos_embed
    if n != big_n:
        side, dim = int(math.sqrt(big_n)), pos.shape[-1]
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=math.sqrt(n / big_n), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    t = torch.cat([vit.cls_token.expand(len(x), -1, -1), t], dim=1) + pos
    return vit.norm(vit.blocks(t))[:, 0]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    torch.manual_seed(0)
    vit, head = randomise(reference_vit(), 1), randomise(reference_head(192), 2)
    anchor_vit, anchor_head = randomise(reference_vit(), 3), randomise(reference_head(192), 4)
    protos = torch.randn(K, OUT)
    path = tmp_path_factory.mktemp("ref") / "msn_deit_tiny.pth.tar"
    torch.save({"target_encoder": reference_state(vit, head), "prototypes": protos,
                "encoder": reference_state(anchor_vit, anchor_head), "epoch": 7, "loss": 2.5,
                "opt": {"state": {0: {"exp_avg": torch.ones(3)}},
                        "param_groups": [{"lr": 0.1, "params": [0]}]}}, path)
    return dict(path=path, vit=vit, head=head, anchor_vit=anchor_vit, protos=protos)


@pytest.fixture(scope="module")
def imported(ref):
    out = ref["path"].parent / "ours.safetensors"
    run_cli("scripts/import_msn.py", ref["path"], "--arch", "deit_tiny", "--out", out)
    return out


@pytest.fixture(scope="module")
def encoders(ref, imported):
    """Through the script's file and straight from the function."""
    return load_encoder(str(imported))[0], load_reference(str(ref["path"]), "deit_tiny")[0]


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("size", [224, 96])
def test_imported_features_match_reference(ref, encoders, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    expected = reference_features(ref["vit"], x)
    if size == 224:  # the hand-written reference forward is timm's own at the native size
        torch.testing.assert_close(expected, ref["vit"].forward_features(x)[:, 0])
    for enc in encoders:
        feats = enc.eval().forward_features(x)
        torch.testing.assert_close(feats, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(enc.head(feats), ref["head"](expected), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_metadata_prototypes_and_anchor(ref, imported):
    tensors, meta = read_weights(str(imported))
    assert meta["arch"] == "vit_tiny_16" and meta["epoch"] == "7"
    assert meta["source"] == "msn_deit_tiny.pth.tar"
    dims = (meta["hidden_dim"], meta["output_dim"], meta["use_bn"])
    assert dims == (str(HIDDEN), str(OUT), "true")
    assert torch.equal(tensors["prototypes"], ref["protos"])
    for k, v in ref["anchor_vit"].state_dict().items():
        assert torch.equal(tensors["anchor_encoder." + k], v), k
    assert tensors["target_head.bn2.num_batches_tracked"].item() == 123


@pytest.mark.slow
def test_export_round_trip_is_bit_identical(ref, imported, tmp_path):
    back, again = tmp_path / "back.pth.tar", tmp_path / "again.safetensors"
    run_cli("scripts/import_msn.py", imported, "--export-reference", "--out", back)
    target, protos, anchor, meta = load_reference(str(back), "deit_tiny")  # what the script does
    save_weights(str(again), target, protos, meta, anchor)
    (a, meta_a), (b, meta_b) = read_weights(str(imported)), read_weights(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_b["epoch"] == "7" and meta_b["arch"] == meta_a["arch"]
    # ... and the exported file is the original checkpoint's layout, tensor for tensor.
    orig, exported = torch.load(ref["path"], weights_only=True), torch.load(back, weights_only=True)
    for entry in ("target_encoder", "encoder"):
        assert list(exported[entry]) == list(orig[entry])
        assert all(torch.equal(exported[entry][k], v) for k, v in orig[entry].items())
    assert torch.equal(exported["prototypes"], orig["prototypes"]) and exported["epoch"] == 7


@pytest.mark.slow
def test_no_prefix_no_bn_no_head_and_inferred_arch(ref, tmp_path):
    vit, head = ref["vit"], randomise(reference_head(192, use_bn=False), 5)
    path = tmp_path / "plain.pth.tar"
    torch.save({"target_encoder": reference_state(vit, head, prefix=""),
                "prototypes": torch.randn(K, OUT)}, path)
    enc, protos, anchor, meta = load_reference(str(path))  # arch inferred from the shapes
    assert meta["arch"] == "vit_tiny_16" and meta["use_bn"] == "false" and anchor is None
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc.head(enc.forward_features(x)),
                                   head(reference_features(vit, x)), atol=1e-4, rtol=0)
    backbone_only = {"module." + k: v for k, v in vit.state_dict().items()}
    torch.save({"target_encoder": backbone_only}, path)
    enc, protos, _, meta = load_reference(str(path), "deit_tiny")
    assert protos is None and meta["head"] == "absent"
    assert torch.equal(enc.backbone.pos_embed, vit.pos_embed)


@pytest.mark.slow
def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pth.tar"
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load_reference(str(missing))
    r = run_cli("scripts/import_msn.py", missing, "--out", tmp_path / "x.safetensors",
                check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope.pth.tar" in r.stderr
    assert "Traceback" not in r.stderr


def test_truncated_file(ref, tmp_path):
    data = ref["path"].read_bytes()
    bad = tmp_path / "truncated.pth.tar"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReferenceCheckpointError,
                       match=r"truncated\.pth\.tar.*truncated or corrupt"):
        load_reference(str(bad))


def test_wrong_arch_names_key_and_shapes(ref):
    with pytest.raises(ReferenceCheckpointError) as e:
        load_reference(str(ref["path"]), "deit_small")
    msg = str(e.value)
    assert "msn_deit_tiny.pth.tar" in msg and "module.cls_token" in msg
    assert "[1, 1, 192]" in msg and "[1, 1, 384]" in msg
    with pytest.raises(ReferenceCheckpointError, match=r"module\.patch_embed\.proj\.weight.*"
                       r"\[192, 3, 16, 16\].*\[192, 3, 8, 8\]"):
        load_reference(str(ref["path"]), "vit_tiny_8")


def test_missing_and_unexpected_keys(ref, tmp_path):
    state = reference_state(ref["vit"], ref["head"])
    del state["module.blocks.3.attn.qkv.bias"]
    state["module.pred.weight"] = torch.zeros(2)
    path = tmp_path / "odd.pth.tar"
    torch.save({"target_encoder": state}, path)
    with pytest.raises(ReferenceCheckpointError,
                       match=r"odd\.pth\.tar.*missing module\.blocks\.3\.attn\.qkv\.bias.*"
                             r"unexpected module\.pred\.weight"):
        load_reference(str(path), "deit_tiny")
    torch.save({"encoder": state}, path)
    with pytest.raises(ReferenceCheckpointError, match="no 'target_encoder'"):
        load_reference(str(path))


def test_pickled_object_is_refused(ref, tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"target_encoder": reference_state(ref["vit"], ref["head"]),
                "opt": NotATensor()}, path)
    with pytest.raises(ReferenceCheckpointError,
                       match=r"evil\.pth\.tar.*NotATensor.*refusing to unpickle arbitrary objects"):
        load_reference(str(path))
