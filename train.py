"""MSN pretraining: parse config -> build -> loop.

    python train.py --config C --deepspeed_config D [section.key=value ...]
    torchrun --nproc_per_node N train.py --config C --deepspeed_config D ...
    deepspeed train.py --deepspeed_config D --config C ...
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

import torch

from msn_ds import distributed as D
from msn_ds.config import ConfigError, dump, knn_folders, load_config, train_folder
from msn_ds.data.dali import dali_available
from msn_ds.data.loader import PretrainData, build_pretrain_data, shm_problem
from msn_ds.deepspeed_config import read_ds_config, resolve_ds_config
from msn_ds.engine import check_init_weights, configure_precision
from msn_ds.io.atomic import SaveError
from msn_ds.io.checkpoint import consolidate
from msn_ds.io.safe_load import CheckpointError
from msn_ds.monitor.flops import StepShape, peak_flops
from msn_ds.monitor.progress import Monitor, setup_logging
from msn_ds.monitor.views_grid import log_views
from msn_ds.run_folder import (RunFolderError, claim_everywhere, folder_problem, output_problem,
                               write_run_file)
from msn_ds.trainer import build

log = logging.getLogger("msn_ds")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (reference keys accepted)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True,
                   help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop at this global step (schedules still follow the epochs)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="resume from logging.folder's latest checkpoint (refused if it has\n"
                        "none), or from PATH (a run folder or a global_stepN folder);\n"
                        "--resume auto: the same, but start fresh when logging.folder holds\n"
                        "no checkpoint (SLURM requeue)")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in a logging.folder that holds another run: move that run\n"
                        "aside to <folder>.old-<time>/ (nothing is deleted)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_intermixed_args(argv)  # overrides may sit before or after options
    if args.resume is not None and OVERRIDE.match(args.resume):
        # `--resume logging.folder=R`: the optional PATH took an override; it is never a path
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    return args


OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")


def build_knn_monitor(cfg: dict, source: str):
    """``eval.knn_every_steps``: the k-NN monitor, its image sets listed now (a bad folder
    fails before any work)."""
    ev = cfg["eval"]
    if not ev["knn_every_steps"]:
        return None
    from eval.knn_monitor import KNNMonitor

    crop = ev["knn_crop"] or cfg["data"]["rand_size"]
    train, val = knn_folders(cfg)
    try:
        return KNNMonitor(train, val, train_root=train_folder(cfg), k=ev["knn_k"], crop=crop,
                          resize=ev["knn_resize"] or round(crop * 256 / 224),
                          batch_size=ev["knn_batch_size"],
                          train_per_class=ev["knn_train_per_class"])
    except (ValueError, FileNotFoundError) as e:
        hint = (" (the k-NN monitor needs labelled images, in class sub-folders; an unlabelled "
                "training folder needs eval.knn_train and eval.knn_val, or "
                "eval.knn_every_steps=0)" if "class folder" in str(e) else "")
        raise ConfigError(f"{source}: eval.knn_train/knn_val: {e}{hint}") from None


def build_data(cfg: dict, accumulation: int = 1) -> PretrainData:
    """``data.loader``: DALI (on this process's GPU when there is one) or torchvision. Built
    before the process group (rank and world size from the launcher's environment), so that
    an empty ``train/`` or too few images for one global batch is refused before DeepSpeed
    starts. Each batch is a whole step's: ``accumulation`` micro-batches of
    ``criterion.batch_size``, which the step splits (msn_ds/accumulate.py)."""
    device_id = D.local_rank() if D.accelerator_name() == "cuda" else None
    return build_pretrain_data(cfg["data"], train_folder(cfg),
                                 cfg["criterion"]["batch_size"] * accumulation,
                                 cfg["meta"]["seed"], int(os.environ["WORLD_SIZE"]),
                                 int(os.environ["RANK"]), device_id)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # a launcher variable that is not a number, or a rank outside the world
        D.setup_env()
    except D.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # setup_logging's levels before the process group exists (the data loader logs first)
    logging.basicConfig(level=logging.INFO if os.environ["RANK"] == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.max_steps is not None and args.max_steps <= 0:
            raise ConfigError(f"--max-steps {args.max_steps}: must be a positive step count")
        if args.overwrite and args.resume is not None:
            raise ConfigError("--overwrite starts a fresh run (moving the old one aside); "
                              "it cannot be combined with --resume")
        cfg = load_config(args.config, args.overrides)
        problem = folder_problem(cfg["logging"]["folder"])
        if problem:
            raise ConfigError(f"{args.config}: logging.folder {problem}")
        problem = output_problem(cfg["logging"]["folder"], cfg["logging"]["tensorboard"],
                                 checkpoint_bytes(cfg))
        if problem:
            raise ConfigError(f"{args.config}: logging.folder: {problem}")
        ds_config = resolve_ds_config(read_ds_config(args.deepspeed_config), cfg,
                                      int(os.environ["WORLD_SIZE"]), args.deepspeed_config)
        if cfg["data"]["loader"] == "dali" and not dali_available():
            raise ConfigError(f"{args.config}: data.loader=dali but NVIDIA DALI is not "
                              "installed (pip install nvidia-dali-cuda130, or data.loader=torch)")
        knn = build_knn_monitor(cfg, args.config)
        check_init_weights(cfg)
        problem = shm_problem(cfg["data"], cfg["criterion"]["batch_size"])
        if problem:
            raise ConfigError(f"{args.config}: {problem}")
        try:  # an empty train/ or fewer images than one global batch
            data = build_data(cfg, ds_config["gradient_accumulation_steps"])
        except (FileNotFoundError, ValueError) as e:
            where = ("data.shards" if cfg["data"]["shards"] is not None
                     else f"training images in {train_folder(cfg)}")
            raise ConfigError(f"{args.config}: {where}: {e}") from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:  # a rendezvous that does not complete within MSN_DS_RENDEZVOUS_TIMEOUT
        D.init_process_group()
    except D.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging()
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and D.is_main()):
        log.warning("torchrun --max-restarts with its shared rendezvous store: a restarted "
                    "attempt can hang creating process groups (pytorch#135712); launch with "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    folder = cfg["logging"]["folder"]
    try:  # rank 0 locks the folder and checks it is free; every process learns the outcome
        claim = claim_everywhere(folder, args.resume, args.overwrite)
    except RunFolderError as e:
        if D.is_main():
            print(f"error: {e}", file=sys.stderr)
        D.cleanup()
        return 2
    for note in claim.notes:
        log.warning("%s", note)
    spe = data.batches_per_epoch
    try:  # the resume is checked (and converted, at another world size) first
        built = build(cfg, ds_config, spe, claim.resume_from)
    except CheckpointError as e:
        log.error("cannot resume: %s", e)
        claim.release()
        D.cleanup()
        return 2
    trainer, plan = built.trainer, built.plan
    target, schedules = trainer.target, trainer.schedules
    step, bad_images = 0, 0
    if plan is not None:
        try:
            step = trainer.resume(plan)
        except CheckpointError as e:
            log.error("cannot resume: %s", e)
            D.cleanup()
            return 2
        log.info("resumed at step %d (epoch %d, batch %d) from %s (%d processes)", step,
                 step // spe + 1, step % spe, plan.where, plan.saved_world_size)
    if D.is_main():  # only now: a refused resume leaves the folder as it was
        write_run_file(os.path.join(folder, f"{cfg['logging']['write_tag']}-config.yaml"),
                       dump(cfg))  # replaces a planted link, never writes through it
    if cfg["logging"]["tensorboard"] and D.is_main():
        log_views(cfg, data)  # TensorBoard data/views: what the encoders see

    total = schedules.total_steps if args.max_steps is None else min(args.max_steps,
                                                                     schedules.total_steps)
    if step >= total:
        log.warning("nothing to train: the checkpoint is at step %d and this run ends at step "
                    "%d%s; the weights file is written again from it", step, total,
                    "" if args.max_steps is None else " (--max-steps)")
    global_batch = cfg["criterion"]["batch_size"] * D.world_size() * ds_config[
        "gradient_accumulation_steps"]  # images per optimizer step
    device = torch.device(trainer.engine.device)
    configure_precision(device)
    monitor = Monitor(folder, total, global_batch, cfg["logging"]["log_every"],
                      tensorboard=cfg["logging"]["tensorboard"],
                      flops_per_image=StepShape.from_config(cfg).flops_per_image(),
                      peak_flops=cfg["logging"]["peak_tflops"] * 1e12 or peak_flops(device),
                      device=device)
    log.info("%s: %d images, %d steps/epoch, global batch %d on %d processes, %d steps",
             cfg["meta"]["model_name"], len(data), spe, global_batch,
             D.world_size(), total)

    stop = D.StopRequest()
    last_saved = step

    def save() -> None:
        nonlocal last_saved
        path = trainer.save(folder, step, dump(cfg), cfg["logging"]["keep_last"])
        log.info("saved checkpoint %s", path)
        last_saved = step

    every = cfg["logging"]["checkpoint_every_steps"]
    while step < total and not stop.flag:
        epoch = step // spe
        data.set_epoch(epoch, start_batch=step % spe)
        waited_since = time.perf_counter()
        for views, _, skipped in data:
            data_wait = time.perf_counter() - waited_since
            if skipped:  # only a batch that passed over a bad file can have found a new one
                n = data.count_unreadable()
                if n > bad_images:
                    log.warning("%d distinct unreadable images skipped on this process so "
                                "far (%s)", n, data.name)
                bad_images = n
                check_bad_fraction(n, data, cfg["data"]["max_bad_fraction"], stop)
            out = trainer.step(views, step, log=monitor.due(step + 1), stop=stop.level)
            step += 1
            monitor.update(dict(out.stats, loss=out.loss, skipped=out.skipped),
                           data_wait=data_wait)
            due = monitor.due(step)
            checkpoint = step % spe == 0 or (every and step % every == 0)
            try:  # the flags of the step before (or of all, where we sync anyway)
                for s, run in trainer.poll(None if due or checkpoint or step >= total
                                           else step - 2):
                    log.warning("step %d: non-finite loss, update and EMA skipped (%d in a "
                                "row)", s, run)
            except FloatingPointError as e:  # too many non-finite losses in a row
                log.error("%s; saving the last good state (step %d) and stopping", e, step)
                save()
                D.cleanup()
                return 3
            if knn is not None and step % cfg["eval"]["knn_every_steps"] == 0:
                monitor.log_eval(step, knn(target, device, trainer.target_dtype) or {},
                                 knn.describe)
            if due:  # every process counts the same union, so all of them stop alike
                everywhere = data.count_unreadable_everywhere()
                check_bad_fraction(everywhere, data, cfg["data"]["max_bad_fraction"], stop,
                                   where="by all processes")
                monitor.log(step, epoch, out.sched, extra={"bad_images": everywhere})
            if checkpoint:
                save()
            if stop.flag and D.world_size() == 1 or trainer.stop_level:
                log.warning("stop requested (%s): saving at step %d and exiting",
                            stop.received or "another process", step)
                stop.flag = True
                break
            if step >= total:
                break
            waited_since = time.perf_counter()

    if last_saved != step or not os.path.isdir(os.path.join(folder, f"global_step{step}")):
        save()
    save_weights_file(cfg, os.path.join(folder, f"global_step{step}"))
    monitor.close()
    data.close()
    claim.release()
    D.cleanup()  # a barrier first: all are done before one exits (and its launcher, if it
    # failed, stops the rest)
    # a run stopped by its data ends in error, after saving: a requeue must not resume it
    return 2 if max(stop.level, trainer.stop_level) >= D.StopRequest.FAILURE else 0


def checkpoint_bytes(cfg: dict) -> int:
    """About how many bytes one checkpoint takes: per trained parameter the module's fp32
    copy, the fp32 master and Adam's two moments, plus the fp32 target (built on the meta
    device: nothing is allocated)."""
    from msn_ds.models import MSNEncoder

    meta = cfg["meta"]
    with torch.device("meta"):
        encoder = MSNEncoder(meta["model_name"], img_size=cfg["data"]["rand_size"],
                             hidden_dim=meta["hidden_dim"], output_dim=meta["output_dim"],
                             use_bn=meta["use_bn"])
    params = sum(p.numel() for p in encoder.parameters())
    params += cfg["criterion"]["num_proto"] * meta["output_dim"]
    return params * (4 * 4 + 4)


def check_bad_fraction(n: int, data: PretrainData, max_fraction: float, stop,
                       where: str = "on this process") -> None:
    """``n`` distinct unreadable images found (each file counted once: the loaders remember
    them and skip them unread in later epochs). Above ``data.max_bad_fraction`` of the
    images, fail through ``stop``: the step carries it to every process, so all of them save
    the last good state together and exit with status 2, the reason in the log."""
    if n > max_fraction * len(data) and stop.level < stop.FAILURE:
        reason = (f"data.max_bad_fraction={max_fraction} exceeded: {n} distinct unreadable "
                  f"images of {len(data)} found {where} in {data.name} "
                  "(scripts/check_dataset.py lists them)")
        log.error("%s; saving the last good state and stopping", reason)
        stop.fail(reason)


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
    try:
        sys.exit(main())
    except SaveError as e:  # a full disk while saving: the message says what was kept
        log.error("%s", e)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before training started, or twice
        print("interrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)
