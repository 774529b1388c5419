"""ViT encoders for MSN: timm's ``VisionTransformer`` with a masked multi-view forward.

The backbone is a plain timm ViT (``num_classes=0``), so its state dict loads into timm
unchanged. What MSN needs on top of it lives here:

* views of equal size are batched together (consecutive groups, as in the reference), and
  the projection head runs once per group, so the masked views and the focal views each
  get BatchNorm statistics of their own (the reference's ``forward``); the caller names the
  masked views (``masked_views``), and a group never spans masked and whole views, so focal
  views of the random views' size stay whole;
* the position embedding is resampled bicubically for other grid sizes, exactly as the
  reference does (no anti-aliasing, unlike timm's ``resample_abs_pos_embed``);
* a crop that the patch does not divide is floored (96 px at patch 7 gives 13x13 patches),
  because the patch projection is a strided convolution without padding;
* tokens of the masked views are dropped after the position embedding and before the
  blocks, so compute falls with the mask ratio.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..masking import keep_indices
from .head import ProjectionHead


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int


# 'pico' is ours: a 4-block model for CPU demos and tests.
VIT_SIZES = {
    "pico": ViTSize(128, 4, 4),
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
    "huge": ViTSize(1280, 32, 16),
}

# The reference repository's model names (src/deit.py) and ours.
REFERENCE_NAMES = {
    "deit_tiny": "vit_tiny_16",
    "deit_small": "vit_small_16",
    "deit_base": "vit_base_16",
    "deit_large": "vit_large_16",
    "deit_huge": "vit_huge_14",
    "deit_small_p7": "vit_small_7",
    "deit_small_p8": "vit_small_8",
    "deit_base_p4": "vit_base_4",
    "deit_base_p8": "vit_base_8",
    "deit_large_p7": "vit_large_7",
}

ARCHS = ("vit_tiny_16", "vit_small_16", "vit_base_16", "vit_large_16", "vit_huge_14",
         "vit_base_4", "vit_large_7")

_ARCH_RE = re.compile(r"^vit_(%s)_(\d+)$" % "|".join(VIT_SIZES))


@dataclass(frozen=True)
class ArchSpec:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int


def resolve_arch(name: str) -> ArchSpec:
    """``vit_{pico,tiny,small,base,large,huge}_{patch}`` or a reference ``deit_*`` name."""
    canonical = REFERENCE_NAMES.get(name, name)
    match = _ARCH_RE.match(canonical)
    if match is None:
        known = ", ".join(list(ARCHS) + sorted(REFERENCE_NAMES))
        raise ValueError(f"unknown model_name {name!r}; known: {known} "
                         f"(or any vit_{{{','.join(VIT_SIZES)}}}_{{patch}})")
    size = VIT_SIZES[match.group(1)]
    return ArchSpec(canonical, size.embed_dim, size.depth, size.num_heads, int(match.group(2)))


def build_vit(arch: str | ArchSpec, img_size: int = 224, drop_path_rate: float = 0.0,
              device: Optional[torch.device | str] = None) -> VisionTransformer:
    """A plain timm ViT with the reference's hyperparameters (qkv bias, LayerNorm eps 1e-6)."""
    spec = resolve_arch(arch) if isinstance(arch, str) else arch
    with torch.device(device) if device is not None else contextlib.nullcontext():
        vit = VisionTransformer(
            img_size=img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim,
            depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=4.0, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, global_pool="token",
            drop_path_rate=drop_path_rate)
    return vit


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of the patch position embeddings to ``grid``, class entry kept."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    if grid == (side, side):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


class MSNEncoder(nn.Module):
    """ViT backbone + projection head; ``forward(views)`` returns the head outputs.

    ``views`` is a list of ``[B, 3, H, W]`` tensors; the first ``masked_views`` of them (the
    random anchor views) drop ``mask_ratio`` of their patch tokens. Consecutive views of
    equal size and equal masking run as one batch through the backbone and the head
    (BatchNorm statistics per group); the output rows are view-major (all images' first
    view, then the second...).

    ``checkpoint_every=k`` recomputes every k-th block's activations in the backward pass
    (0: off, 1: every block). It uses ``torch.utils.checkpoint`` (non-reentrant), which works
    with token dropping, with parameters that ZeRO-3 gathers on use, and with inputs that do
    not require grad, with no DeepSpeed-specific partitioning of activations needed for a
    data-parallel ViT.
    """

    def __init__(self, arch: str = "vit_small_16", img_size: int = 224, hidden_dim: int = 2048,
                 output_dim: int = 256, use_bn: bool = True, drop_path_rate: float = 0.0,
                 checkpoint_every: int = 0):
        super().__init__()
        self.spec = resolve_arch(arch)
        self.backbone = build_vit(self.spec, img_size=img_size, drop_path_rate=drop_path_rate)
        self.head = ProjectionHead(self.spec.embed_dim, hidden_dim, output_dim, use_bn=use_bn)
        self.checkpoint_every = checkpoint_every
        init_reference_(self)

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    def tokens(self, x: torch.Tensor, mask_ratio: float = 0.0, per_sample_mask: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """timm's ``forward_features`` with the token drop in ``patch_drop``'s place:
        ``[B, 1+N', D]``. Each of timm's steps not called as is says why in a comment;
        tests/test_models.py checks the unmasked result against timm's own forward."""
        vit = self.backbone
        # not vit.patch_embed(x): it asserts the model's image size; the conv alone floors a crop
        x = vit.patch_embed.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
        # not vit._pos_embed(x): it does not resample, or anti-aliases; this is the reference's
        cls = vit.cls_token.expand(x.shape[0], -1, -1)
        x = vit.pos_drop(torch.cat([cls, x], dim=1) + resample_pos_embed(vit.pos_embed, grid))
        if mask_ratio > 0:  # not vit.patch_drop: it draws from the global RNG, in training only
            x = drop_tokens(x, mask_ratio, per_sample_mask, generator)
        x = vit.norm_pre(x)
        # not checkpoint_seq(every=k): it recomputes all blocks in k-runs; here every k-th only
        for i, block in enumerate(vit.blocks):
            if self.checkpoint_every and i % self.checkpoint_every == 0 and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return vit.norm(x)

    def forward_features(self, x: torch.Tensor, **mask) -> torch.Tensor:
        """Class token after the final LayerNorm: the representation fed to the head."""
        return self.tokens(x, **mask)[:, 0]

    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor, masked_views: int = 0,
                mask_ratio: float = 0.0, per_sample_mask: bool = False,
                generator: Optional[torch.Generator] = None, return_before_head: bool = False):
        if isinstance(views, torch.Tensor):
            views = [views]
        if mask_ratio > 0 and not 0 < masked_views <= len(views):
            raise ValueError(f"mask_ratio {mask_ratio} needs masked_views in 1..{len(views)}, "
                             f"got {masked_views}")
        feats, outs, start = [], [], 0
        for group in group_views(views, split=masked_views):
            h = self.forward_features(torch.cat(group),
                                      mask_ratio=mask_ratio if start < masked_views else 0.0,
                                      per_sample_mask=per_sample_mask, generator=generator)
            start += len(group)
            feats.append(h)
            outs.append(self.head(h))  # per group, as the reference: BatchNorm statistics
        h, z = (torch.cat(feats), torch.cat(outs)) if len(feats) > 1 else (feats[0], outs[0])
        return (h, z) if return_before_head else z

    def features(self, views: Sequence[torch.Tensor] | torch.Tensor, masked_views: int = 0,
                 mask_ratio: float = 0.0, per_sample_mask: bool = False,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, ...]:
        """:meth:`forward`'s backbone half: the head's input of each group of views (one
        tensor per group, rows view-major), for the gradient cache (``msn_ds/accumulate.py``).
        ``heads(features(views, **mask))`` computes what ``forward(views, **mask)`` does."""
        if isinstance(views, torch.Tensor):
            views = [views]
        if mask_ratio > 0 and not 0 < masked_views <= len(views):
            raise ValueError(f"mask_ratio {mask_ratio} needs masked_views in 1..{len(views)}, "
                             f"got {masked_views}")
        feats, start = [], 0
        for group in group_views(views, split=masked_views):
            feats.append(self.forward_features(
                torch.cat(group), mask_ratio=mask_ratio if start < masked_views else 0.0,
                per_sample_mask=per_sample_mask, generator=generator))
            start += len(group)
        return tuple(feats)

    def heads(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward`'s head half: the head on each group (BatchNorm statistics per
        group, as in :meth:`forward`), rows concatenated."""
        outs = [self.head(h) for h in feats]
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def drop_tokens(x: torch.Tensor, mask_ratio: float, per_sample: bool,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Keep the class token and ``floor(N * (1 - r))`` patch tokens."""
    batch, length, dim = x.shape
    idx = keep_indices(length - 1, mask_ratio, batch, per_sample, generator, x.device) + 1
    if per_sample:
        patches = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, dim))
    else:
        patches = x[:, idx]
    return torch.cat([x[:, :1], patches], dim=1)


def group_views(views: Sequence[torch.Tensor], split: int = 0) -> list[list[torch.Tensor]]:
    """Consecutive runs of views with the same spatial size; no run crosses index ``split``
    (the end of the masked views)."""
    groups: list[list[torch.Tensor]] = []
    for i, view in enumerate(views):
        if groups and groups[-1][0].shape[-2:] == view.shape[-2:] and i != split:
            groups[-1].append(view)
        else:
            groups.append([view])
    return groups


@torch.no_grad()
def init_reference_(module: nn.Module) -> None:
    """The reference's initialisation: truncated normal (std 0.02) for linear weights, the
    class token and the position embedding; zero biases; unit LayerNorm; Kaiming for convs."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, VisionTransformer):
            nn.init.trunc_normal_(m.pos_embed, std=0.02)
            nn.init.trunc_normal_(m.cls_token, std=0.02)
