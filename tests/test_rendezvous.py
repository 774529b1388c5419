"""Launcher environments (msn_ds.distributed): a variable that is not a number or a rank
outside the world is refused by name before any work; a port nobody chose is free (a world
of one) or derived from SLURM_JOB_ID (every task alike); a rendezvous that cannot complete
stops within MSN_DS_RENDEZVOUS_TIMEOUT, naming MASTER_ADDR:MASTER_PORT, the rank and the
world size, instead of hanging."""
import os
import socket

import pytest

from helpers import load_script, run_cli
from msn_ds import distributed as D

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
               "SLURM_STEP_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
               "TORCHELASTIC_USE_AGENT_STORE", D.RENDEZVOUS_TIMEOUT_VAR)


@pytest.fixture
def env(monkeypatch):
    """A private os.environ without any launcher's variables; setup_env writes into it."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("variables,message", [
    ({"LOCAL_RANK": "abc"}, r"LOCAL_RANK='abc' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, r"RANK=1 with WORLD_SIZE=1: ranks run from 0"),
    ({"RANK": "1"}, r"RANK=1 with WORLD_SIZE=1 \(unset: a world of one\)"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, r"RANK='-1' must be 0 or more"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE='0' must be 1 or more"),
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
    ({"RANK": "0", "LOCAL_RANK": "2", "WORLD_SIZE": "2"},
     r"LOCAL_RANK=2 with WORLD_SIZE=2: a local rank is below the world size"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "3"},
     r"LOCAL_WORLD_SIZE=3 with WORLD_SIZE=2"),
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"},
     r"LOCAL_RANK=1 with LOCAL_WORLD_SIZE=1"),
    ({"MASTER_PORT": "70000"}, r"MASTER_PORT='70000' is not a TCP port"),
    ({"MASTER_PORT": "http"}, r"MASTER_PORT='http' is not an integer"),
    ({"MASTER_ADDR": " "}, r"MASTER_ADDR is empty"),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, r"SLURM_PROCID='x' is not an integer"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, r"RANK=2 with WORLD_SIZE=2"),
    ({D.RENDEZVOUS_TIMEOUT_VAR: "0"}, r"MSN_DS_RENDEZVOUS_TIMEOUT='0' must be a positive"),
    ({D.RENDEZVOUS_TIMEOUT_VAR: "nan"}, r"MSN_DS_RENDEZVOUS_TIMEOUT='nan' must be a positive"),
])
def test_bad_launcher_variables_are_named(env, variables, message):
    for k, v in variables.items():
        env.setenv(k, v)
    with pytest.raises(D.LaunchError, match=message):
        D.setup_env()


def test_train_py_exits_2_naming_the_variable(env, capsys):
    """train.py's own path: a message and exit 2 before any work, no traceback."""
    train = load_script("train.py")
    env.setenv("LOCAL_RANK", "abc")
    assert train.main(["--config", "nowhere.yaml", "--deepspeed_config", "nowhere.json"]) == 2
    err = capsys.readouterr().err
    assert "LOCAL_RANK='abc' is not an integer" in err and "Traceback" not in err


def test_one_task_slurm_job_takes_a_free_port(env):
    """Two one-task jobs on a node no longer both take 29500."""
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "1")
    env.setenv("SLURM_JOB_ID", "777")
    D.setup_env()
    assert os.environ["WORLD_SIZE"] == "1"
    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as s:  # it was free a moment ago
        s.bind(("127.0.0.1", port))


def test_slurm_tasks_derive_the_same_port_per_job(env):
    ports = {}
    for job, task in ((4242, 0), (4242, 5), (4243, 0)):
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
            env.delenv(var, raising=False)
        env.setenv("SLURM_JOB_ID", str(job))
        env.setenv("SLURM_PROCID", str(task))
        env.setenv("SLURM_NTASKS", "8")
        D.setup_env()
        ports[job, task] = int(os.environ["MASTER_PORT"])
    assert ports[4242, 0] == ports[4242, 5] == D.slurm_port(4242)  # all tasks agree
    assert ports[4243, 0] != ports[4242, 0]  # the next job on the node does not collide
    assert all(D.SLURM_PORT_BASE <= p < D.SLURM_PORT_BASE + D.SLURM_PORT_SPAN
               for p in ports.values())
    assert D.slurm_port(4242, 1) != D.slurm_port(4242, 0)  # a second step of the job
    env.setenv("MASTER_PORT", "31234")  # a launcher's choice is kept
    D.setup_env()
    assert os.environ["MASTER_PORT"] == "31234"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_missing_process_times_out_with_a_message(env, rank):
    """WORLD_SIZE=2 with one process: rank 0 waits for a peer that never comes, rank 1 for a
    rank 0 that never listens; both stop at the deadline instead of hanging."""
    port = free_port()
    for k, v in {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                 D.RENDEZVOUS_TIMEOUT_VAR: "1"}.items():
        env.setenv(k, v)
    D.setup_env()
    with pytest.raises(D.LaunchError) as info:
        D.init_process_group()
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and f"rank {rank} of WORLD_SIZE=2" in message
    assert "MSN_DS_RENDEZVOUS_TIMEOUT=1 s" in message
    assert not D.is_dist()


@pytest.mark.slow
def test_train_py_alone_in_a_world_of_two_exits_2(demo_root, tmp_path):
    port = free_port()
    proc = run_cli("train.py", "--config", "configs/demo_cpu.yaml", "--deepspeed_config",
                   "ds_configs/zero0_fp32.json", "--max-steps", "1",
                   f"data.root_path={demo_root}", f"logging.folder={tmp_path / 'run'}",
                   env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        D.RENDEZVOUS_TIMEOUT_VAR: "2"}, timeout=120, expect=2)
    assert f"127.0.0.1:{port}" in proc.stderr and "rank 0 of WORLD_SIZE=2" in proc.stderr
    assert "Traceback" not in proc.stderr
