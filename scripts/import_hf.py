"""Import a Hugging Face ``ViTMSNModel`` folder (e.g. a downloaded ``facebook/vit-msn-*``
checkpoint) as our weights file.

  import_hf.py DIR --out WEIGHTS.safetensors [--seed 0]

Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read with
``weights_only=True``, or a sharded ``*.index.json``) directly: transformers is not needed
and nothing is downloaded. Both key layouts are accepted: the hub checkpoints'
(``encoder.layer.N.attention.attention.query``) and transformers 5's (``layers.N.attention.
q_proj``), with or without the ``vit.`` prefix of ``ViTMSNForImageClassification``.

The backbone becomes ``target_encoder.*`` bit for bit (q, k, v fused back into timm's qkv).
``ViTMSNModel`` has no projection head, but ``load_encoder`` and the evaluations need one:
the head is written freshly initialised (seeded, the reference's init) and the metadata says
``head=absent``, as ``scripts/import_msn.py`` does for a headless reference checkpoint. The
evaluations use the backbone only, so their results do not depend on it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from msn_ds.io.atomic import SaveError
from msn_ds.io.weights import HEAD_PREFIX, TARGET_PREFIX, write_weights
from msn_ds.models.hf_keys import BLOCK_MAP, LAYER_NORM_EPS, QKV, TOP_MAP
from msn_ds.models.vit import VIT_SIZES, resolve_arch

# transformers 5 names -> the hub checkpoints' names
V5_RENAMES = [
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
]
IGNORED = re.compile(r"^(classifier\.|embeddings\.mask_token$|pooler\.)")
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
HEAD_DEFAULTS = {"hidden_dim": 2048, "output_dim": 256, "use_bn": True}  # the paper's head


class ImportHFError(ValueError):
    """A folder that is not a ViTMSNModel we can represent; the message names file and key."""


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ImportHFError(f"{folder}: no config.json (not a transformers model folder)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ImportHFError(f"{path}: not valid JSON ({e})") from None
    if cfg.get("model_type") != "vit_msn":
        raise ImportHFError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'vit_msn'")
    want = {"hidden_act": "gelu", "qkv_bias": True, "num_channels": 3}
    for key, value in want.items():
        if cfg.get(key, value) != value:
            raise ImportHFError(f"{path}: {key}={cfg[key]!r}; msn_ds's ViT has {value!r}")
    if abs(float(cfg.get("layer_norm_eps", 1e-12)) - LAYER_NORM_EPS) > 1e-12:
        raise ImportHFError(f"{path}: layer_norm_eps={cfg.get('layer_norm_eps')}; msn_ds's ViT "
                            f"uses {LAYER_NORM_EPS} (features would differ)")
    if cfg.get("intermediate_size") != 4 * cfg.get("hidden_size", -1):
        raise ImportHFError(f"{path}: intermediate_size={cfg.get('intermediate_size')} is not 4 x "
                            f"hidden_size={cfg.get('hidden_size')} (msn_ds's MLP ratio)")
    return cfg


def arch_of(cfg: dict, where: str) -> str:
    dims = (cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("num_attention_heads"))
    for name, size in VIT_SIZES.items():
        if (size.embed_dim, size.depth, size.num_heads) == dims:
            patch = cfg.get("patch_size")
            if isinstance(patch, (list, tuple)):
                patch = patch[0] if len(set(patch)) == 1 else None
            if not isinstance(patch, int):
                raise ImportHFError(f"{where}: patch_size={cfg.get('patch_size')!r} is not square")
            return resolve_arch(f"vit_{name}_{patch}").name
    known = ", ".join(f"{n} ({s.embed_dim}/{s.depth}/{s.num_heads})" for n, s in VIT_SIZES.items())
    raise ImportHFError(f"{where}: hidden_size/num_hidden_layers/num_attention_heads = "
                        f"{'/'.join(map(str, dims))} is no msn_ds ViT size (known: {known})")


def read_state(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_read_one(os.path.join(folder, shard)))
            return state
    bin_ = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(bin_):
        return _read_one(bin_)
    raise ImportHFError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")


def _read_one(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ImportHFError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def hf_to_timm(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``ViTMSNModel``'s state dict (either layout) as our timm ViT's; q, k, v fused."""
    top = {v: k for k, v in TOP_MAP.items()}
    block = {v: k for k, v in BLOCK_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        original = key
        key = key[len("vit."):] if key.startswith("vit.") else key
        for pattern, repl in V5_RENAMES:
            key = pattern.sub(repl, key)
        if IGNORED.match(key):
            continue
        if key in top:
            out[top[key]] = value
            continue
        m = _LAYER_RE.match(key)
        name = m.group(2) if m else ""
        if m and name.startswith("attention.attention.") and name.split(".")[-1] in QKV:
            qkv.setdefault((m.group(1), m.group(3)), {})[name.split(".")[-1]] = value
        elif m and name in block:
            out[f"blocks.{m.group(1)}.{block[name]}.{m.group(3)}"] = value
        else:
            raise ImportHFError(f"{where}: unexpected tensor {original!r}")
    for (i, kind), parts in qkv.items():
        missing = [p for p in QKV if p not in parts]
        if missing:
            raise ImportHFError(f"{where}: layer {i} lacks attention.attention."
                                f"{missing[0]}.{kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in QKV], dim=0)
    return out


def import_folder(folder: str, out: str, seed: int = 0) -> dict[str, str]:
    from msn_ds.models.head import ProjectionHead
    from msn_ds.models.vit import build_vit, init_reference_

    if not os.path.isdir(folder):
        raise ImportHFError(f"{folder}: not a folder")
    cfg = read_config(folder)
    arch = arch_of(cfg, os.path.join(folder, "config.json"))
    spec = resolve_arch(arch)
    backbone = hf_to_timm(read_state(folder), folder)
    img_size = cfg.get("image_size", 224)
    if isinstance(img_size, (list, tuple)):
        if len(set(img_size)) != 1:
            raise ImportHFError(f"{folder}/config.json: image_size={img_size} is not square")
        img_size = img_size[0]
    img_size = int(img_size)
    vit = build_vit(arch, img_size=img_size, device="meta")
    try:  # keys and shapes exactly our timm ViT's, checked without allocating
        vit.load_state_dict(backbone, strict=True, assign=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ImportHFError(f"{folder}: weights do not match {arch} at {img_size} px: "
                            f"{lines[1].strip() if len(lines) > 1 else e}") from None
    torch.manual_seed(seed)
    head = ProjectionHead(spec.embed_dim, HEAD_DEFAULTS["hidden_dim"], HEAD_DEFAULTS["output_dim"],
                          use_bn=HEAD_DEFAULTS["use_bn"])
    init_reference_(head)
    tensors = {TARGET_PREFIX + k: v for k, v in backbone.items()}
    tensors.update({HEAD_PREFIX + k: v for k, v in head.state_dict().items()})
    meta = {"arch": arch, "img_size": str(img_size),
            "hidden_dim": str(HEAD_DEFAULTS["hidden_dim"]),
            "output_dim": str(HEAD_DEFAULTS["output_dim"]),
            "use_bn": str(HEAD_DEFAULTS["use_bn"]).lower(), "head": "absent",
            "source": os.path.abspath(folder), "source_format": "transformers ViTMSNModel"}
    write_weights(out, tensors, meta)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a ViTMSNModel folder (config.json + weights)")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the placeholder projection head")
    args = p.parse_args(argv)
    try:
        meta = import_folder(args.folder, args.out, args.seed)
    except (OSError, ValueError, SaveError) as e:  # full disk etc.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['arch']} at {meta['img_size']} px (target encoder; the "
          "projection head is a freshly initialised placeholder, metadata head=absent)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
