"""The one-file weights we share: its format, and the two directions between an encoder
and its metadata.

The file is safetensors with these key prefixes:

* ``target_encoder.*`` the target encoder's ViT, a plain timm ``VisionTransformer``
  state dict (``num_classes=0``): ``load_state_dict(strict=True)`` works on it;
* ``target_head.*`` its projection head (``fc1``, ``bn1``, ``fc2``, ``bn2``, ``fc3``);
* ``anchor_encoder.*``, ``anchor_head.*`` the same for the anchor (online) encoder, when
  present;
* ``prototypes`` ``[K, output_dim]``;

and metadata ``arch``, ``img_size``, ``hidden_dim``, ``output_dim``, ``use_bn`` (what
rebuilds the encoder: :func:`encoder_metadata` writes them, :func:`build_encoder` reads
them), plus ``step``, ``epoch`` and ``config`` (the resolved YAML) from a training run.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import weights_metadata_problem
from ..models import MSNEncoder, resolve_arch
from .atomic import atomic_write

TARGET_PREFIX = "target_encoder."
HEAD_PREFIX = "target_head."
ANCHOR_PREFIX = "anchor_encoder."
ANCHOR_HEAD_PREFIX = "anchor_head."


HEAD_KEY, HEAD_ABSENT = "head", "absent"
"""Metadata ``head=absent``: the file's projection head is a seeded placeholder (a Hugging
Face or headless reference import), not a trained one."""


def has_trained_head(meta: Mapping[str, str]) -> bool:
    return meta.get(HEAD_KEY) != HEAD_ABSENT


def mark_head_absent(meta: dict[str, str]) -> dict[str, str]:
    meta[HEAD_KEY] = HEAD_ABSENT
    return meta


def encoder_metadata(encoder: MSNEncoder | str, img_size: int, hidden_dim: int,
                     output_dim: int, use_bn: bool) -> dict[str, str]:
    """Encoder -> metadata: what :func:`build_encoder` needs to rebuild it (``encoder``: the
    encoder, or an arch name, ours or the reference's)."""
    arch = encoder.spec.name if isinstance(encoder, MSNEncoder) else resolve_arch(encoder).name
    return {"arch": arch, "img_size": str(img_size), "hidden_dim": str(hidden_dim),
            "output_dim": str(output_dim), "use_bn": str(use_bn).lower()}


def build_encoder(meta: Mapping[str, str]) -> MSNEncoder:
    """Metadata -> an encoder of that shape (freshly initialised; built under
    ``torch.device("meta")``, nothing is computed)."""
    return MSNEncoder(meta["arch"], img_size=int(meta.get("img_size", 224)),
                      hidden_dim=int(meta["hidden_dim"]), output_dim=int(meta["output_dim"]),
                      use_bn=meta.get("use_bn", "true") == "true")


def weights_tensors(target: MSNEncoder, prototypes: Optional[torch.Tensor],
                    anchor: Optional[MSNEncoder] = None) -> dict[str, torch.Tensor]:
    tensors = prefixed(target.backbone.state_dict(), TARGET_PREFIX)
    tensors.update(prefixed(target.head.state_dict(), HEAD_PREFIX))
    if anchor is not None:
        tensors.update(prefixed(anchor.backbone.state_dict(), ANCHOR_PREFIX))
        tensors.update(prefixed(anchor.head.state_dict(), ANCHOR_HEAD_PREFIX))
    if prototypes is not None:
        tensors["prototypes"] = prototypes
    return tensors


def prefixed(state: Mapping[str, torch.Tensor], prefix: str,
             strip: str = "") -> dict[str, torch.Tensor]:
    """``{prefix + key[len(strip):]}`` for the keys that start with ``strip``."""
    return {prefix + k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}


def save_weights(path: str, target: MSNEncoder, prototypes: Optional[torch.Tensor],
                 metadata: dict[str, str], anchor: Optional[MSNEncoder] = None) -> None:
    write_weights(path, weights_tensors(target, prototypes, anchor), metadata)


def write_weights(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  source: Optional[str] = None) -> None:
    """Write safetensors (or, for a ``.pth`` path, a torch file holding ``state_dict`` and
    ``metadata``) with :func:`atomic_write`: the file gets the mode the umask gives (weights
    are shared); a full disk is a :class:`SaveError` (``source``: the checkpoint to name in
    it)."""
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in tensors.items()}
    metadata = {k: str(v) for k, v in metadata.items()}
    if path.endswith((".pth", ".pt")):
        def write(tmp: str) -> None:
            torch.save({"state_dict": tensors, "metadata": metadata}, tmp)
    else:
        def write(tmp: str) -> None:
            save_file(tensors, tmp, metadata=metadata)
    kept = (f" The checkpoint {source} is intact: once there is room, run `python "
            f"scripts/consolidate.py {source} --out {path}`." if source else "")
    atomic_write(path, write, what="the weights file", kept=kept,
                 needed=sum(t.numel() * t.element_size() for t in tensors.values()))


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith((".pth", ".pt")):
            blob = torch.load(path, map_location="cpu", weights_only=True)
            tensors, meta = blob["state_dict"], blob.get("metadata", {})
        else:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("arch", "output_dim", "hidden_dim") if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {', '.join(missing)}")
    problem = weights_metadata_problem(meta, {k: tuple(v.shape) for k, v in tensors.items()})
    if problem:  # before anything is built from it
        raise ValueError(f"{path}: {problem}")
    return tensors, meta


def encoder_from_weights(path: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str],
                         encoder_prefix: str = TARGET_PREFIX, head_prefix: str = HEAD_PREFIX,
                         assign: bool = False) -> MSNEncoder:
    """The encoder stored under ``encoder_prefix``/``head_prefix`` of a weights file, eval
    mode. ``assign``: built on the ``meta`` device and given the file's tensors (no
    initialisation, which costs seconds at ViT-H; for encoders that are only re-saved)."""
    with torch.device("meta" if assign else "cpu"):
        encoder = build_encoder(meta)
    try:
        encoder.backbone.load_state_dict(prefixed(tensors, "", encoder_prefix), strict=True,
                                         assign=assign)
        encoder.head.load_state_dict(prefixed(tensors, "", head_prefix), strict=True,
                                     assign=assign)
    except RuntimeError as e:
        raise ValueError(f"{path}: {encoder_prefix}* does not match arch {meta['arch']}: "
                         f"{' '.join(str(e).split())[:600]}") from None
    return encoder.eval()


def load_encoder(path: str, device: str | torch.device = "cpu") -> tuple[MSNEncoder, dict[str, Any]]:
    """Build the target encoder (backbone + head) from a weights file; eval mode."""
    tensors, meta = read_weights(path)
    return encoder_from_weights(path, tensors, meta).to(device), dict(meta)
