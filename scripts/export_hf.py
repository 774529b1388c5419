"""Export our weights file's target encoder to a Hugging Face ``transformers`` folder.

  export_hf.py WEIGHTS.safetensors --out DIR [--eval RESULT.json ...] [--license apache-2.0]

DIR gets what ``transformers.ViTMSNModel.from_pretrained(DIR)`` and
``AutoImageProcessor.from_pretrained(DIR)`` read:

* ``model.safetensors``: the backbone under the key names of the ``facebook/vit-msn-*``
  checkpoints (``encoder.layer.N.attention.attention.query``...; transformers 5 renames them
  on load), so transformers 4.x and 5.x load it with no missing or unexpected key (checked:
  4.40.2, 4.45.2, 5.24.0);
* ``config.json``: ``ViTMSNConfig`` (LayerNorm eps 1e-6, exact GELU, qkv bias: our ViT's);
* ``preprocessor_config.json``: our evaluation transform (short side to 256 bilinear,
  centre crop 224, ImageNet mean/std), scaled with the crop;
* ``README.md``: a model card (arch, data, epochs, few-shot results from ``--eval``, licence).

Only the backbone is exported: ``ViTMSNModel`` has no projection head or prototypes.
``last_hidden_state[:, 0]`` is our class token after the final LayerNorm, equal to msn_ds's
at the trained size and, with ``interpolate_pos_encoding=True``, at other sizes from
transformers 4.45 on (bicubic to the floored grid, as msn_ds; 4.40-4.44 scale by a factor
with a +0.1 offset: 3.6e-3 apart at 160 px in 4.40.2). Nothing here needs transformers
installed; loading the folder does (``pip install -e .[hf]``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

from msn_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from msn_ds.io.atomic import SaveError, atomic_write
from msn_ds.io.weights import TARGET_PREFIX, read_weights
from msn_ds.models import resolve_arch
from msn_ds.models.hf_keys import BLOCK_MAP, LAYER_NORM_EPS, QKV, TOP_MAP

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


class ExportError(ValueError):
    """Weights that cannot be exported; the message names the file and the key."""


def timm_to_hf(state: dict[str, torch.Tensor], where: str = "<weights>"
               ) -> dict[str, torch.Tensor]:
    """A timm ViT state dict (ours) as ``ViTMSNModel``'s; the fused qkv is split in three."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in TOP_MAP:
            out[TOP_MAP[key]] = value
            continue
        m = _BLOCK_RE.match(key)
        if m is None:
            raise ExportError(f"{where}: {TARGET_PREFIX}{key} has no ViTMSNModel counterpart")
        i, name, kind = m.groups()
        prefix = f"encoder.layer.{i}."
        if name == "attn.qkv":
            for part, chunk in zip(QKV, value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk
        elif name in BLOCK_MAP:
            out[f"{prefix}{BLOCK_MAP[name]}.{kind}"] = value
        else:
            raise ExportError(f"{where}: {TARGET_PREFIX}{key} has no ViTMSNModel counterpart")
    return out


def hf_config(arch: str, img_size: int) -> dict:
    spec = resolve_arch(arch)
    return {
        "architectures": ["ViTMSNModel"],
        "model_type": "vit_msn",
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": 4 * spec.embed_dim,
        "hidden_act": "gelu",  # exact (erf) GELU, as timm's nn.GELU
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": img_size,
        "patch_size": spec.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "torch_dtype": "float32",
    }


def preprocessor_config(crop: int = 224) -> dict:
    """Our evaluation transform (``msn_ds.data.eval_transform``): short side to
    crop x 256/224 (bilinear), centre crop, ImageNet mean/std."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": round(crop * 256 / 224)},
        "resample": 2,  # PIL bilinear
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


def trained_size(state: dict[str, torch.Tensor], patch: int, meta_size: int, where: str) -> int:
    """The image size the position embedding was trained at (its grid x patch)."""
    if "pos_embed" not in state:
        raise ExportError(f"{where}: no {TARGET_PREFIX}pos_embed (not an msn_ds weights file?)")
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    if side * side != state["pos_embed"].shape[1] - 1:
        raise ExportError(f"{where}: {TARGET_PREFIX}pos_embed has {state['pos_embed'].shape[1]} "
                          "entries: not a square grid plus a class token")
    return meta_size if meta_size // patch == side else side * patch


def read_results(paths: list[str], sha: str) -> list[dict]:
    """The ``eval.*`` JSON results; each must be for this weights file (its sha256)."""
    results = []
    for path in paths:
        try:
            with open(path) as f:
                blob = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{path}: not a readable results file ({e})") from None
        for r in blob.get("sweep", [blob]) if isinstance(blob, dict) else []:
            if not isinstance(r, dict) or "protocol" not in r:
                raise ExportError(f"{path}: not an eval.logistic/knn/linear --json result")
            if r.get("weights_sha256") and r["weights_sha256"] != sha:
                raise ExportError(f"{path}: results are for weights {r['weights_sha256']} "
                                  f"({r.get('weights')}), not for this file ({sha})")
            results.append(r)
    return results


def results_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        rep = r.get("representation", "")
        if r["protocol"] == "logistic":
            for group, s in r.get("groups", {}).items():
                std = f" ± {s['std']:.2f}" if s.get("splits", 1) > 1 else ""
                rows.append(f"| few-shot logistic, {group} (λ {r.get('lambd')}, {s.get('splits')} "
                            f"splits) | {s['mean']:.2f}{std} | {rep} |")
        elif r["protocol"] in ("knn", "linear"):
            what = f"k-NN (k {r.get('k')})" if r["protocol"] == "knn" else \
                f"linear ({r.get('epochs_trained')} epochs)"
            rows.append(f"| {what} | {r['top1']:.2f} | {rep} |")
    if not rows:
        return ""
    data = sorted({r.get("root", "?") for r in results})
    return ("| protocol | top-1 (%) | features |\n|---|---|---|\n" + "\n".join(rows)
            + f"\n\nEvaluated on: {', '.join(data)}.\n")


def model_card(meta: dict, arch: str, img_size: int, params: int, sha: str, license_: str,
               dataset: str, results: list[dict]) -> str:
    import yaml

    spec = resolve_arch(arch)
    cfg = {}
    if meta.get("config"):
        try:
            cfg = yaml.safe_load(meta["config"]) or {}
        except yaml.YAMLError:
            cfg = {}
    opt, data = cfg.get("optimization", {}), cfg.get("data", {})
    epochs = meta.get("epoch", "not recorded")
    if opt.get("epochs") and "epoch" in meta:
        epochs = f"{epochs} of {opt['epochs']}"
    dataset = dataset or (os.path.join(data.get("root_path", ""), data.get("image_folder", ""))
                          if data else "not recorded in the weights file")
    size = {"pico": "Pico", "tiny": "Ti", "small": "S", "base": "B", "large": "L",
            "huge": "H"}.get(arch.split("_")[1], arch)
    table = results_table(results)
    lines = [
        "---",
        f"license: {license_}",
        "library_name: transformers",
        "tags: [vision, vit-msn, self-supervised, msn_ds]",
        "pipeline_tag: image-feature-extraction",
        "---",
        "",
        f"# MSN ViT-{size}/{spec.patch_size} (msn_ds)",
        "",
        "A Vision Transformer pretrained with Masked Siamese Networks (Assran et al. 2022, "
        "arXiv 2204.07141) by msn_ds, exported from its target (EMA) encoder. Backbone only: "
        "the projection head and the prototypes are not part of `ViTMSNModel`.",
        "",
        "| | |", "|---|---|",
        f"| architecture | {arch}: width {spec.embed_dim}, depth {spec.depth}, "
        f"{spec.num_heads} heads, patch {spec.patch_size} |",
        f"| parameters | {params / 1e6:.1f} M |",
        f"| image size | {img_size} (other sizes: `interpolate_pos_encoding=True`) |",
        f"| pretraining data | {dataset} |",
        f"| epochs | {epochs} |",
        f"| training step | {meta.get('step', 'not recorded')} |",
        f"| mask ratio | {data.get('patch_drop', 'not recorded')} |",
        f"| source weights | sha256 {sha} |",
        f"| license | {license_} |",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoImageProcessor, ViTMSNModel",
        'processor = AutoImageProcessor.from_pretrained("THIS_FOLDER")',
        'model = ViTMSNModel.from_pretrained("THIS_FOLDER").eval()',
        'features = model(**processor(images=image, return_tensors="pt"))'
        ".last_hidden_state[:, 0]",
        "```",
        "",
        "`last_hidden_state[:, 0]` is the class token after the final LayerNorm (msn_ds's "
        "`forward_features`). The image processor is msn_ds's evaluation transform: short side "
        f"to {round(img_size * 256 / 224)} (bilinear), centre crop {img_size}, ImageNet mean/std.",
        "",
        "## Evaluation",
        "",
        table or "No results were given at export (`export_hf.py --eval RESULT.json`).",
    ]
    return "\n".join(lines) + "\n"


def write_folder_atomic(out: str, files: dict[str, bytes | str]) -> None:
    """Each file with :func:`atomic_write`: no file is ever half written (an interrupted
    export leaves some files old, some new; rerun it)."""
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        atomic_write(os.path.join(out, name), lambda tmp, data=data: _write_bytes(tmp, data))


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def export(weights: str, out: str, results_json: list[str] = (), license_: str = "apache-2.0",
           dataset: str = "") -> dict:
    from safetensors.torch import save

    from eval.report import sha256_file

    tensors, meta = read_weights(weights)
    arch = resolve_arch(meta["arch"]).name
    state = {k[len(TARGET_PREFIX):]: v for k, v in tensors.items() if k.startswith(TARGET_PREFIX)}
    if not state:
        raise ExportError(f"{weights}: no {TARGET_PREFIX}* tensors")
    img_size = trained_size(state, resolve_arch(arch).patch_size, int(meta.get("img_size", 224)),
                            weights)
    _check_against_timm(state, arch, img_size, weights)
    hf = {k: v.detach().float().contiguous().clone() for k, v in timm_to_hf(state, weights).items()}
    sha = sha256_file(weights)
    results = read_results(list(results_json), sha)
    params = sum(v.numel() for v in state.values())
    files = {
        "model.safetensors": save(hf, metadata={"format": "pt"}),
        "config.json": json.dumps(hf_config(arch, img_size), indent=2) + "\n",
        "preprocessor_config.json": json.dumps(preprocessor_config(img_size), indent=2) + "\n",
        "README.md": model_card(meta, arch, img_size, params, sha, license_, dataset, results),
    }
    write_folder_atomic(out, files)
    return {"arch": arch, "img_size": img_size, "params": params, "tensors": len(hf)}


def _check_against_timm(state: dict, arch: str, img_size: int, where: str) -> None:
    """The backbone must be exactly our timm ViT (keys and shapes), checked on ``meta``."""
    from msn_ds.models.vit import build_vit

    vit = build_vit(arch, img_size=img_size, device="meta")
    try:
        vit.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"{where}: {TARGET_PREFIX}* does not match {arch}: "
                          f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}"
                          ) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="our weights file (.safetensors)")
    p.add_argument("--out", required=True, help="folder to write (created; files replaced)")
    p.add_argument("--eval", nargs="*", default=[], metavar="JSON",
                   help="eval.logistic / eval.knn / eval.linear --json results of these weights, "
                        "for the model card")
    p.add_argument("--license", default="apache-2.0",
                   help="licence of the weights for the model card (weights derived from "
                        "facebook's MSN release are cc-by-nc-4.0)")
    p.add_argument("--dataset", default="",
                   help="pretraining data for the model card (default: the run's data folder)")
    args = p.parse_args(argv)
    try:
        info = export(args.weights, args.out, args.eval, args.license, args.dataset)
    except (OSError, ValueError, SaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: ViTMSNModel {info['arch']} at {info['img_size']} px, "
          f"{info['params'] / 1e6:.1f} M parameters ({info['tensors']} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
