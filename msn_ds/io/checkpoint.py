"""DeepSpeed training checkpoints: atomic save, keep-last-K, resume, and their consolidation
into the one-file weights we share (:mod:`.weights`)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from ..deepspeed_config import zero_stage
from .atomic import (SaveError, atomic_write, free_space, human_size, is_write_failure,
                     no_space_reason, release_writer, remove_path, tree_size)
from .safe_load import (FORCE_ENV, CheckpointError, checkpoint_files, restricted_loads, safe_load,
                        scan)
from .weights import (ANCHOR_HEAD_PREFIX, ANCHOR_PREFIX, HEAD_PREFIX, TARGET_PREFIX,
                      encoder_metadata, prefixed, write_weights)

LATEST = "latest"
_TAG_RE = re.compile(r"^global_step(\d+)$")
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_...
# keys that must agree between a checkpoint and the run that resumes it
RESUME_KEYS = [("meta", "model_name"), ("meta", "hidden_dim"), ("meta", "output_dim"),
               ("meta", "use_bn"), ("criterion", "num_proto"), ("data", "rand_size"),
               ("meta", "seed")]


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


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
        m = _TAG_RE.match(name)  # a linked-in folder is another run's, not one of ours
        if (m and model_states_file(os.path.join(folder, name))
                and not os.path.islink(os.path.join(folder, name))):
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
        if not is_write_failure(e):
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
            atomic_write(os.path.join(folder, LATEST), lambda tmp: _write_text(tmp, tag),
                         what="the pointer")
        except (OSError, SaveError) as e:  # the checkpoint is complete; the pointer names a valid one
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
    release_writer(e)
    written = tree_size(partial)
    remove_path(partial)
    previous = [t for _, t in complete_tags(folder) if t != tag]
    if previous:
        needed = max(tree_size(os.path.join(folder, previous[-1])), written)
        need = f"needs about {human_size(needed)}, the size of {previous[-1]}"
        kept = (f"The previous checkpoint {os.path.join(folder, previous[-1])} is intact and "
                f"resumable (--resume).")
    else:
        needed = written + 1
        need = f"needs more than the {human_size(written)} written before it failed"
        kept = "There is no earlier checkpoint in this folder."
    reason = no_space_reason(e, folder, needed)
    what = (f"{reason} ({need}; {human_size(free_space(folder))} available)" if reason
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
        home = os.path.realpath(path)
        named = os.path.realpath(os.path.join(path, tag.replace("\0", "")))
        linked = os.path.dirname(os.path.realpath(pointer)) != home
        if linked or os.path.dirname(named) != home and named != home:
            raise CheckpointError(  # another run's checkpoint, resumed as if it were ours
                f"{pointer} = {tag!r} points outside {path}"
                + (f" (it is a symbolic link to {os.readlink(pointer)})" if linked else "")
                + ": refusing to resume another folder's checkpoint from it. Write the "
                "name of a checkpoint of this folder (global_stepN) into it, or remove it.")
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


def check_compatible(state: dict, cfg: dict, world_size: int, where: str,
                     accumulation: tuple[int, int] = (1, 1)) -> None:
    """The model, the seed and the *global* batch must match: with the global batch fixed, a
    step means the same images at any world size, so the schedules and the data order carry
    over when the number of processes changes. ``accumulation``: the saved and this run's
    ``gradient_accumulation_steps`` (a factor of the global batch)."""
    import yaml

    saved = yaml.safe_load(state["config"])
    for section, key in RESUME_KEYS:
        if saved[section][key] != cfg[section][key]:
            raise CheckpointError(f"{where}: saved with {section}.{key}={saved[section][key]!r}, "
                                  f"this run has {cfg[section][key]!r}")
    (was_accum, accum), per = accumulation, world_size * accumulation[1]
    old = saved["criterion"]["batch_size"] * state["world_size"] * was_accum
    new = cfg["criterion"]["batch_size"] * world_size * accum
    times = (lambda a: f" x {a} accumulated" if a > 1 else "")
    if old != new:
        raise CheckpointError(
            f"{where}: saved with a global batch of {old} ({state['world_size']} processes x "
            f"{saved['criterion']['batch_size']}{times(was_accum)}); this run has {new} "
            f"({world_size} x {cfg['criterion']['batch_size']}{times(accum)}): set "
            f"criterion.batch_size={old // per}"
            if old % per == 0 else f"{where}: global batch {old} cannot be split over "
            f"{world_size} processes{times(accum)}")


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
    process waits; a failure there fails them all) and ``ds_config`` is told to load it."""
    from ..distributed import from_main, is_main

    load_dir, tag = find_checkpoint(path)
    where = os.path.join(load_dir, tag)
    states = read_model_states(load_dir, tag)
    state = states["msn"]
    check_compatible(state, cfg, world_size, where, accumulation=(
        int((states.get("ds_config") or {}).get("gradient_accumulation_steps", 1)),
        int(ds_config.get("gradient_accumulation_steps", 1))))
    stage = zero_stage(ds_config)
    saved_stage = zero_stage(states.get("ds_config") or {"zero_optimization": {"stage": stage}})
    if saved_stage != stage:  # DeepSpeed would fail only after the run folder is written
        raise CheckpointError(
            f"{where}: saved with ZeRO stage {saved_stage}, this run's DeepSpeed config asks "
            f"for ZeRO stage {stage}: a checkpoint resumes only at the ZeRO stage it was saved "
            f"with (its optimizer state is laid out per stage; msn_ds converts it across world "
            f"sizes, not stages). Resume with a ZeRO-{saved_stage} DeepSpeed config, or start "
            "a new run from its weights (scripts/consolidate.py, then meta.init_weights).")
    scan(checkpoint_files(where))  # every process, before any of them loads anything
    plan = ResumePlan(load_dir, tag, state, state["world_size"])
    if state["world_size"] == world_size or stage == 0:
        return plan  # a ZeRO-0 checkpoint holds whole tensors: any world size loads it
    universal = where + ".universal"
    error = None
    if is_main() and not model_states_file(universal):
        try:
            _convert_to_universal(where, universal, world_size)
        except Exception as e:  # every process must hear of it, or the others wait forever
            error = str(e) if isinstance(e, CheckpointError) else (
                f"{where}: conversion to the universal format: {type(e).__name__}: {e}")
    error = from_main(error)  # also the barrier: converted before any process reads it
    if error is not None:
        raise CheckpointError(error)
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
    stage = zero_stage(states.get("ds_config") or {})
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
    meta = {**encoder_metadata(cfg["meta"]["model_name"], cfg["data"]["rand_size"],
                               cfg["meta"]["hidden_dim"], cfg["meta"]["output_dim"],
                               cfg["meta"]["use_bn"]),
            "step": state["step"], "epoch": state["epoch"], "config": state["config"],
            "source": where, "zero_stage": stage}
    write_weights(out, tensors, meta, source=where)
    return {k: str(v) for k, v in meta.items()}
