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

import errno
import gc
import os
import re
import secrets
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models import MSNEncoder
from .safe_load import (FORCE_ENV, CheckpointError, checkpoint_files, restricted_loads, safe_load,
                        scan)

TARGET_PREFIX = "target_encoder."
HEAD_PREFIX = "target_head."
ANCHOR_PREFIX = "anchor_encoder."
ANCHOR_HEAD_PREFIX = "anchor_head."


def encoder_metadata(encoder: MSNEncoder, img_size: int, hidden_dim: int, output_dim: int,
                     use_bn: bool) -> dict[str, str]:
    return {"arch": encoder.spec.name, "img_size": str(img_size), "hidden_dim": str(hidden_dim),
            "output_dim": str(output_dim), "use_bn": str(use_bn).lower()}


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


def prefixed(state: dict[str, torch.Tensor], prefix: str, strip: str = "") -> dict[str, torch.Tensor]:
    """``{prefix + key[len(strip):]}`` for the keys that start with ``strip``."""
    return {prefix + k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}


def save_weights(path: str, target: MSNEncoder, prototypes: Optional[torch.Tensor],
                 metadata: dict[str, str], anchor: Optional[MSNEncoder] = None) -> None:
    write_weights(path, weights_tensors(target, prototypes, anchor), metadata)


def write_weights(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  source: Optional[str] = None) -> None:
    """Write safetensors (or, for a ``.pth`` path, a torch file holding ``state_dict`` and
    ``metadata``) atomically: temporary file, then rename. The file gets the mode the umask
    gives (weights are shared). A full disk is a :class:`SaveError` saying how much space was
    needed and is free; nothing is left behind (``source``: the checkpoint to name in it)."""
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
               for k, v in tensors.items()}
    metadata = {k: str(v) for k, v in metadata.items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _create_temp(path)
    mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask
    try:
        if path.endswith((".pth", ".pt")):
            torch.save({"state_dict": tensors, "metadata": metadata}, tmp)
        else:
            save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # safetensors (0.8) writes its files 0600 whatever the umask
        os.replace(tmp, path)
    except Exception as e:
        _release(e)
        written = _tree_size(tmp)
        _remove(tmp)
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        reason = _no_space_reason(e, folder, max(needed, written))
        if reason is None and not _is_write_failure(e):
            raise
        kept = (f" The checkpoint {source} is intact: once there is room, run `python "
                f"scripts/consolidate.py {source} --out {path}`." if source else "")
        raise SaveError(
            f"cannot write the weights file {path}: "
            + (f"{reason} (needs about {_size(needed)}; {_size(_free(folder))} available)"
               if reason else f"{type(e).__name__}: {e}")
            + f". Nothing was written (the temporary file was removed).{kept}") from None
    finally:
        _remove(tmp)


def _create_temp(path: str) -> str:
    """A new empty file beside ``path``, created with mode ``0666 & ~umask`` (``mkstemp``
    makes it 0600, and the rename would keep that)."""
    while True:
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


class SaveError(RuntimeError):
    """A save that failed (a full disk, most often); the message says which path, why, how
    much space it needed, and what was kept."""


_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file system"}


def _errno_of(e: BaseException) -> Optional[int]:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    m = re.search(r"os error (\d+)", str(e))  # safetensors (Rust) words it so
    return int(m.group(1)) if m else None


def _is_write_failure(e: BaseException) -> bool:
    """An I/O error, or torch's zip writer failing (which names no errno: ``[enforce fail at
    inline_container.cc] unexpected pos``, ``PytorchStreamWriter failed writing``)."""
    return isinstance(e, OSError) or _errno_of(e) is not None or bool(re.search(
        r"inline_container|PytorchStreamWriter|unexpected pos|file write failed", str(e)))


def _no_space_reason(e: BaseException, folder: str, needed: int) -> Optional[str]:
    """Why a failed write ran out of space, or None when it did not. With no errno (torch's
    writer), the file system's free space or the process's file-size limit decides."""
    import resource

    code = _errno_of(e)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    over_limit = limit != resource.RLIM_INFINITY and limit < needed
    if code not in (None, errno.EFBIG) or (code is None and not _is_write_failure(e)):
        return _NO_SPACE.get(code)
    if over_limit:
        return f"the process's file-size limit (ulimit -f) of {_size(limit)} was reached"
    if code == errno.EFBIG:
        return _NO_SPACE[code]
    if _free(folder) < needed:
        return "no space left on the device"
    return None


def _release(e: BaseException) -> None:
    """Drop the failed writer's frames: until then torch's zip writer keeps the file open,
    and a removed file's space is not given back."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # the writer sits in a chained exception's frames
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__context__
    gc.collect()


def _free(folder: str) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


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


# --------------------------------------------------------------------------------------
# Training checkpoints (DeepSpeed): atomic save, keep-last-K, resume
# --------------------------------------------------------------------------------------
LATEST = "latest"
_TAG_RE = re.compile(r"^global_step(\d+)$")
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_...
# keys that must agree between a checkpoint and the run that resumes it
RESUME_KEYS = [("meta", "model_name"), ("meta", "hidden_dim"), ("meta", "output_dim"),
               ("meta", "use_bn"), ("criterion", "num_proto"), ("data", "rand_size"),
               ("meta", "seed")]


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def model_states_file(tag_dir: str) -> Optional[str]:
    """DeepSpeed's rank-0 model-states file in a checkpoint folder, whatever the stage."""
    for name in (MODEL_STATES, "zero_pp_rank_0_" + MODEL_STATES):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    return None


def complete_tags(folder: str) -> list[tuple[int, str]]:
    """``(step, tag)`` of the finished checkpoints in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _TAG_RE.match(name)
        if m and model_states_file(os.path.join(folder, name)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def rank_file(rank: int) -> str:
    return f"msn_rank{rank}.pt"


def save_training_checkpoint(engine, folder: str, step: int, client_state: dict,
                             keep_last: int = 3, rank_state: Optional[dict] = None) -> str:
    """Save ``global_step{step}`` so that a kill at any moment leaves the previous checkpoint
    and the ``latest`` pointer valid.

    Every process writes into ``global_step{step}.partial``; once all have finished, rank 0
    renames it (the commit point), then rewrites ``latest`` atomically (temporary file +
    rename) and prunes all but the newest ``keep_last``. A resume never looks at ``.partial``
    folders.

    A write that fails (a full disk) removes the ``.partial`` and raises :class:`SaveError`
    naming the path, the space needed and available, and the checkpoint that is kept. (With
    several processes, one that fails alone leaves the others waiting at DeepSpeed's barrier;
    a full shared file system fails them all.)
    """
    import torch.distributed as dist

    from ..distributed import barrier, is_main

    tag = f"global_step{step}"
    partial = os.path.join(folder, tag + ".partial")
    if is_main():
        os.makedirs(folder, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    try:
        engine.save_checkpoint(folder, tag=tag + ".partial", client_state={"msn": client_state},
                               save_latest=False)  # ends with a barrier: every rank has written
        if rank_state is not None:  # this process's share of state DeepSpeed does not hold
            me = dist.get_rank() if dist.is_initialized() else 0
            torch.save(rank_state, os.path.join(partial, rank_file(me)))
    except Exception as e:
        if not _is_write_failure(e):
            raise
        raise _save_failed(e, folder, tag, partial) from None
    if rank_state is not None:
        barrier()
    if is_main():
        final = os.path.join(folder, tag)
        stale = final + ".stale"
        if os.path.isdir(final):  # the same step saved again (e.g. after a resume)
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final, stale)
        os.rename(partial, final)
        try:
            _atomic_write_text(os.path.join(folder, LATEST), tag)
        except OSError as e:  # the checkpoint is complete; the pointer still names a valid one
            raise SaveError(f"{final} was saved, but {os.path.join(folder, LATEST)} could not be "
                            f"updated ({e}); it still names the previous checkpoint") from None
        shutil.rmtree(stale, ignore_errors=True)
        for _, old in complete_tags(folder)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
            shutil.rmtree(os.path.join(folder, old + ".universal"), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return os.path.join(folder, tag)


def _save_failed(e: BaseException, folder: str, tag: str, partial: str) -> SaveError:
    """Remove the partial save and say why it failed, what it needed, and what is kept."""
    _release(e)
    written = _tree_size(partial)
    _remove(partial)
    previous = [t for _, t in complete_tags(folder) if t != tag]
    if previous:
        needed = max(_tree_size(os.path.join(folder, previous[-1])), written)
        need = f"needs about {_size(needed)}, the size of {previous[-1]}"
        kept = (f"The previous checkpoint {os.path.join(folder, previous[-1])} is intact and "
                f"resumable (--resume).")
    else:
        needed = written + 1
        need = f"needs more than the {_size(written)} written before it failed"
        kept = "There is no earlier checkpoint in this folder."
    reason = _no_space_reason(e, folder, needed)
    what = (f"{reason} ({need}; {_size(_free(folder))} available)" if reason
            else f"{type(e).__name__}: {e}")
    return SaveError(f"cannot save checkpoint {os.path.join(folder, tag)}: {what}. {kept} "
                     f"The partial save {partial} was removed.")


def find_checkpoint(path: str) -> tuple[str, str]:
    """``(load_dir, tag)`` for a checkpoint folder (``.../global_stepN``) or a run folder
    (its ``latest`` pointer; if that is missing or dangling, the newest complete one)."""
    path = os.path.normpath(path)
    if model_states_file(path):
        return os.path.dirname(path) or ".", os.path.basename(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            tag = f.read().strip()
        if model_states_file(os.path.join(path, tag)):
            return path, tag
    tags = complete_tags(path)
    if not tags:
        raise CheckpointError(f"no complete checkpoint (global_stepN/{MODEL_STATES}) in {path}")
    return path, tags[-1][1]


def read_model_states(load_dir: str, tag: str) -> dict:
    """DeepSpeed's model-states file (our client state under ``msn``), read without
    unpickling objects."""
    path = model_states_file(os.path.join(load_dir, tag)) or os.path.join(load_dir, tag, MODEL_STATES)
    try:
        states = safe_load(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({e})") from None
    if "msn" not in states:
        raise CheckpointError(f"{path}: not an msn_ds checkpoint (no 'msn' client state)")
    return states


def check_compatible(state: dict, cfg: dict, world_size: int, where: str) -> None:
    """The model, the seed and the *global* batch must match: with the global batch fixed, a
    step means the same images at any world size, so the schedules and the data order carry
    over when the number of processes changes."""
    import yaml

    saved = yaml.safe_load(state["config"])
    for section, key in RESUME_KEYS:
        if saved[section][key] != cfg[section][key]:
            raise CheckpointError(f"{where}: saved with {section}.{key}={saved[section][key]!r}, "
                                  f"this run has {cfg[section][key]!r}")
    old = saved["criterion"]["batch_size"] * state["world_size"]
    new = cfg["criterion"]["batch_size"] * world_size
    if old != new:
        raise CheckpointError(
            f"{where}: saved with a global batch of {old} ({state['world_size']} processes x "
            f"{saved['criterion']['batch_size']}); this run has {new} ({world_size} x "
            f"{cfg['criterion']['batch_size']}): set criterion.batch_size={old // world_size}"
            if old % world_size == 0 else f"{where}: global batch {old} cannot be split over "
            f"{world_size} processes")


@dataclass
class ResumePlan:
    load_dir: str
    tag: str
    state: dict  # our client state
    saved_world_size: int

    @property
    def where(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def plan_resume(path: str, cfg: dict, world_size: int, ds_config: dict) -> ResumePlan:
    """Find and check the checkpoint before the engine exists. At another world size a ZeRO
    checkpoint is first converted to DeepSpeed's universal format (rank 0, once; every
    process waits) and ``ds_config`` is told to load it."""
    from ..distributed import barrier, is_main

    load_dir, tag = find_checkpoint(path)
    where = os.path.join(load_dir, tag)
    state = read_model_states(load_dir, tag)["msn"]
    check_compatible(state, cfg, world_size, where)
    scan(checkpoint_files(where))  # every process, before any of them loads anything
    plan = ResumePlan(load_dir, tag, state, state["world_size"])
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if state["world_size"] == world_size or stage == 0:
        return plan  # a ZeRO-0 checkpoint holds whole tensors: any world size loads it
    universal = where + ".universal"
    if is_main() and not model_states_file(universal):
        _convert_to_universal(where, universal, world_size)
    barrier()
    scan(checkpoint_files(universal))  # one converted before, or put there by someone else
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    plan.tag = os.path.basename(universal)
    return plan


def _convert_to_universal(where: str, universal: str, world_size: int) -> None:
    """DeepSpeed's ``ds_to_universal`` through ``msn_ds.io.to_universal``, which restricts its
    unpickling (it reads every optimizer-state file); written to ``.tmp``, then renamed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, FORCE_ENV: "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "msn_ds.io.to_universal", "--input_folder", where,
           "--output_folder", universal + ".tmp", "--inject_missing_state"]
    shutil.rmtree(universal + ".tmp", ignore_errors=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        shutil.rmtree(universal + ".tmp", ignore_errors=True)
        errors = [line[len("error: "):] for line in r.stderr.splitlines()
                  if line.startswith("error: ")]
        if r.returncode == 2 and errors:
            raise CheckpointError(errors[-1])
        raise CheckpointError(f"{where}: conversion to the universal format for "
                              f"{world_size} processes failed: {r.stderr[-2000:]}")
    os.replace(universal + ".tmp", universal)


def load_training_checkpoint(engine, plan: ResumePlan) -> tuple[dict, list[dict]]:
    """Restore the engine (weights, optimiser); return our client state and the per-process
    states saved beside it (the target's slices under ZeRO-3): this process's own when the
    world size is unchanged, every process's otherwise (to be re-sliced)."""
    from ..distributed import rank, world_size

    try:
        with restricted_loads():  # DeepSpeed unpickles in full otherwise
            loaded, _ = engine.load_checkpoint(plan.load_dir, tag=plan.tag,
                                               load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{plan.where}: DeepSpeed could not load it "
                              f"({type(e).__name__}: {e})") from None
    if loaded is None:
        raise CheckpointError(f"{plan.where}: DeepSpeed found nothing to load")
    original = plan.where[:-len(".universal")] if plan.tag.endswith(".universal") else plan.where
    ranks = [rank()] if plan.saved_world_size == world_size() else range(plan.saved_world_size)
    files = [os.path.join(original, rank_file(r)) for r in ranks]
    if not os.path.isfile(files[0]):
        return plan.state, []
    try:
        return plan.state, [safe_load(f) for f in files]
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{original}: unreadable per-process state ({e})") from None


def consolidate(path: str, out: str) -> dict[str, str]:
    """One weights file from a training checkpoint (any ZeRO stage, no GPU needed).

    The target encoder comes from our client state (full fp32, replicated on every
    process); the anchor encoder and the prototypes from DeepSpeed's fp32 master weights
    (``get_fp32_state_dict_from_zero_checkpoint`` under ZeRO, the module state otherwise).
    """
    import yaml

    load_dir, tag = find_checkpoint(path)
    where = os.path.join(load_dir, tag)
    states = read_model_states(load_dir, tag)
    state = states["msn"]
    stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    scan(checkpoint_files(where))
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            with restricted_loads():  # zero_to_fp32 unpickles in full otherwise
                module = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{where}: cannot gather the ZeRO-{stage} shards "
                                  f"({type(e).__name__}: {e})") from None
    else:
        module = states["module"]
    cfg = yaml.safe_load(state["config"])
    target = state.get("target_encoder")
    if target is None:  # ZeRO-3: every process saved its slices of the fp32 target
        from ..ema import assemble_slices

        files = [os.path.join(where, rank_file(r)) for r in range(state["world_size"])]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{where}: target-encoder slices missing: {missing[0]}")
        try:
            target = assemble_slices([safe_load(f) for f in files])
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{where}: unreadable target-encoder slices ({e})") from None
    tensors = prefixed(target, TARGET_PREFIX, "backbone.")
    tensors.update(prefixed(target, HEAD_PREFIX, "head."))
    tensors.update(prefixed(module, ANCHOR_PREFIX, "encoder.backbone."))
    tensors.update(prefixed(module, ANCHOR_HEAD_PREFIX, "encoder.head."))
    tensors["prototypes"] = module["prototypes.weight"]
    from ..models import resolve_arch
    meta = {"arch": resolve_arch(cfg["meta"]["model_name"]).name,
            "img_size": cfg["data"]["rand_size"], "hidden_dim": cfg["meta"]["hidden_dim"],
            "output_dim": cfg["meta"]["output_dim"], "use_bn": str(cfg["meta"]["use_bn"]).lower(),
            "step": state["step"], "epoch": state["epoch"], "config": state["config"],
            "source": where, "zero_stage": stage}
    write_weights(out, tensors, meta, source=where)
    return {k: str(v) for k, v in meta.items()}
