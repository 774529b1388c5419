"""Process-group discovery and the few collectives the method needs.

Rank, local rank and world size come from whichever launcher started us: DeepSpeed's and
torchrun set ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``; ``srun`` without a launcher sets
``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``; a bare ``python train.py`` sets nothing
and runs as a world of one.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_env() -> None:
    """Fill the ``torch.distributed`` environment variables from SLURM or for one process.

    DeepSpeed otherwise tries MPI discovery when ``python train.py`` runs without a launcher.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
            env["MASTER_ADDR"] = _first_slurm_host(nodes)
    if "WORLD_SIZE" not in env:  # a world of one: any free local port will do
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-010,012],cpu1``."""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split("-")[0].split(",")[0].rstrip("]")
    return prefix + first


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def accelerator_name() -> str:
    """The device type DeepSpeed's accelerator drives ("cuda", "cpu", ...). It honours
    ``DS_ACCELERATOR``, so a host with a visible GPU can still run the CPU path."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def step_device() -> torch.device:
    """This process's compute device: its local GPU under a CUDA accelerator, else the CPU."""
    if accelerator_name() == "cuda":
        return torch.device("cuda", local_rank())
    return torch.device(accelerator_name())


def init_process_group() -> None:
    """Pin this process to its GPU, then join the process group with the accelerator's own
    backend (nccl on CUDA, gloo on the CPU). ``set_device`` comes first, so that nothing
    (NCCL's communicator included) creates a context on GPU 0 for every local rank."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if accelerator_name() == "cuda":
        torch.cuda.set_device(local_rank())
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def comm_device() -> torch.device:
    """Where a tensor for a collective must live: the GPU under nccl, the CPU under gloo."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no autograd)."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _AllReduceMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        if world_size() == 1:
            return x
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / world_size()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes whose backward passes the gradient through unchanged.

    Every process computes the same global mean and backpropagates its own copy of the
    loss; the data-parallel engine then *averages* parameter gradients. Passing the gradient
    through unchanged makes that average equal the gradient of the global objective (the
    reference's ``AllReduce`` does the same).
    """
    return _AllReduceMean.apply(x)


def from_main(value):
    """Collective: rank 0's ``value`` (picklable) on every process; what rank 0 found out
    alone (an error included), so that all act alike and none waits for it."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group so that gloo's threads end before interpreter shutdown
    (without this a torchrun child occasionally aborts at exit)."""
    if is_dist():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over processes: each process's input influences every process's
    loss, so the backward sums the incoming gradients too (what SyncBatchNorm needs)."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's pre-emption and time-limit warnings) set a flag. The
    training step carries it to every process inside the all-reduce it makes anyway
    (``MSNTrainer.step``/``poll``), so that all processes save and stop at the same step
    without a host sync of their own.

    ``level`` says how the run ends once saved: ``SIGNAL`` with exit status 0 (pre-emption:
    the scheduler requeues and the run resumes), ``FAILURE`` with 2 (the run cannot go on,
    e.g. too much unreadable data: a requeue must not take it for a clean finish). Processes
    agree on the highest level any of them asked for."""

    SIGNAL, FAILURE = 1, 2

    def __init__(self, signals=("SIGTERM", "SIGUSR1")):
        import signal

        self.flag = False
        self.level = 0
        self.received: str | None = None
        for name in signals:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        self.flag = True
        self.level = max(self.level, self.SIGNAL)
        self.received = signal.Signals(signum).name

    def fail(self, reason: str) -> None:
        """Stop because the run cannot go on (exit status 2 after saving)."""
        self.flag, self.level, self.received = True, self.FAILURE, reason
