"""The reference implementation's (facebookresearch/msn) checkpoints: import and export.

Its ``.pth.tar`` files (docs/method.md section 3) are a torch pickle of a dict holding
``target_encoder`` and optionally ``encoder`` (state dicts, keys prefixed ``module.`` by
DDP), ``prototypes`` ``[K, out]`` and scalars such as ``epoch``. The ViT keys are timm's
and the head's ``fc.{fc1,bn1,fc2,bn2,fc3}`` are our ``ProjectionHead``'s, so the mapping
is a prefix change. The work here is checking: the file comes from elsewhere, so it is
read with ``weights_only=True``, and every problem (wrong arch, missing keys, a truncated
file) is reported with the file name, the key and the shapes instead of a
``load_state_dict`` dump.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional

import torch

from .atomic import atomic_write
from .weights import (ANCHOR_PREFIX, ANCHOR_HEAD_PREFIX, encoder_from_weights, encoder_metadata,
                      mark_head_absent, read_weights)
from ..models import MSNEncoder, resolve_arch
from ..models.vit import VIT_SIZES

DDP_PREFIX = "module."
HEAD_KEY = "fc."


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint that cannot be imported; the message names file and cause."""


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def read_reference(path: str) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: the file is untrusted, and the reference's
    checkpoints hold only tensors, containers and numbers, so nothing else is unpickled."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such reference checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise ReferenceCheckpointError(
                f"{path}: contains pickled Python objects{what} besides tensors, containers "
                "and numbers; refusing to unpickle arbitrary objects from a checkpoint "
                "(re-save it with only tensors if you trust it)") from None
        raise ReferenceCheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
            f"{_first_line(e)}") from None
    except Exception as e:  # zip/stream errors, EOF, bad magic numbers...
        raise ReferenceCheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
            f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(obj, Mapping):
        raise ReferenceCheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if "target_encoder" not in obj:
        raise ReferenceCheckpointError(
            f"{path}: no 'target_encoder' entry (keys: {_few(list(obj))}); not an MSN checkpoint")
    return dict(obj)


def _few(keys, n: int = 5) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _split(state: Any, path: str, entry: str):
    """Backbone and head state dicts, ``module.`` stripped; ``names`` maps back to the
    file's key names for messages."""
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ReferenceCheckpointError(f"{path}: '{entry}' is not a state dict of tensors")
    backbone, head, names = {}, {}, {}
    for key, value in state.items():
        name = key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key
        if name.startswith(HEAD_KEY):
            head[name[len(HEAD_KEY):]] = value
            names["fc/" + name[len(HEAD_KEY):]] = key
        else:
            backbone[name] = value
            names[name] = key
    return backbone, head, names


def _shape(t) -> list[int]:
    return list(t.shape)


def _infer_arch(backbone: dict, path: str, entry: str) -> str:
    """``vit_{size}_{patch}`` from the embed dim, depth and patch size in the weights."""
    for key in ("cls_token", "patch_embed.proj.weight"):
        if key not in backbone:
            raise ReferenceCheckpointError(f"{path}: '{entry}' has no {DDP_PREFIX}{key}; not a ViT")
    dim, patch = backbone["cls_token"].shape[-1], backbone["patch_embed.proj.weight"].shape[-1]
    depth = _depth(backbone)
    for size, s in VIT_SIZES.items():
        if (s.embed_dim, s.depth) == (dim, depth):
            return f"vit_{size}_{patch}"
    raise ReferenceCheckpointError(
        f"{path}: no known ViT has embed dim {dim} and depth {depth}; pass the arch explicitly")


def _depth(backbone: dict) -> int:
    ids = [int(m.group(1)) for k in backbone if (m := re.match(r"blocks\.(\d+)\.", k))]
    return max(ids) + 1 if ids else 0


def _infer_img_size(backbone: dict, patch: int, path: str) -> int:
    n = backbone["pos_embed"].shape[1] - 1 if "pos_embed" in backbone else 196
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ReferenceCheckpointError(
            f"{path}: pos_embed has {n} patch entries, not a square grid")
    return side * patch


def _head_dims(head: dict, path: str, entry: str, default_out: int):
    """(hidden_dim, output_dim, use_bn, present) from the fc weights' shapes."""
    if not head:
        return 2048, default_out, True, False
    for key in ("fc1.weight", "fc3.weight"):
        if key not in head:
            raise ReferenceCheckpointError(
                f"{path}: '{entry}' has a head without {DDP_PREFIX}fc.{key}")
    return head["fc1.weight"].shape[0], head["fc3.weight"].shape[0], "bn1.weight" in head, True


def _load_checked(module: torch.nn.Module, state: dict, names: dict, prefix: str, path: str,
                  entry: str, what: str, hint: str = "") -> None:
    """``load_state_dict(strict=True)`` after checks that name keys and shapes."""
    expected = module.state_dict()
    name = lambda k: names.get(prefix + k, DDP_PREFIX + ("fc." if prefix else "") + k)  # noqa: E731
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {_few([name(k) for k in missing])}"] if missing else []) + \
                ([f"unexpected {_few([name(k) for k in unexpected])}"] if unexpected else [])
        raise ReferenceCheckpointError(
            f"{path}: '{entry}' does not match {what}: {'; '.join(parts)}")
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise ReferenceCheckpointError(
                f"{path}: '{entry}' key {name(k)} has shape {_shape(state[k])} but {what} "
                f"expects {_shape(v)}{hint if k == 'pos_embed' else ''}")
    module.load_state_dict({k: _plain(v) for k, v in state.items()}, strict=True, assign=True)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return (t.float() if t.is_floating_point() else t).contiguous()


def _build(state: Any, path: str, entry: str, arch: Optional[str], img_size: Optional[int],
           default_out: int):
    backbone, head, names = _split(state, path, entry)
    arch = arch or _infer_arch(backbone, path, entry)
    spec = resolve_arch(arch)
    # Embed dim and depth first: the clearest message for a wrong --arch.
    if "cls_token" in backbone and backbone["cls_token"].shape[-1] != spec.embed_dim:
        raise ReferenceCheckpointError(
            f"{path}: '{entry}' key {names['cls_token']} has shape "
            f"{_shape(backbone['cls_token'])} but arch {arch} expects [1, 1, {spec.embed_dim}] "
            f"(embed dim {backbone['cls_token'].shape[-1]} vs {spec.embed_dim})")
    depth = _depth(backbone)
    if depth != spec.depth:
        raise ReferenceCheckpointError(
            f"{path}: '{entry}' has {depth} blocks but arch {arch} has {spec.depth}")
    img_size = img_size or _infer_img_size(backbone, spec.patch_size, path)
    hidden, out, use_bn, has_head = _head_dims(head, path, entry, default_out)
    # On the meta device and loaded with assign=True: initialising weights that are about
    # to be overwritten costs seconds at ViT-H. Only a missing head needs a real init.
    with torch.device("meta" if has_head else "cpu"):
        enc = MSNEncoder(arch, img_size=img_size, hidden_dim=hidden, output_dim=out,
                         use_bn=use_bn)
    _load_checked(enc.backbone, backbone, names, "", path, entry, f"arch {arch}",
                  hint=f" at img_size {img_size} (wrong --img-size?)")
    if has_head:
        _load_checked(enc.head, head, names, "fc/", path, entry,
                      f"a head of hidden_dim {hidden}, output_dim {out} (from fc1, fc3)")
    return enc.eval(), img_size, hidden, out, use_bn, has_head


def load_reference(path: str, arch: Optional[str] = None, img_size: Optional[int] = None):
    """``(target, prototypes or None, anchor or None, meta)`` from a reference checkpoint.

    ``arch`` (ours or the reference's ``deit_*`` name) is inferred when omitted, ``img_size``
    from the position embedding. A checkpoint without the head gets a freshly initialised
    one (``meta['head'] == 'absent'``). ``meta`` is our weights-file metadata (strings).
    """
    ckpt = read_reference(path)
    protos = ckpt.get("prototypes")
    if protos is not None and (not isinstance(protos, torch.Tensor) or protos.dim() != 2):
        raise ReferenceCheckpointError(f"{path}: 'prototypes' is not a 2-D tensor")
    default_out = protos.shape[1] if protos is not None else 256
    target, img_size, hidden, out, use_bn, has_head = _build(
        ckpt["target_encoder"], path, "target_encoder", arch, img_size, default_out)
    if protos is not None and protos.shape[1] != out:
        raise ReferenceCheckpointError(
            f"{path}: prototypes have dim {protos.shape[1]} but the head outputs {out}")
    anchor = None
    if ckpt.get("encoder") is not None:
        anchor, _, *dims = _build(ckpt["encoder"], path, "encoder", target.spec.name, img_size,
                                  default_out)
        if tuple(dims[:3]) != (hidden, out, use_bn):
            raise ReferenceCheckpointError(
                f"{path}: 'encoder' head (hidden {dims[0]}, out {dims[1]}, bn {dims[2]}) differs "
                f"from 'target_encoder' head (hidden {hidden}, out {out}, bn {use_bn})")
    meta = encoder_metadata(target, img_size, hidden, out, use_bn)
    epoch = ckpt.get("epoch")
    if isinstance(epoch, (int, float)) or (isinstance(epoch, torch.Tensor) and epoch.numel() == 1):
        meta["epoch"] = str(int(epoch))
    if not has_head:
        mark_head_absent(meta)
    return target, (protos.detach().float().clone() if protos is not None else None), anchor, meta


def to_reference_state(encoder: MSNEncoder) -> "OrderedDict[str, torch.Tensor]":
    """Our encoder as the reference's DDP state dict: ``module.<timm key>``, ``module.fc.*``."""
    state = OrderedDict((DDP_PREFIX + k, v.detach().cpu())
                        for k, v in encoder.backbone.state_dict().items())
    state.update((DDP_PREFIX + HEAD_KEY + k, v.detach().cpu())
                 for k, v in encoder.head.state_dict().items())
    return state


def export_reference(path: str, target: MSNEncoder, prototypes: Optional[torch.Tensor],
                     anchor: Optional[MSNEncoder] = None, epoch: int = 0) -> None:
    """Write a ``.pth.tar`` the reference (and ``load_reference``) reads (:func:`atomic_write`)."""
    ckpt: dict[str, Any] = {"target_encoder": to_reference_state(target)}
    if prototypes is not None:
        ckpt["prototypes"] = prototypes.detach().cpu()
    if anchor is not None:
        ckpt["encoder"] = to_reference_state(anchor)
    ckpt["epoch"] = int(epoch)
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def read_ours(path: str):
    """``(target, prototypes or None, anchor or None, meta)`` from our weights file."""
    tensors, meta = read_weights(path)
    target = encoder_from_weights(path, tensors, meta, assign=True)  # see _build
    anchor = (encoder_from_weights(path, tensors, meta, ANCHOR_PREFIX, ANCHOR_HEAD_PREFIX,
                                   assign=True)
              if any(k.startswith(ANCHOR_PREFIX) for k in tensors) else None)
    return target, tensors.get("prototypes"), anchor, dict(meta)
