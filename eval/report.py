"""What every evaluation shares: where the features come from (``--weights``,
``--random-init`` or ``--pixels``), the weights' hash, the JSON file and TensorBoard scalars.

Results are tied to the exact weights by their sha256 (the file's, as ``sha256sum`` prints it,
truncated), so a number in a JSON file can always be traced to the file that produced it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from typing import Optional

import torch

from msn_ds.models import MSNEncoder


def sha256_file(path: str, chars: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:chars]


def representation(pixels: bool, before_norm: bool) -> str:
    return "pixels" if pixels else ("before_norm" if before_norm else "after_norm")


def add_source_args(p: argparse.ArgumentParser) -> None:
    """``--weights | --random-init | --pixels`` and the options every evaluation shares."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="safetensors weights file (msn_ds.io.weights), or a "
                                       "file converted by scripts/import_msn.py")
    src.add_argument("--random-init", metavar="ARCH", help="untrained encoder of this arch")
    src.add_argument("--pixels", action="store_true",
                     help="raw pixels in [0, 1], the floor baseline (ignores --crop/--resize)")
    p.add_argument("--root", required=True, help="dataset root holding train/ and val/")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--feature-batch-size", "--batch-size-features", type=int, default=256,
                   help="images per forward pass when extracting features")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--after-norm", action="store_true",
                   help="class token after the final LayerNorm (reference: before)")
    p.add_argument("--pixel-size", type=int, default=None,
                   help="with --pixels: resize/crop to this size (default: native size)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --random-init")
    p.add_argument("--cache-dir", default=None,
                   help="keep extracted features here, keyed by (weights, images, transform), "
                        "and reuse them in later runs")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--run-dir", default=None,
                   help="training run folder: add the results to its TensorBoard (RUN/tb)")


def check_source_args(args, positive: tuple[str, ...] = ()) -> Optional[str]:
    """Why the shared options (and the ``positive`` ones of this protocol, by attribute
    name) cannot work, or None: checked before any weight is loaded or feature extracted,
    so a typo costs no extraction and an unwritable output is known before the work."""
    sizes = {"--crop": args.crop, "--resize": args.resize,
             "--feature-batch-size": args.feature_batch_size}
    if args.pixel_size is not None:
        sizes["--pixel-size"] = args.pixel_size
    for name, value in sizes.items():
        if value <= 0:
            return f"{name} {value}: must be a positive number of pixels or images"
    if args.num_workers < 0:
        return f"--num-workers {args.num_workers}: must be 0 or more"
    for attr in positive:
        value = getattr(args, attr)
        if not (math.isfinite(value) and value > 0):
            return f"--{attr.replace('_', '-')} {value}: must be a finite number above 0"
    for flag, folder in (("--json", args.json and os.path.dirname(os.path.abspath(args.json))),
                         ("--cache-dir", args.cache_dir), ("--run-dir", args.run_dir)):
        problem = folder and unwritable(folder)
        if problem:
            return f"{flag}: {folder} {problem}"
    if args.json and os.path.isdir(args.json):
        return f"--json {args.json}: is a folder (give a file name)"
    return None


def unwritable(folder: str) -> Optional[str]:
    """Why files cannot be written in ``folder`` (created if missing), or None."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot be created ({e.strerror or e})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def build_source(args, device) -> tuple[Optional[MSNEncoder], dict]:
    """The encoder named by the source arguments (None for pixels) and its JSON description."""
    if args.weights:
        from msn_ds.io.weights import load_encoder

        encoder, meta = load_encoder(args.weights, device)
        return encoder, {"source": args.weights, "weights": os.path.abspath(args.weights),
                         "weights_sha256": sha256_file(args.weights), "arch": meta.get("arch"),
                         "step": meta.get("step"), "epoch": meta.get("epoch")}
    if args.random_init:
        torch.manual_seed(args.seed)
        encoder = MSNEncoder(args.random_init, img_size=args.crop).to(device).eval()
        return encoder, {"source": f"random init {args.random_init} (seed {args.seed})",
                         "arch": args.random_init, "init_seed": args.seed}
    return None, {"source": "pixels"}


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


def write_scalars(run_dir: str, scalars: dict[str, float], step: Optional[int | str]) -> str:
    """Add ``scalars`` to the run's TensorBoard (``RUN/tb``, next to the training curves) at
    the weights' training step (0 when unknown). Returns the log folder."""
    from torch.utils.tensorboard import SummaryWriter

    folder = os.path.join(run_dir, "tb")
    step = int(step) if step not in (None, "", "?") else 0
    with SummaryWriter(log_dir=folder) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), step)
    return folder
