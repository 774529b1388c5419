"""Beyond one machine, tested on one (issue 13): two "nodes" on localhost, each its own
launcher with one process, train, checkpoint and resume, through torchrun's c10d rendezvous
and through DeepSpeed's launcher without ssh; and torchrun's elastic restart after a worker
is SIGKILLed resumes from the latest checkpoint via ``--resume auto``.

Every run is 2 processes, ZeRO-1 (each node writes its own optimiser shard), global batch 8,
saved at step 2 and continued to step 4: on the CPU these runs are deterministic, so each
must end with the same weights, bit for bit, as the two-node run that saved and resumed.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, cpu_env
from test_scale import args, flat

pytestmark = pytest.mark.slow  # launches processes

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(demo_root, folder, steps, *extra):
    return args(demo_root, folder, "zero1_fp32.json", 4, steps,
                "logging.checkpoint_every_steps=2", *extra)


def two_launchers(commands, env=None):
    """Start one launcher per "node" at once; wait for both; return their outputs."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(**(env or {})), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for cmd in commands]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    return "\n".join(outs)


def torchrun_nodes(train_args):
    port = free_port()
    return two_launchers([
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_id", f"msn{port}",
         "--rdzv_endpoint", f"127.0.0.1:{port}", os.path.join(ROOT, "train.py"), *train_args]
        for node in (0, 1)])


@pytest.fixture(scope="module")
def two_nodes(demo_root, tmp_path_factory):
    """torchrun --nnodes 2 on localhost: steps 1-2 (saved), then --resume auto to 4."""
    folder = str(tmp_path_factory.mktemp("nodes") / "run")
    torchrun_nodes(run_args(demo_root, folder, 2, "--resume", "auto"))
    step2 = os.listdir(os.path.join(folder, "global_step2"))
    out = torchrun_nodes(run_args(demo_root, folder, 4, "--resume", "auto"))
    return folder, step2, out


def test_two_nodes_train_checkpoint_and_resume(two_nodes):
    folder, step2, out = two_nodes
    # one optimiser shard from each node's process
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(step2), step2
    assert "global batch 8 on 2 processes" in out
    assert "resumed at step 2 (epoch 1, batch 2)" in out and "(2 processes)" in out
    with open(os.path.join(folder, "latest")) as f:
        assert f.read() == "global_step4"


def test_deepspeed_launcher_without_ssh(demo_root, two_nodes, tmp_path):
    """DeepSpeed 0.19.8's launcher has --no_ssh: each node runs `deepspeed --no_ssh
    --node_rank N` itself (a hostfile lists both; the names are labels only)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    folder = str(tmp_path / "run")

    def launch(steps):
        port = free_port()
        return two_launchers([
            [os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             os.path.join(ROOT, "train.py"), *run_args(demo_root, folder, steps, "--resume", "auto")]
            for node in (0, 1)])

    launch(2)
    out = launch(4)
    assert "resumed at step 2" in out and "(2 processes)" in out
    assert torch.equal(flat(folder), flat(two_nodes[0]))


def test_elastic_restart_resumes_after_sigkill(demo_root, two_nodes, tmp_path):
    """torchrun --max-restarts 1: rank 0 (the folder's lock holder) is SIGKILLed at step 3,
    after global_step2 is saved; torchrun restarts both workers, which resume from step 2
    (--resume auto) and end bit-identical to the run that saved at step 2 and resumed.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with this torch, a restarted attempt on the
    agent's shared store hangs creating DeepSpeed's process groups (pytorch#135712)."""
    folder, marker = str(tmp_path / "run"), str(tmp_path / "paused")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", os.path.join(HERE, "train_pause_at.py"), "0", "2", marker,
           *run_args(demo_root, folder, 4, "--resume", "auto")]
    job = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + TIMEOUT
        while not os.path.exists(marker):
            assert job.poll() is None and time.time() < deadline, job.communicate()[0][-5000:]
            time.sleep(0.1)
        with open(os.path.join(folder, "latest")) as f:
            assert f.read() == "global_step2"
        with open(marker) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        out = job.communicate(timeout=TIMEOUT)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-5000:]
    assert "exitcode: -9" in out  # the kill was seen, and the job restarted
    assert "took over the lock left by pid" in out
    assert "resumed at step 2 (epoch 1, batch 2)" in out
    assert torch.equal(flat(folder), flat(two_nodes[0]))
