"""Model FLOPs of an MSN training step and the accelerator's peak, for MFU.

A formula over the token counts the step actually runs (patch grid floored, random anchor
views keeping ``floor(N (1 - patch_drop))`` patch tokens, focal views whole), counting a
multiply-add as 2 FLOPs and only the matrix products: patch embedding, qkv, attention scores
and values, attention projection, MLP, projection head and the prototype logits. LayerNorm,
GELU, softmax, the loss, the EMA and the optimiser are left out (well under 1 % at ViT-S and
above). Per ViT block with ``n`` tokens of width ``d`` and MLP ratio 4::

    2 n (3 d^2 + d^2 + 8 d^2) + 4 n^2 d = 24 n d^2 + 4 n^2 d

Training an anchor view costs 3x its forward (the backward is two products per forward
product); the target view is forward only. Activation checkpointing's recomputed forward is
not counted: these are *model* FLOPs, so MFU does not reward recomputation (PaLM's
definition). ``tests/test_flops.py`` checks the formula against torch's FLOP counter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..models.vit import ArchSpec, resolve_arch

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("GH200", 989.4e12),
    ("A100", 312.0e12),
    ("L40S", 362.0e12),
    ("A10", 125.0e12),
)


def vit_forward_flops(spec: ArchSpec, img_size: int, mask_ratio: float = 0.0,
                      mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of the ViT trunk on one ``img_size`` view (class token included)."""
    d, p = spec.embed_dim, spec.patch_size
    patches = (img_size // p) ** 2
    kept = int(math.floor(patches * (1.0 - mask_ratio))) if mask_ratio > 0 else patches
    n = kept + 1
    embed = 2 * patches * (3 * p * p) * d  # the conv runs on every patch, before the drop
    block = 2 * n * (4 * d * d + 2 * mlp_ratio * d * d) + 4 * n * n * d
    return int(embed + spec.depth * block)


def head_forward_flops(in_dim: int, hidden_dim: int, output_dim: int, num_proto: int) -> int:
    """Projection head (3 linear layers) and the logits against ``num_proto`` prototypes."""
    return 2 * (in_dim * hidden_dim + hidden_dim * hidden_dim + hidden_dim * output_dim
                + output_dim * num_proto)


@dataclass(frozen=True)
class StepShape:
    """What an image costs: the model and its views (docs/method.md section 1 defaults)."""
    arch: str
    hidden_dim: int = 2048
    output_dim: int = 256
    num_proto: int = 1024
    rand_size: int = 224
    focal_size: int = 96
    rand_views: int = 1
    focal_views: int = 10
    patch_drop: float = 0.15

    @classmethod
    def from_config(cls, cfg: dict) -> "StepShape":
        m, d, c = cfg["meta"], cfg["data"], cfg["criterion"]
        return cls(m["model_name"], m["hidden_dim"], m["output_dim"], c["num_proto"],
                   d["rand_size"], d["focal_size"], d["rand_views"], d["focal_views"],
                   d["patch_drop"])

    def flops_per_image(self) -> int:
        """Model FLOPs of one image in one training step (target forward + anchors' forward
        and backward)."""
        spec = resolve_arch(self.arch)
        head = head_forward_flops(spec.embed_dim, self.hidden_dim, self.output_dim,
                                  self.num_proto)
        target = vit_forward_flops(spec, self.rand_size) + head
        rand = vit_forward_flops(spec, self.rand_size, self.patch_drop) + head
        focal = vit_forward_flops(spec, self.focal_size) + head
        return int(target + 3 * (self.rand_views * rand + self.focal_views * focal))


def peak_flops(device: Optional[torch.device] = None) -> Optional[float]:
    """The bf16 peak of this CUDA device, or None when unknown (the CPU included)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def mfu(images_per_s_per_device: float, flops_per_image: float,
        peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if not peak:
        return None
    return images_per_s_per_device * flops_per_image / peak
