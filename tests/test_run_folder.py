"""One run per logging.folder (issue 13, defects 2, 3, 12 and part of 7), with real
processes, files and signals: a fresh run over another run's checkpoints is refused (exit 2,
nothing touched), --overwrite moves the old run aside, --resume auto resumes or starts fresh;
a second run while the first holds the folder's lock is refused naming the holder, and a
lock left by a killed run is taken over; a refused resume writes nothing; bad run inputs
are refused before any work, on every process."""
import glob
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, cpu_env, run_cli, write_folder
from msn_ds.io.weights import read_weights
from msn_ds.run_folder import LOCK_NAME, RunFolderError, RunLock
from test_checkpoint import args

pytestmark = pytest.mark.slow  # launches processes

HOST = socket.gethostname()
EVERY2 = "logging.checkpoint_every_steps=2"


def snapshot(folder) -> dict:
    """Every file under ``folder`` with a digest of its bytes."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def latest(folder) -> str:
    with open(os.path.join(folder, "latest")) as f:
        return f.read()


def refused(r, *phrases):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for phrase in phrases:
        assert phrase in r.stderr, (phrase, r.stderr[-3000:])


def test_fresh_run_in_occupied_folder(demo_root, tmp_path):
    """The issue's repro: 6 steps saved every 2, then a fresh run (another seed) in the same
    folder. It used to prune the first run's checkpoints and crash; now it is refused and
    nothing changes. --overwrite moves the old run aside intact; --resume auto continues."""
    run = str(tmp_path / "R")
    run_cli("train.py", *args(demo_root, run, 6, "zero0_fp32.json", EVERY2))
    before = snapshot(run)
    r = run_cli("train.py", *args(demo_root, run, 2, "zero0_fp32.json", EVERY2, "meta.seed=1"),
                check=False)
    refused(r, f"logging.folder {run} holds the checkpoints of another run (global_step2, "
               "global_step4, global_step6)", "--resume", "another logging.folder",
            "--overwrite")
    assert snapshot(run) == before

    r = run_cli("train.py", *args(demo_root, run, 2, "zero0_fp32.json", EVERY2, "meta.seed=1"),
                "--overwrite")
    (old,) = glob.glob(run + ".old-*")
    assert f"moved the previous run in {run} to {old}" in r.stderr
    assert snapshot(old) == before  # every file of the first run, byte for byte
    assert latest(run) == "global_step2" and not os.path.exists(os.path.join(run, "global_step6"))
    assert read_weights(os.path.join(run, "demo-target.safetensors"))[1]["step"] == "2"

    r = run_cli("train.py", *args(demo_root, run, 4, "zero0_fp32.json", EVERY2, "meta.seed=1"),
                "--resume", "auto")
    assert "resumed at step 2" in r.stderr and latest(run) == "global_step4"
    fresh = str(tmp_path / "fresh")
    r = run_cli("train.py", *args(demo_root, fresh, 1), "--resume", "auto")
    assert f"--resume auto: no checkpoint in {fresh} yet, starting fresh" in r.stderr
    assert latest(fresh) == "global_step1"
    refused(run_cli("train.py", *args(demo_root, fresh, 2), "--resume", "--overwrite",
                    check=False), "cannot be combined with --resume")


def test_refused_resume_writes_nothing(demo_root, tmp_path):
    """Defect 12: a resume refused for a config mismatch used to rewrite demo-config.yaml
    with the rejected config first."""
    run = str(tmp_path / "R")
    run_cli("train.py", *args(demo_root, run, 1))
    before = snapshot(run)
    r = run_cli("train.py", *args(demo_root, run, 2, "zero0_fp32.json",
                                  "meta.model_name=vit_pico_8"), "--resume", check=False)
    refused(r, "saved with meta.model_name='vit_pico_4', this run has 'vit_pico_8'")
    assert snapshot(run) == before and not os.path.exists(os.path.join(run, LOCK_NAME))
    nothing = tmp_path / "nothing"  # a refused --resume in a new folder leaves no folder
    refused(run_cli("train.py", *args(demo_root, nothing, 2), "--resume", check=False),
            "no complete checkpoint")
    assert not nothing.exists()


def test_second_run_refused_while_first_holds_the_lock(demo_root, tmp_path):
    """Defect 3: run A is frozen (SIGSTOP) while it holds the folder; run B (--resume auto,
    so only the lock can stop it) exits 2 naming A's host and pid and writes nothing; A,
    continued, finishes intact and releases the lock."""
    run = str(tmp_path / "R")
    lock = os.path.join(run, LOCK_NAME)
    with open(tmp_path / "a.log", "w") as log:
        a = subprocess.Popen([sys.executable, "train.py", *args(demo_root, run, 4, "zero0_fp32.json",
                                                                EVERY2)],
                             cwd=ROOT, env=cpu_env(), stdout=log, stderr=log)
    try:
        deadline = time.time() + 180
        while not (os.path.exists(lock) and f'"pid": {a.pid},' in open(lock).read()):
            assert a.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGSTOP)
        try:
            before = snapshot(run)
            r = run_cli("train.py", *args(demo_root, run, 4, "zero0_fp32.json", EVERY2),
                        "--resume", "auto", check=False)
            refused(r, f"logging.folder {run} is in use by another run: pid {a.pid} on host "
                       f"{HOST}", lock)
            assert snapshot(run) == before
        finally:
            os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=180) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        if a.poll() is None:
            a.kill()
    assert latest(run) == "global_step4"
    assert read_weights(os.path.join(run, "demo-target.safetensors"))[1]["step"] == "4"
    assert not os.path.exists(lock)


HOLD = ("import sys, time; from msn_ds.run_folder import RunLock; "
        "RunLock(sys.argv[1], sys.argv[2]).acquire(); print('held', flush=True); time.sleep(600)")


def holder(folder, method):
    """A real process holding the folder's lock (until killed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, folder, method], cwd=ROOT, env=cpu_env(),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def test_lock_left_by_a_killed_run_is_taken_over(demo_root, tmp_path):
    """The holder is SIGKILLed: its lock file stays behind; the next run takes the folder
    over, says whose lock it was, and removes the file at its end."""
    run = str(tmp_path / "R")
    p = holder(run, "auto")
    p.kill()
    p.wait()
    assert f'"pid": {p.pid},' in open(os.path.join(run, LOCK_NAME)).read()
    r = run_cli("train.py", *args(demo_root, run, 1))
    assert f"took over the lock left by pid {p.pid} on host {HOST}" in r.stderr
    assert latest(run) == "global_step1" and not os.path.exists(os.path.join(run, LOCK_NAME))


@pytest.mark.parametrize("method", ["fcntl", "pidfile"])
def test_lock_held_then_stale(tmp_path, method):
    """Both lock kinds, with a real holder process: refused while it lives (naming it),
    taken over once it is SIGKILLed. The O_EXCL lock file (for file systems without locks)
    also refuses a holder on another host, which it cannot check, and a live pid."""
    folder = str(tmp_path / "R")
    p = holder(folder, method)
    try:
        with pytest.raises(RunFolderError, match=f"in use by another run: pid {p.pid} on host"):
            RunLock(folder, method).acquire()
    finally:
        p.kill()
        p.wait()
    lock = RunLock(folder, method)
    assert lock.acquire()["pid"] == p.pid  # the dead holder, taken over
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()} on host {HOST}"):
        RunLock(folder, method).acquire()  # the same process twice
    lock.release()
    assert os.listdir(folder) == []
    if method == "pidfile":
        path = os.path.join(folder, LOCK_NAME)
        with open(path, "w") as f:
            f.write('{"host": "elsewhere", "pid": 1}\n')
        with pytest.raises(RunFolderError, match="on host elsewhere.*cannot be checked"):
            RunLock(folder, method).acquire()
        with open(path, "w") as f:  # alive, same host: this test process's parent
            f.write('{"host": "%s", "pid": %d}\n' % (HOST, os.getppid()))
        with pytest.raises(RunFolderError, match=f"pid {os.getppid()}"):
            RunLock(folder, method).acquire()


@pytest.fixture
def few_images(tmp_path):
    write_folder(tmp_path / "few" / "imgs" / "train", {"a": 3, "b": 2})
    (tmp_path / "empty" / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "a_file").write_text("not a folder\n")
    return tmp_path


@pytest.mark.parametrize("extra,message", [
    (["--max-steps", "0"], "--max-steps 0: must be a positive step count"),
    (["--max-steps", "-3"], "--max-steps -3: must be a positive step count"),
    (["logging.folder={tmp}/a_file"], "logging.folder {tmp}/a_file exists and is not a folder"),
    (["logging.folder={tmp}/a_file/run"], "{tmp}/a_file is a file, not a folder"),
    (["data.root_path={tmp}/empty", "data.image_folder=imgs"],
     "training images in {tmp}/empty/imgs/train: Couldn't find any class folder"),
    (["data.root_path={tmp}/few", "data.image_folder=imgs"],
     "training images in {tmp}/few/imgs/train: 5 images cannot fill one global batch of 8 x 1"),
])
def test_bad_run_inputs_refused_before_any_work(demo_root, few_images, extra, message):
    """Defect 7: these surfaced as tracebacks after DeepSpeed started (or, --max-steps 0,
    were accepted)."""
    tmp = str(few_images)
    run = few_images / "run"
    r = run_cli("train.py", *args(demo_root, run, 2), *[e.format(tmp=tmp) for e in extra],
                check=False)
    refused(r, message.format(tmp=tmp))
    assert not run.exists() and (few_images / "a_file").read_text() == "not a folder\n"


def test_every_process_exits_when_rank0_refuses(tmp_path, demo_root):
    """Two processes started as srun would (RANK, WORLD_SIZE, no launcher): rank 0 refuses
    the occupied folder; both exit 2 on their own, neither waits for the other."""
    run = tmp_path / "R"
    (run / "global_step3").mkdir(parents=True)  # a complete checkpoint, as far as a resume
    (run / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"")  # is concerned
    before = snapshot(run)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "train.py", *args(demo_root, run, 2,
                                                                   "zero1_fp32.json")],
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=cpu_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outs]
    assert f"logging.folder {run} holds the checkpoints of another run" in outs[0][1]
    assert "Traceback" not in outs[0][1] + outs[1][1]
    assert snapshot(run) == before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
