"""Bad data on disk: FIFOs named like images, symlink loops, unreadable files counted once.

Real files (``os.mkfifo``, ``os.symlink``), real loader worker processes, real ``train.py``
processes and a real SIGTERM.
"""
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (ROOT, cpu_env, loader_source, run_cli, source_args, write_folder,
                     write_shards)
from msn_ds.config import defaults
from msn_ds.data.dataset import MultiViewImageFolder, eval_folder, list_images, load_rgb
from msn_ds.data.loader import build_pretrain_data
from msn_ds.data.sampler import GlobalBatchSampler
from msn_ds.data.transforms import eval_transform

CHECK = str(ROOT / "scripts" / "check_dataset.py")


def unblock_fifo(path):
    """Open the FIFO for writing (and close it), so that a reader stuck on it returns."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader: nobody to unblock
        pass


def test_fifo_is_skipped_and_counted_and_never_blocks(tmp_path):
    write_folder(tmp_path / "train", {"a": 3, "b": 3})
    fifo = tmp_path / "train" / "a" / "zz.png"
    os.mkfifo(fifo)
    ds = eval_folder(str(tmp_path / "train"), eval_transform(16, 16))
    assert len(ds) == 6 and str(fifo) not in [p for p, _ in ds.samples]
    assert ds.listing.special == [(str(fifo), "FIFO")]
    # a file that becomes a FIFO after listing: the read refuses it at once
    result = {}

    def read():
        try:
            load_rgb(str(fifo))
        except OSError as e:
            result["error"] = str(e)
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    blocked = t.is_alive()
    unblock_fifo(fifo)
    assert not blocked, "load_rgb blocked on a FIFO"
    assert "not a regular file (FIFO)" in result["error"]


def test_symlink_loop_and_cross_class_link_are_not_followed(tmp_path):
    root = tmp_path / "train"
    write_folder(root, {"a": 4, "b": 4})
    os.symlink("..", root / "a" / "loop")  # a -> the dataset root: a loop
    os.symlink("../b", root / "a" / "to_b")  # b's images listed under a
    (root / "b" / "sub").mkdir()
    os.symlink("..", root / "b" / "sub" / "up")  # a loop one level down
    ext = tmp_path / "elsewhere" / "more"
    ext.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(ext / "x.png")
    os.symlink(ext, root / "b" / "ext")  # data stored elsewhere: followed once
    os.symlink(ext, root / "b" / "ext_again")  # ... not twice
    listing = list_images(str(root))
    assert len(listing.samples) == 9
    for path, label in listing.samples:  # every image under its own class
        rel = os.path.relpath(path, root)
        assert label == {"a": 0, "b": 1}[rel.split(os.sep)[0]], rel
        assert "loop" not in rel and "to_b" not in rel and "up" not in rel
    assert sorted(os.path.basename(link) for link, _ in listing.loops) == ["loop", "up"]
    assert sorted(os.path.basename(link) for link, _ in listing.duplicate_dirs) == \
        ["ext_again", "to_b"]
    ds = MultiViewImageFolder(str(root), transform=None)
    assert [p for p, _ in ds.samples] == [p for p, _ in listing.samples]


@pytest.mark.slow
def test_check_dataset_reports_fifo_loops_and_duplicates(tmp_path):
    root = tmp_path / "train"
    write_folder(root, {"a": 3, "b": 3})
    os.mkfifo(root / "a" / "pipe.png")
    os.symlink("..", root / "a" / "loop")
    os.symlink("../b", root / "a" / "to_b")
    os.symlink("img000.png", root / "b" / "same.png")
    try:
        out = run_cli(CHECK, root, "--workers", 1, timeout=120, check=False)
    finally:
        unblock_fifo(root / "a" / "pipe.png")
    assert out.returncode == 1, out.stderr
    lines = dict(line.split("\t", 1) for line in out.stdout.splitlines() if "\t" in line)
    assert lines[str(root / "a" / "pipe.png")].startswith("not a regular file (FIFO)")
    assert lines[str(root / "a" / "loop")].startswith("symlink loop")
    assert "listed elsewhere" in lines[str(root / "a" / "to_b")]
    assert lines[str(root / "b" / "same.png")].startswith("duplicate: the same file as")
    assert "0 unreadable of 7 images" in out.stdout
    for summary in ("1 non-regular files skipped", "1 symlink loops", "1 duplicate files"):
        assert summary in out.stdout


def loader_data(**kw):
    return dict(defaults()["data"], rand_size=16, focal_size=8, focal_views=1,
                color_jitter_strength=0.0, **kw)


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_bad_file_read_once_then_remembered_by_the_workers(tmp_path, source):
    """Two real loader workers: the bad file is found by a worker, known to the training
    process, and not read again: made readable after the first pass, it is still skipped,
    and every batch (views, labels, skip counts) is the first pass's, bit for bit. Also
    from tar shards written from the folder (data.shards; the sample made readable in its
    shard, in place)."""
    root = tmp_path / "train"
    write_folder(root, {"a": 5, "b": 4})
    bad = root / "a" / "img002.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not a png" + good[9:])  # the PNG signature broken, the length kept
    shards, path_of = loader_source(source, root, tmp_path / "shards")
    data = build_pretrain_data(loader_data(num_workers=2, **shards), str(root), 3, 0,
                               loader="torch")
    ds, sampler, it = data.dataset, data.sampler, data.loader
    name = next(key for key, _ in ds.samples if path_of(key) == str(bad))

    def epoch():
        sampler.set_epoch(0)
        return [([v.clone() for v in views], labels, skipped) for views, labels, skipped in it]
    first = epoch()
    assert sum(s for _, _, s in first) == 1
    assert ds.unreadable() == data.unreadable() == [name] and data.count_unreadable() == 1
    if source == "folder":
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad, format="PNG")  # readable now
    else:
        shard, key = name.rsplit(":", 1)
        with tarfile.open(shard) as tf:
            offset = tf.getmember(key + ".png").offset_data
        with open(shard, "r+b") as f:  # readable now
            f.seek(offset)
            f.write(good)
    second = epoch()
    assert data.count_unreadable() == 1
    for (v1, l1, s1), (v2, l2, s2) in zip(first, second, strict=True):
        assert torch.equal(l1, l2) and s1 == s2
        assert all(torch.equal(a, b) for a, b in zip(v1, v2))


# --- real train.py processes ------------------------------------------------------------------

def data_root(tmp_path, bad=0, fifo=False):
    """9 images in two classes (``bad`` of them unreadable); or, with ``fifo``, 10 images and
    a FIFO ``a/zz.png`` (index 5 of 11 in a listing that keeps it)."""
    base = tmp_path / "data"
    write_folder(base / "ds" / "train", {"a": 5, "b": 5 if fifo else 4}, size=32)
    for i in range(bad):
        (base / "ds" / "train" / "a" / f"img{i:03d}.png").write_bytes(b"\x89PNG truncated")
    if fifo:
        os.mkfifo(base / "ds" / "train" / "a" / "zz.png")
    return base


def train_cmd(base, run, *extra, batch=3):
    return [sys.executable, str(ROOT / "train.py"), "--config", "configs/demo_cpu.yaml",
            "--deepspeed_config", "ds_configs/zero0_fp32.json", f"data.root_path={base}",
            "data.image_folder=ds", f"logging.folder={run}", f"criterion.batch_size={batch}",
            "criterion.num_proto=16", "logging.log_every=1", "logging.tensorboard=false",
            "optimization.warmup=0", *extra]


def metrics(run):
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_one_bad_file_in_nine_is_counted_once_over_three_epochs(tmp_path, source):
    """1 bad file in 9, data.max_bad_fraction 0.15 (1.35 files): passed over in every epoch
    (3 steps of 3 cover all 9 indices), but one file: the run finishes. Also from tar shards
    written from the folder (data.shards), read by the loader's worker process."""
    base, run = data_root(tmp_path, bad=1), tmp_path / "run"
    pattern = (write_shards(base / "ds" / "train", tmp_path / "shards", shard_size=4)
               if source == "shards" else None)
    r = run_cli(*train_cmd(base, run, "optimization.epochs=3", "data.num_workers=1",
                           "data.max_bad_fraction=0.15", *source_args(source, pattern))[1:],
                check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = metrics(run)
    assert [m["step"] for m in rows] == list(range(1, 10))
    assert all(m["bad_images"] == 1 for m in rows)
    # passed over in each epoch, read (and reported) once
    assert r.stderr.count("skipping unreadable image") == 1, r.stderr[-4000:]


@pytest.mark.slow
def test_too_many_bad_files_save_and_stop_with_a_message(tmp_path):
    base, run = data_root(tmp_path, bad=2), tmp_path / "run"
    r = run_cli(*train_cmd(base, run, "optimization.epochs=3", "data.num_workers=0",
                           "data.max_bad_fraction=0.15")[1:], check=False)
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 2, r.stderr[-4000:]  # saved, then an error: no requeue resumes it
    assert ("data.max_bad_fraction=0.15 exceeded: 2 distinct unreadable images of 9"
            in r.stderr), r.stderr[-4000:]
    steps = [int(d.name[len("global_step"):]) for d in run.iterdir()
             if d.name.startswith("global_step")]
    assert len(steps) == 1 and 1 <= steps[0] <= 3, steps  # stopped in the first epoch, saved
    assert (run / "latest").read_text().strip() == f"global_step{steps[0]}"


@pytest.mark.slow
def test_two_processes_count_a_file_once_and_stop_together(tmp_path):
    """2 processes (torchrun, gloo). One bad file in 9, met by both processes in different
    epochs: ``bad_images`` is the union, 1, not the sum. Two bad files, one in each
    process's first batch (each under data.max_bad_fraction on its own): the union exceeds
    it, and both processes save the same step and exit in error."""
    base, run = data_root(tmp_path, bad=1), tmp_path / "run"
    args = train_cmd(base, run, "optimization.epochs=4", "data.num_workers=0",
                     "data.max_bad_fraction=0.15", batch=2)[1:]
    r = run_cli(*args, nproc=2, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("1 distinct unreadable images skipped on this process") == 2
    rows = metrics(run)
    assert rows[-1]["bad_images"] == 1 and all(m["bad_images"] <= 1 for m in rows)

    # bad: a/img001 and a/img003 (indices 1, 3). The first step deals indices 1 and 5 to
    # process 0 (1 is replaced by 2) and 0 and 3 to process 1 (3 by 4): one bad file each
    firsts = []
    for rank in (0, 1):
        sampler = GlobalBatchSampler(9, 2, 2, rank, seed=0)
        sampler.set_epoch(0)
        firsts.append([i for _, i in sampler][:2])
    assert firsts == [[1, 5], [0, 3]]
    base, run = data_root(tmp_path / "two"), tmp_path / "run2"
    for name in ("img001.png", "img003.png"):
        (base / "ds" / "train" / "a" / name).write_bytes(b"\x89PNG truncated")
    args = train_cmd(base, run, "optimization.epochs=4", "data.num_workers=0",
                     "data.max_bad_fraction=0.15", batch=2)[1:]
    r = run_cli(*args, nproc=2, check=False)
    assert r.returncode != 0, r.stderr[-4000:]  # 2 from train.py; torchrun reports 1
    assert 'train.py", line' not in r.stderr, r.stderr[-4000:]  # no traceback of ours
    assert r.stderr.count("1 distinct unreadable images skipped on this process") == 2
    assert "exceeded: 2 distinct unreadable images of 9 found by all processes" in r.stderr
    assert r.stderr.count("stop requested") == 2, r.stderr[-4000:]
    assert (run / "latest").read_text().strip() == "global_step2"  # the step after the log
    assert (run / "global_step2").is_dir()


@pytest.mark.slow
def test_sigterm_with_a_fifo_in_the_data_saves(tmp_path):
    """A FIFO named zz.png in the training folder used to block the loader forever (and the
    SIGTERM with it): listed, it is index 5 of 11, drawn in the first batch of 10 (seed 0).
    Now it is skipped: training runs, and SIGTERM saves and exits."""
    base, run = data_root(tmp_path, fifo=True), tmp_path / "run"
    fifo = base / "ds" / "train" / "a" / "zz.png"
    log = open(tmp_path / "stderr.txt", "w+")
    p = subprocess.Popen(train_cmd(base, run, "optimization.epochs=200", "data.num_workers=1",
                                   batch=10),
                         stdout=subprocess.DEVNULL, stderr=log, env=cpu_env(), cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not metrics(run) and p.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        started = bool(metrics(run))
        if started:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=300)
    finally:
        if p.poll() is None:
            unblock_fifo(fifo)
            p.kill()
            p.wait()
        log.seek(0)
        err = log.read()
        log.close()
    assert started, f"no training step within 300 s (blocked on the FIFO?)\n{err[-3000:]}"
    assert p.returncode == 0, err[-4000:]
    assert "stop requested (SIGTERM)" in err and "Traceback" not in err, err[-4000:]
    assert "non-regular files named like images" in err and "zz.png" in err
    saved = (run / "latest").read_text().strip()
    assert saved.startswith("global_step") and (run / saved).is_dir()
    assert 1 <= int(saved[len("global_step"):]) < 200
