"""Hugging Face ``transformers`` folders: our weights file to a ``ViTMSNModel`` folder
(:func:`export`) and back (:func:`import_folder`); ``scripts/export_hf.py`` and
``scripts/import_hf.py`` are their command lines.

**Export.** The folder gets what ``transformers.ViTMSNModel.from_pretrained(DIR)`` and
``AutoImageProcessor.from_pretrained(DIR)`` read:

* ``model.safetensors``: the backbone under the key names of the ``facebook/vit-msn-*``
  checkpoints (``encoder.layer.N.attention.attention.query``...; transformers 5 renames them
  on load), so transformers 4.x and 5.x load it with no missing or unexpected key (checked:
  4.40.2, 4.45.2, 5.24.0);
* ``config.json``: ``ViTMSNConfig`` (LayerNorm eps 1e-6, exact GELU, qkv bias: our ViT's);
* ``preprocessor_config.json``: our evaluation transform (short side to 256 bilinear,
  centre crop 224, ImageNet mean/std), scaled with the crop;
* ``README.md``: a model card (arch, data, epochs, few-shot results, licence).

Only the backbone is exported: ``ViTMSNModel`` has no projection head or prototypes.
``last_hidden_state[:, 0]`` is our class token after the final LayerNorm, equal to msn_ds's
at the trained size and, with ``interpolate_pos_encoding=True``, at other sizes from
transformers 4.45 on (bicubic to the floored grid, as msn_ds; 4.40-4.44 scale by a factor
with a +0.1 offset: 3.6e-3 apart at 160 px in 4.40.2). Nothing here needs transformers
installed; loading the folder does (``pip install -e .[hf]``).

The folder is written as a whole: its files go into a temporary folder beside it, which is
synced and renamed into place (on Linux swapped with the previous folder in one rename), so
a kill at any moment leaves the previous folder or the new one, never a mix. An existing
folder that holds files is replaced only with ``overwrite``, and only if it is an earlier
export (a ``config.json`` of ``model_type`` ``vit_msn``, no subfolders).

**Import.** Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read
with ``weights_only=True``, or a sharded ``*.index.json``) directly: transformers is not
needed and nothing is downloaded. Both key layouts are accepted: the hub checkpoints'
(``encoder.layer.N.attention.attention.query``) and transformers 5's (``layers.N.attention.
q_proj``), with or without the ``vit.`` prefix of ``ViTMSNForImageClassification``. Every
config value and index entry is checked before use (a wrong type or range names the file
and the key); shard names must stay inside the folder.

The backbone becomes ``target_encoder.*`` bit for bit (q, k, v fused back into timm's qkv).
``ViTMSNModel`` has no projection head, but ``load_encoder`` and the evaluations need one:
the head is written freshly initialised (seeded, the reference's init) and the metadata says
``head=absent``, as ``scripts/import_msn.py`` does for a headless reference checkpoint. The
evaluations use the backbone only, so their results do not depend on it.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
from typing import Any

import torch

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models import resolve_arch
from ..models.hf_keys import BLOCK_MAP, LAYER_NORM_EPS, QKV, TOP_MAP
from ..models.vit import VIT_SIZES
from .atomic import (SaveError, free_space, human_size, is_write_failure, no_space_reason,
                     release_writer, remove_path, tree_size)
from .weights import (HEAD_ABSENT, HEAD_KEY, HEAD_PREFIX, TARGET_PREFIX, read_weights,
                      write_weights)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
EXPORT_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "README.md")
MAX_SIZE = 1 << 16  # image and patch sizes above this are no real model's (and would overflow)


class HFError(ValueError):
    """A Hugging Face folder or an export that cannot be made; the message names the file
    (or folder) and the key."""


class ExportError(HFError):
    """Weights that cannot be exported, or an ``--out`` that must not be written."""


class ImportHFError(HFError):
    """A folder that is not a ViTMSNModel we can represent."""


# --------------------------------------------------------------------------------- export

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
    if not dataset and data:  # the folder's name only: a local path means nothing to a reader
        folder = os.path.normpath(os.path.join(data.get("root_path") or "",
                                               data.get("image_folder") or ""))
        dataset = (f"{os.path.basename(folder)} (the training folder's name; "
                   "`export_hf.py --dataset NAME` describes it)")
    dataset = dataset or "not recorded in the weights file"
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


def file_sha256(path: str, chars: int = 16) -> str:
    """The file's sha256 as ``sha256sum`` prints it, truncated: what the evaluations record
    as ``weights_sha256`` (``eval.report.sha256_file``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:chars]


def out_folder_problem(out: str, overwrite: bool = False) -> str | None:
    """Why ``out`` must not be written (``None``: it may). Absent or empty: fine. Holding
    files: only with ``overwrite``, and only an earlier export (a ``config.json`` of
    ``model_type`` ``vit_msn``, no subfolders): anything else could be a folder of the
    user's (``--out .``), which the whole-folder replace would remove."""
    if os.path.islink(out):
        return f"--out {out} is a symbolic link: give the folder itself"
    if not os.path.lexists(out):
        return None
    if not os.path.isdir(out):
        return f"--out {out} exists and is not a folder"
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        return f"--out {out}: cannot list the folder ({e.strerror or e})"
    if not names:
        return None
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    if not overwrite:
        return (f"--out {out} already holds files ({shown}); pass --overwrite to replace the "
                "folder as a whole, or choose a new folder")
    subfolders = [n for n in names if os.path.isdir(os.path.join(out, n))]
    if subfolders:
        return (f"--out {out} --overwrite: the folder holds subfolders ({', '.join(subfolders[:5])}"
                "), so it is not an earlier export; refusing to replace it")
    config = os.path.join(out, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "vit_msn":
        return (f"--out {out} --overwrite: the folder is not an earlier export (no config.json "
                "of model_type vit_msn); refusing to replace its files")
    return None


def write_folder(out: str, files: dict[str, bytes | str], overwrite: bool = False) -> None:
    """``files`` (name -> content) as the folder ``out``, written as a whole: into a new
    temporary folder beside ``out``, each file synced, then renamed into place. A previous
    folder (allowed by :func:`out_folder_problem`) is swapped out in one rename where the
    file system can (Linux ``renameat2``), else moved aside and removed. A full disk is a
    :class:`SaveError`; the previous folder is then untouched."""
    problem = out_folder_problem(out, overwrite)
    if problem:
        raise ExportError(problem)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(out)
    needed = sum(len(c.encode() if isinstance(c, str) else c) for c in files.values())
    tmp = _temp_name(out)
    os.mkdir(tmp, 0o777)  # the mode the umask gives, as any folder the user makes
    try:
        for name, content in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
    except Exception as e:
        release_writer(e)
        written = tree_size(tmp)
        remove_path(tmp)
        reason = no_space_reason(e, parent, max(needed, written))
        if reason is None and not is_write_failure(e):
            raise
        raise SaveError(
            f"cannot write the export folder {out}: "
            + (f"{reason} (needs about {human_size(needed)}; {human_size(free_space(parent))} "
               "available)" if reason else f"{type(e).__name__}: {e}")
            + ". Nothing was replaced (the temporary folder was removed).") from None
    except BaseException:  # Ctrl-C: the previous folder stays, the temporary goes
        remove_path(tmp)
        raise
    try:
        if os.path.isdir(out) and os.listdir(out):
            if not _exchange(tmp, out):  # two renames: a kill between leaves both, named
                aside = _temp_name(out, ".old")
                os.rename(out, aside)
                try:
                    os.rename(tmp, out)
                except OSError:
                    os.rename(aside, out)
                    raise
                os.rename(aside, tmp)
        else:  # absent, or an empty folder (which rename replaces)
            os.replace(tmp, out)
        _fsync_dir(parent)
    finally:
        remove_path(tmp)  # the previous folder, swapped out (or the new one, if not placed)


_TEMP_RE = r"\.(\d+)\.[0-9a-f]{8}\.tmp(\.old)?$"


def _temp_name(out: str, suffix: str = "") -> str:
    return f"{os.path.abspath(out)}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"


def _remove_stale_temps(out: str) -> None:
    """Temporary folders an export to ``out`` killed with SIGKILL left behind (their process
    is gone)."""
    parent, base = os.path.split(os.path.abspath(out))
    pattern = re.compile(re.escape(base) + _TEMP_RE)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            remove_path(os.path.join(parent, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one rename (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    C library or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), b)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def export(weights: str, out: str, results_json: list[str] = (), license_: str = "apache-2.0",
           dataset: str = "", overwrite: bool = False) -> dict:
    """Our weights file ``weights`` as the ``ViTMSNModel`` folder ``out`` (see the module's
    docstring); ``results_json``: ``eval.*`` results of these weights for the model card.
    Raises :class:`ExportError` (or ``ValueError``/``OSError`` for an unreadable file,
    :class:`SaveError` for a full disk)."""
    from safetensors.torch import save

    problem = out_folder_problem(out, overwrite)  # before any work
    if problem:
        raise ExportError(problem)
    tensors, meta = read_weights(weights)
    arch = resolve_arch(meta["arch"]).name
    state = {k[len(TARGET_PREFIX):]: v for k, v in tensors.items() if k.startswith(TARGET_PREFIX)}
    if not state:
        raise ExportError(f"{weights}: no {TARGET_PREFIX}* tensors")
    try:
        meta_size = int(meta.get("img_size", 224))
    except ValueError:
        raise ExportError(f"{weights}: metadata img_size={meta['img_size']!r} is not an "
                          "integer") from None
    img_size = trained_size(state, resolve_arch(arch).patch_size, meta_size, weights)
    _check_against_timm(state, arch, img_size, weights)
    hf = {k: v.detach().float().contiguous().clone() for k, v in timm_to_hf(state, weights).items()}
    sha = file_sha256(weights)
    results = read_results(list(results_json), sha)
    params = sum(v.numel() for v in state.values())
    files = {
        "model.safetensors": save(hf, metadata={"format": "pt"}),
        "config.json": json.dumps(hf_config(arch, img_size), indent=2) + "\n",
        "preprocessor_config.json": json.dumps(preprocessor_config(img_size), indent=2) + "\n",
        "README.md": model_card(meta, arch, img_size, params, sha, license_, dataset, results),
    }
    write_folder(out, files, overwrite)
    return {"arch": arch, "img_size": img_size, "params": params, "tensors": len(hf)}


def _check_against_timm(state: dict, arch: str, img_size: int, where: str) -> None:
    """The backbone must be exactly our timm ViT (keys and shapes), checked on ``meta``."""
    from ..models.vit import build_vit

    vit = build_vit(arch, img_size=img_size, device="meta")
    try:
        vit.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"{where}: {TARGET_PREFIX}* does not match {arch}: "
                          f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}"
                          ) from None


# --------------------------------------------------------------------------------- import

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


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImportHFError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ImportHFError(f"{path}: unreadable ({e.strerror or e})") from None


def _positive_int(cfg: dict, key: str, where: str, required: bool = True,
                  default: int | None = None, allow_square_list: bool = False,
                  maximum: int | None = None) -> int:
    """``cfg[key]`` as a positive int (``allow_square_list``: also ``[n, n]``)."""
    if key not in cfg:
        if required:
            raise ImportHFError(f"{where}: no {key} (a ViTMSNConfig names it)")
        return default
    value = cfg[key]
    if allow_square_list and isinstance(value, list) and value:
        if len(set(map(repr, value))) != 1:
            raise ImportHFError(f"{where}: {key}={value!r} is not square")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImportHFError(f"{where}: {key}={cfg[key]!r} is not an integer")
    if value <= 0 or (maximum is not None and value > maximum):
        raise ImportHFError(f"{where}: {key}={cfg[key]!r} must be "
                            + (f"from 1 to {maximum}" if maximum else "positive"))
    return value


def read_config(folder: str) -> dict:
    """``config.json``, checked: a ``vit_msn`` config msn_ds's ViT can represent. The sizes
    come back as ints (``patch_size``/``image_size`` lists of equal values unpacked)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ImportHFError(f"{folder}: no config.json (not a transformers model folder)")
    cfg = _load_json(path)
    if not isinstance(cfg, dict):
        raise ImportHFError(f"{path}: a {type(cfg).__name__}, not a JSON object")
    if cfg.get("model_type") != "vit_msn":
        raise ImportHFError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'vit_msn'")
    sizes = {key: _positive_int(cfg, key, path) for key in
             ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    sizes["patch_size"] = _positive_int(cfg, "patch_size", path, allow_square_list=True,
                                        maximum=MAX_SIZE)
    sizes["image_size"] = _positive_int(cfg, "image_size", path, required=False, default=224,
                                        allow_square_list=True, maximum=MAX_SIZE)
    if sizes["image_size"] < sizes["patch_size"]:
        raise ImportHFError(f"{path}: image_size={cfg.get('image_size')!r} is smaller than "
                            f"patch_size={cfg['patch_size']!r}")
    want = {"hidden_act": "gelu", "qkv_bias": True, "num_channels": 3}
    for key, value in want.items():
        if key in cfg and (cfg[key] != value or type(cfg[key]) is not type(value)):
            raise ImportHFError(f"{path}: {key}={cfg[key]!r}; msn_ds's ViT has {value!r}")
    eps = cfg.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ImportHFError(f"{path}: layer_norm_eps={eps!r} is not a number")
    if abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise ImportHFError(f"{path}: layer_norm_eps={eps}; msn_ds's ViT "
                            f"uses {LAYER_NORM_EPS} (features would differ)")
    if sizes["intermediate_size"] != 4 * sizes["hidden_size"]:
        raise ImportHFError(f"{path}: intermediate_size={sizes['intermediate_size']} is not 4 x "
                            f"hidden_size={sizes['hidden_size']} (msn_ds's MLP ratio)")
    return {**cfg, **sizes}


def arch_of(cfg: dict, where: str) -> str:
    """The msn_ds arch of a config :func:`read_config` checked."""
    dims = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"])
    for name, size in VIT_SIZES.items():
        if (size.embed_dim, size.depth, size.num_heads) == dims:
            try:
                return resolve_arch(f"vit_{name}_{cfg['patch_size']}").name
            except ValueError as e:
                raise ImportHFError(f"{where}: patch_size={cfg['patch_size']}: {e}") from None
    known = ", ".join(f"{n} ({s.embed_dim}/{s.depth}/{s.num_heads})" for n, s in VIT_SIZES.items())
    raise ImportHFError(f"{where}: hidden_size/num_hidden_layers/num_attention_heads = "
                        f"{'/'.join(map(str, dims))} is no msn_ds ViT size (known: {known})")


def shard_path(folder: str, index: str, shard: Any) -> str:
    """Where shard ``shard`` of ``index`` lies: a relative path inside ``folder`` (a name
    with ``..``, an absolute path or a drive would read a file from elsewhere)."""
    if not isinstance(shard, str) or not shard.strip():
        raise ImportHFError(f"{index}: weight_map value {shard!r} is not a file name")
    parts = re.split(r"[\\/]", shard)
    if (os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts
            or re.match(r"^[A-Za-z]:", shard) or "\0" in shard):
        raise ImportHFError(f"{index}: weight_map names the shard {shard!r}, outside the "
                            "folder; shards must be files inside it")
    return os.path.join(folder, shard)


def read_state(folder: str) -> dict[str, torch.Tensor]:
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return _read_one(single)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, name)
        if os.path.isfile(index):
            blob = _load_json(index)
            if not isinstance(blob, dict) or "weight_map" not in blob:
                raise ImportHFError(f"{index}: no weight_map (not a shard index)")
            weight_map = blob["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ImportHFError(f"{index}: weight_map is a {type(weight_map).__name__}"
                                    + ("" if weight_map else " with no entry")
                                    + ", not an object of tensor name -> shard file")
            paths = {shard_path(folder, index, s) for s in weight_map.values()}
            state = {}
            for path in sorted(paths):
                state.update(_read_one(path))
            return state
    bin_ = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(bin_):
        return _read_one(bin_)
    raise ImportHFError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index")


def _read_one(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  any unreadable file: name it
        raise ImportHFError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ImportHFError(f"{path}: not a state dict (names -> tensors)")
    return state


def hf_to_timm(state: dict[str, torch.Tensor], where: str,
               unexpected: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``ViTMSNModel``'s (or ``ViTModel``'s) state dict, either layout, as our timm ViT's;
    q, k, v fused. A tensor with no timm counterpart is an error, or, given ``unexpected``,
    appended to it (``meta.init_weights`` lists them)."""
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
        elif unexpected is not None:
            unexpected.append(original)
        else:
            raise ImportHFError(f"{where}: unexpected tensor {original!r}")
    for (i, kind), parts in qkv.items():
        missing = [p for p in QKV if p not in parts]
        if missing:
            raise ImportHFError(f"{where}: layer {i} lacks attention.attention."
                                f"{missing[0]}.{kind}")
        shapes = {tuple(parts[p].shape[1:]) for p in QKV}
        if len(shapes) != 1:
            raise ImportHFError(f"{where}: layer {i}'s query, key and value {kind}es differ in "
                                "shape")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in QKV], dim=0)
    return out


def import_folder(folder: str, out: str, seed: int = 0) -> dict[str, str]:
    """The ``ViTMSNModel`` folder ``folder`` as our weights file ``out`` (see the module's
    docstring). Raises :class:`ImportHFError` (:class:`SaveError` for a full disk)."""
    from ..models.head import ProjectionHead
    from ..models.vit import build_vit, init_reference_

    if not os.path.isdir(folder):
        raise ImportHFError(f"{folder}: not a folder")
    cfg = read_config(folder)
    arch = arch_of(cfg, os.path.join(folder, "config.json"))
    spec = resolve_arch(arch)
    backbone = hf_to_timm(read_state(folder), folder)
    img_size = cfg["image_size"]
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
            "use_bn": str(HEAD_DEFAULTS["use_bn"]).lower(), HEAD_KEY: HEAD_ABSENT,
            "source": os.path.abspath(folder), "source_format": "transformers ViTMSNModel"}
    write_weights(out, tensors, meta)
    return meta
