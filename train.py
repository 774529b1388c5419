"""MSN pretraining: parse config -> build -> loop.

    python train.py --config C --deepspeed_config D [section.key=value ...]
    torchrun --nproc_per_node N train.py --config C --deepspeed_config D ...
    deepspeed train.py --deepspeed_config D --config C ...
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from msn_ds import distributed as D
from msn_ds.checkpoint import (CheckpointError, consolidate, load_training_checkpoint,
                               plan_resume, save_training_checkpoint)
from msn_ds.config import ConfigError, dump, load_config, train_folder
from msn_ds.data import GlobalBatchSampler, MultiCropTransform, MultiViewImageFolder, collate_views
from msn_ds.engine import (MSNTrainer, build_criterion, build_models, build_schedules,
                           init_deepspeed, init_target, read_ds_config, resolve_ds_config)
from msn_ds.monitor import Monitor, setup_logging

log = logging.getLogger("msn_ds")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (reference keys accepted)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True,
                   help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop at this global step (schedules still follow the epochs)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="resume from logging.folder's latest checkpoint, or from PATH "
                        "(a run folder or a global_stepN folder)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_intermixed_args(argv)  # overrides may sit before or after options


def build_loader(cfg: dict):
    data = cfg["data"]
    transform = MultiCropTransform(
        rand_size=data["rand_size"], focal_size=data["focal_size"], rand_views=data["rand_views"],
        focal_views=data["focal_views"], color_jitter=data["color_jitter_strength"],
        rand_scale=data["rand_scale"], focal_scale=data["focal_scale"])
    dataset = MultiViewImageFolder(train_folder(cfg), transform, seed=cfg["meta"]["seed"])
    sampler = GlobalBatchSampler(len(dataset), cfg["criterion"]["batch_size"], D.world_size(),
                                 D.rank(), seed=cfg["meta"]["seed"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg["criterion"]["batch_size"], sampler=sampler,
        num_workers=data["num_workers"], pin_memory=data["pin_mem"] and torch.cuda.is_available(),
        collate_fn=collate_views, drop_last=True, persistent_workers=data["num_workers"] > 0)
    return dataset, sampler, loader


def main(argv=None) -> int:
    args = parse_args(argv)
    D.setup_env()
    try:
        cfg = load_config(args.config, args.overrides)
        ds_config = resolve_ds_config(read_ds_config(args.deepspeed_config), cfg,
                                      int(os.environ["WORLD_SIZE"]), args.deepspeed_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    setup_logging()
    folder = cfg["logging"]["folder"]
    os.makedirs(folder, exist_ok=True)
    if D.is_main():
        with open(os.path.join(folder, f"{cfg['logging']['write_tag']}-config.yaml"), "w") as f:
            f.write(dump(cfg))

    dataset, sampler, loader = build_loader(cfg)
    model, target = build_models(cfg)
    plan = None
    if args.resume is not None:  # checked (and converted, at another world size) first
        try:
            plan = plan_resume(folder if args.resume == "latest" else args.resume, cfg,
                               D.world_size(), ds_config)
        except CheckpointError as e:
            log.error("cannot resume: %s", e)
            D.cleanup()
            return 2
    engine = init_deepspeed(model, ds_config)
    target, ema = init_target(target, engine, ds_config)
    spe = sampler.batches_per_epoch
    schedules = build_schedules(cfg, spe)
    trainer = MSNTrainer(engine, target, ema, build_criterion(cfg), schedules, cfg)

    total = schedules.total_steps if args.max_steps is None else min(args.max_steps,
                                                                     schedules.total_steps)
    global_batch = cfg["criterion"]["batch_size"] * D.world_size()
    monitor = Monitor(folder, total, global_batch, cfg["logging"]["log_every"],
                      tensorboard=cfg["logging"]["tensorboard"])
    log.info("%s: %d images, %d steps/epoch, global batch %d on %d processes, %d steps",
             cfg["meta"]["model_name"], len(dataset), sampler.batches_per_epoch, global_batch,
             D.world_size(), total)

    step, bad_images = 0, 0
    if plan is not None:
        try:
            state, rank_states = load_training_checkpoint(engine, plan)
        except CheckpointError as e:
            log.error("cannot resume: %s", e)
            D.cleanup()
            return 2
        step = trainer.load_client_state(state, rank_states)
        log.info("resumed at step %d (epoch %d, batch %d) from %s (%d processes)", step,
                 step // spe, step % spe, plan.where, plan.saved_world_size)
    stop = D.StopRequest()
    last_saved = step

    def save() -> None:
        nonlocal last_saved
        path = save_training_checkpoint(engine, folder, step, trainer.client_state(step, dump(cfg)),
                                        keep_last=cfg["logging"]["keep_last"],
                                        rank_state=trainer.rank_state())
        log.info("saved checkpoint %s", path)
        last_saved = step

    every = cfg["logging"]["checkpoint_every_steps"]
    while step < total and not stop.flag:
        epoch = step // spe
        sampler.set_epoch(epoch, start_batch=step % spe)
        for views, _, skipped in loader:
            bad_images = check_bad_images(bad_images + skipped, skipped, len(dataset), dataset.root,
                                          cfg["data"]["max_bad_fraction"])
            try:
                out = trainer.step(views, step, want_grad_norm=monitor.due(step + 1))
            except FloatingPointError as e:  # too many non-finite losses in a row
                log.error("%s; saving the last good state (step %d) and stopping", e, step)
                save()
                D.cleanup()
                return 3
            if out.skipped:
                log.warning("step %d: non-finite loss, update and EMA skipped (%d in a row)",
                            step, trainer.nonfinite_run)
            step += 1
            monitor.update(dict(out.stats, loss=out.loss, skipped=torch.tensor(float(out.skipped))))
            if monitor.due(step):
                monitor.log(step, epoch, out.sched)
            if step % spe == 0 or (every and step % every == 0):
                save()
            if stop.agreed():
                log.warning("stop requested (%s): saving at step %d and exiting",
                            stop.received or "another process", step)
                stop.flag = True
                break
            if step >= total:
                break

    if last_saved != step or not os.path.isdir(os.path.join(folder, f"global_step{step}")):
        save()
    save_weights_file(cfg, os.path.join(folder, f"global_step{step}"))
    monitor.close()
    D.cleanup()
    return 0


def check_bad_images(total: int, new: int, num_images: int, root: str, max_fraction: float) -> int:
    """Unreadable images are skipped and counted; above the configured fraction, stop."""
    if new:
        log.warning("%d unreadable images skipped on this process so far (%s)", total, root)
    if total > max_fraction * num_images:
        raise RuntimeError(f"{total} unreadable images in {root} exceed "
                           f"data.max_bad_fraction={max_fraction}")
    return total


def save_weights_file(cfg: dict, checkpoint: str) -> None:
    """The encoders as one safetensors file, consolidated from the final checkpoint (so
    every ZeRO stage, sharded target included, gives the same file as scripts/consolidate.py)."""
    if D.is_main():
        path = os.path.join(cfg["logging"]["folder"],
                            f"{cfg['logging']['write_tag']}-target.safetensors")
        consolidate(checkpoint, path)
        log.info("saved weights %s", path)
    D.barrier()


if __name__ == "__main__":
    sys.exit(main())
