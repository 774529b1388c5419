"""Saving and loading: DeepSpeed training checkpoints and the one-file weights we share.

The weights file is safetensors with these key prefixes:

* ``target_encoder.*`` the target encoder's ViT, a plain timm ``VisionTransformer``
  state dict (``num_classes=0``): ``load_state_dict(strict=True)`` works on it;
* ``target_head.*`` its projection head (``fc1``, ``bn1``, ``fc2``, ``bn2``, ``fc3``);
* ``anchor_encoder.*``, ``anchor_head.*`` the same for the anchor (online) encoder, when
  present;
* ``prototypes`` ``[K, output_dim]``;

and metadata ``arch``, ``img_size``, ``hidden_dim``, ``output_dim``, ``use_bn``, ``step``,
``epoch`` and ``config`` (the resolved YAML).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .models import MSNEncoder

TARGET_PREFIX = "target_encoder."
HEAD_PREFIX = "target_head."
ANCHOR_PREFIX = "anchor_encoder."
ANCHOR_HEAD_PREFIX = "anchor_head."


def encoder_metadata(encoder: MSNEncoder, img_size: int, hidden_dim: int, output_dim: int,
                     use_bn: bool) -> dict[str, str]:
    return {"arch": encoder.spec.name, "img_size": str(img_size), "hidden_dim": str(hidden_dim),
            "output_dim": str(output_dim), "use_bn": str(use_bn).lower()}


def save_weights(path: str, target: MSNEncoder, prototypes: Optional[torch.Tensor],
                 metadata: dict[str, str], anchor: Optional[MSNEncoder] = None) -> None:
    """Write the weights file atomically (temporary file + rename)."""
    tensors = {TARGET_PREFIX + k: v for k, v in target.backbone.state_dict().items()}
    tensors.update({HEAD_PREFIX + k: v for k, v in target.head.state_dict().items()})
    if anchor is not None:
        tensors.update({ANCHOR_PREFIX + k: v for k, v in anchor.backbone.state_dict().items()})
        tensors.update({ANCHOR_HEAD_PREFIX + k: v for k, v in anchor.head.state_dict().items()})
    if prototypes is not None:
        tensors["prototypes"] = prototypes
    tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point()
               else v.detach().cpu().contiguous() for k, v in tensors.items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors weights file ({e})") from None
    missing = [k for k in ("arch", "output_dim", "hidden_dim") if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {', '.join(missing)}")
    return tensors, meta


def load_encoder(path: str, device: str | torch.device = "cpu") -> tuple[MSNEncoder, dict[str, Any]]:
    """Build the target encoder (backbone + head) from a weights file; eval mode."""
    tensors, meta = read_weights(path)
    encoder = MSNEncoder(meta["arch"], img_size=int(meta.get("img_size", 224)),
                         hidden_dim=int(meta["hidden_dim"]), output_dim=int(meta["output_dim"]),
                         use_bn=meta.get("use_bn", "true") == "true")
    backbone = {k[len(TARGET_PREFIX):]: v for k, v in tensors.items() if k.startswith(TARGET_PREFIX)}
    head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    try:
        encoder.backbone.load_state_dict(backbone, strict=True)
        encoder.head.load_state_dict(head, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match arch {meta['arch']}: {e}") from None
    return encoder.to(device).eval(), dict(meta)
