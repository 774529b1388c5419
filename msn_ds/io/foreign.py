"""``meta.init_weights`` in the formats people have: the file (or folder) is read, its format
told from its keys, and its ViT given under our timm names, with no conversion step.

* **msn_ds**: our weights file (:mod:`.weights`; ``target_encoder.*``, metadata ``arch``):
  the backbone, and the head and prototypes when the file has trained ones;
* **timm**: a ``VisionTransformer`` state dict (``patch_embed.proj.weight``,
  ``blocks.N.attn.qkv.*``), ``.safetensors`` or a torch file (read with
  ``weights_only=True``); the classifier (``head.*``) is dropped;
* **Hugging Face**: a ``ViTModel`` / ``ViTMSNModel`` folder (``config.json`` +
  ``model.safetensors``, ``pytorch_model.bin`` or shards) or one of its weight files, either
  key layout: :func:`.hf.hf_to_timm`, the one Hugging Face key map; the pooler and classifier
  are dropped;
* **DINOv2**: the ``facebookresearch/dinov2`` state dict (timm-like names, ``mask_token``,
  optionally ``register_tokens`` and chunked ``blocks.C.N.``); the mask token is dropped.

A torch file that wraps its state dict (``{"state_dict": ...}``, ``{"model": ...}``) is
unwrapped one level. Register tokens and LayerScale (``ls1.gamma``/``ls2.gamma``) are refused:
msn_ds's ViT has neither, and dropping them would change what the weights compute. Only the
backbone comes from a foreign file; the projection head and the prototypes start fresh.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .weights import HEAD_PREFIX, TARGET_PREFIX, has_trained_head, read_weights

MSN_DS, TIMM, HF, DINOV2 = "msn_ds", "timm", "Hugging Face", "DINOv2"
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2's block_chunks layout
_HF_MARK = re.compile(r"^(vit\.)?(embeddings\.patch_embeddings\.projection\.weight$|layers\.\d+\.)")
_DROPPED = {TIMM: re.compile(r"^head\."), DINOV2: re.compile(r"^mask_token$")}


class ForeignWeightsError(ValueError):
    """A file or folder ``meta.init_weights`` cannot start from; the message names it."""


@dataclass
class InitWeights:
    """What a file gives a run: ``backbone`` under timm's names, and for our own files the
    ``head`` and ``prototypes`` when trained ones are there (else ``None``)."""
    format: str
    backbone: dict[str, torch.Tensor]
    head: Optional[dict[str, torch.Tensor]] = None
    prototypes: Optional[torch.Tensor] = None
    arch: Optional[str] = None  # our files' metadata
    dropped: list[str] = field(default_factory=list)  # not part of a backbone (classifiers...)
    unexpected: list[str] = field(default_factory=list)  # no counterpart in a timm ViT
    notes: list[str] = field(default_factory=list)  # differences worth a line in the log
    heads: Optional[int] = None  # attention heads, when the file says (HF config.json)


def read_init_weights(path: str) -> InitWeights:
    """The weights at ``path`` (file or Hugging Face folder), format detected from the keys.
    Raises :class:`ForeignWeightsError` naming ``path`` and the problem."""
    if os.path.isdir(path):
        return _hf_folder(path)
    if not os.path.isfile(path):
        raise ForeignWeightsError(f"{path}: no such file or folder")
    state, metadata = _read_file(path)
    keys = list(state)
    if any(k.startswith(TARGET_PREFIX) for k in keys):
        return _ours(path)
    if any(_HF_MARK.match(k) for k in keys):
        return _hf_state(path, state)
    if "patch_embed.proj.weight" in state or any(_CHUNKED.match(k) for k in keys):
        dinov2 = ("mask_token" in state or "register_tokens" in state
                  or any(_CHUNKED.match(k) for k in keys))
        return _timm_like(path, state, DINOV2 if dinov2 else TIMM)
    shown = ", ".join(sorted(keys)[:6]) + (" ..." if len(keys) > 6 else "")
    raise ForeignWeightsError(
        f"{path}: not a ViT state dict msn_ds knows (its keys: {shown or 'none'}); accepted: "
        "an msn_ds weights file, a timm VisionTransformer state dict, a Hugging Face "
        "ViTModel/ViTMSNModel folder or weights file, a DINOv2 state dict")


def _read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict and its metadata from a safetensors or torch file (``weights_only``)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  any unreadable file: name it
        raise ForeignWeightsError(f"{path}: not a readable weights file ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]})") from None
    metadata: dict[str, str] = {}
    if isinstance(blob, dict) and not _is_state(blob):
        metadata = blob.get("metadata", {}) if isinstance(blob.get("metadata"), dict) else {}
        for key in ("state_dict", "model", "module"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not _is_state(blob):
        raise ForeignWeightsError(f"{path}: not a state dict (names -> tensors), nor one "
                                  "wrapped under state_dict/model/module")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in blob.items()}, \
        metadata


def _is_state(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                           for k, v in d.items())


def _ours(path: str) -> InitWeights:
    try:
        tensors, meta = read_weights(path)
    except (FileNotFoundError, ValueError) as e:
        raise ForeignWeightsError(str(e)) from None
    backbone = {k[len(TARGET_PREFIX):]: v for k, v in tensors.items()
                if k.startswith(TARGET_PREFIX)}
    head = prototypes = None
    if has_trained_head(meta):
        head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        prototypes = tensors.get("prototypes")
    return InitWeights(MSN_DS, backbone, head, prototypes, arch=meta["arch"])


def _timm_like(path: str, state: dict[str, torch.Tensor], fmt: str) -> InitWeights:
    refuse_extras(path, state, fmt)
    backbone, dropped = {}, []
    for key, value in state.items():
        key = _CHUNKED.sub(r"blocks.\1.", key)  # a chunk holds the blocks by global index
        if _DROPPED[fmt].match(key):
            dropped.append(key)
        else:
            backbone[key] = value
    return InitWeights(fmt, backbone, dropped=dropped)


def refuse_extras(path: str, state: dict[str, torch.Tensor], fmt: str) -> None:
    """Register tokens and LayerScale: msn_ds's ViT cannot hold them (refused, not dropped:
    without them the weights compute something else)."""
    for name in ("register_tokens", "reg_token"):
        if name in state:
            n = state[name].shape[1] if state[name].ndim == 3 else "?"
            raise ForeignWeightsError(
                f"{path}: this {fmt} ViT has {n} register tokens ({name} "
                f"{list(state[name].shape)}); msn_ds's ViT has none, so it cannot hold these "
                "weights (use the checkpoint of the same model without registers)")
    scaled = sorted(k for k in state if re.search(r"(^|\.)ls[12]\.(gamma|weight)$", k))
    if scaled:
        raise ForeignWeightsError(
            f"{path}: this {fmt} ViT uses LayerScale ({scaled[0]} {list(state[scaled[0]].shape)}"
            f" and {len(scaled) - 1} more); msn_ds's ViT has no LayerScale (timm init_values="
            "None), so it cannot hold these weights")


def _hf_state(where: str, state: dict[str, torch.Tensor]) -> InitWeights:
    from .hf import IGNORED, HFError, hf_to_timm

    unexpected: list[str] = []
    try:
        backbone = hf_to_timm(state, where, unexpected=unexpected)
    except HFError as e:  # a layer without its query, key or value
        raise ForeignWeightsError(str(e)) from None
    dropped = [k for k in state if IGNORED.match(k[len("vit."):] if k.startswith("vit.") else k)]
    return InitWeights(HF, backbone, dropped=dropped, unexpected=unexpected)


def _hf_folder(folder: str) -> InitWeights:
    from .hf import HFError, read_state

    try:
        state = read_state(folder)
    except HFError as e:
        raise ForeignWeightsError(str(e)) from None
    weights = _hf_state(folder, state)
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                cfg: Any = json.load(f)
        except (OSError, ValueError) as e:
            raise ForeignWeightsError(f"{config}: unreadable ({e})") from None
        if not isinstance(cfg, dict):
            raise ForeignWeightsError(f"{config}: not a JSON object")
        if cfg.get("model_type") not in ("vit", "vit_msn"):
            raise ForeignWeightsError(f"{config}: model_type is {cfg.get('model_type')!r}; "
                                      "a ViTModel ('vit') or ViTMSNModel ('vit_msn') is needed")
        heads = cfg.get("num_attention_heads")
        weights.heads = heads if isinstance(heads, int) and not isinstance(heads, bool) else None
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ForeignWeightsError(f"{config}: hidden_act={cfg['hidden_act']!r}; msn_ds's ViT "
                                      "uses exact GELU ('gelu')")
        from ..models.hf_keys import LAYER_NORM_EPS

        eps = cfg.get("layer_norm_eps", 1e-12)
        if isinstance(eps, (int, float)) and abs(eps - LAYER_NORM_EPS) > 1e-12:
            weights.notes.append(f"config.json's layer_norm_eps is {eps:g}, msn_ds's ViT uses "
                                 f"{LAYER_NORM_EPS:g} (a negligible difference for training)")
    return weights


def vit_shape(backbone: dict[str, torch.Tensor]) -> Optional[tuple[int, int, int]]:
    """``(patch, width, depth)`` of a timm-named ViT state dict (None: no patch embedding)."""
    proj = backbone.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    blocks = {int(m.group(1)) for k in backbone for m in [re.match(r"^blocks\.(\d+)\.", k)] if m}
    return proj.shape[-1], proj.shape[0], (max(blocks) + 1 if blocks else 0)


def listing(names: list[str], limit: int = 8) -> str:
    """``a, b, c and N more``."""
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                       else "")
