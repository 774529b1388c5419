"""Process-group discovery and the few collectives the method needs.

Rank, local rank and world size come from whichever launcher started us: DeepSpeed's and
torchrun set ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``; ``srun`` without a launcher sets
``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``; a bare ``python train.py`` sets nothing
and runs as a world of one.

:func:`setup_env` checks what the launcher set before anything waits on it: a variable that
is not a number, or a rank outside the world, is a :class:`LaunchError` naming the variable
and its value (``train.py`` exits 2). When no launcher chose ``MASTER_PORT``, a world of one
takes a free port, and the tasks of a SLURM job take one derived from ``SLURM_JOB_ID`` (all
tasks compute the same, and two jobs on a node get different ones), never a fixed port that
a second job on the node would find taken. :func:`init_process_group` then meets the other
processes within ``MSN_DS_RENDEZVOUS_TIMEOUT`` seconds (default 300), or stops with a message
naming ``MASTER_ADDR:MASTER_PORT``, the rank and the world size, instead of waiting for a
process that was never started.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_VAR = "MSN_DS_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0  # seconds; a slow node's start fits, a missing one is named
DEFAULT_PORT = 29500  # torch's; only when several processes were started by hand without one
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000  # unprivileged, below Linux's ephemeral range
RENDEZVOUS_SCHEME = "msnds"  # init_method "msnds://": env:// plus the timeout above

_port_origin = ""  # how setup_env chose MASTER_PORT, for the log and the messages


class LaunchError(ValueError):
    """An environment the process group cannot start from (a launcher variable that is not a
    number or is out of range, ranks that disagree, a rendezvous that never completes); the
    message names the variables and their values."""


def env_int(name: str, default: int | None = None, minimum: int | None = None) -> int:
    """The integer in environment variable ``name`` (``default`` when unset)."""
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise LaunchError(f"environment variable {name} is not set")
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise LaunchError(f"environment variable {name}={raw!r} must be {minimum} or more")
    return value


def rendezvous_timeout() -> float:
    """Seconds to wait for every process at the rendezvous (``MSN_DS_RENDEZVOUS_TIMEOUT``)."""
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_VAR)
    if raw is None:
        return DEFAULT_RENDEZVOUS_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise LaunchError(f"environment variable {RENDEZVOUS_TIMEOUT_VAR}={raw!r} must be a "
                          "positive number of seconds")
    return value


def setup_env() -> None:
    """Fill the ``torch.distributed`` environment variables from SLURM or for one process,
    check them, and choose ``MASTER_PORT`` when no launcher did.

    DeepSpeed otherwise tries MPI discovery when ``python train.py`` runs without a launcher.
    Raises :class:`LaunchError`.
    """
    global _port_origin
    env = os.environ
    if "TORCH_EXTENSIONS_DIR" not in env and sys.prefix != sys.base_prefix:
        env["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = str(env_int("SLURM_PROCID", minimum=0))
        env["WORLD_SIZE"] = str(env_int("SLURM_NTASKS", minimum=1))
        env["LOCAL_RANK"] = str(env_int("SLURM_LOCALID", 0, minimum=0))
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
            env["MASTER_ADDR"] = _first_slurm_host(nodes)
    world, rank = check_ranks()
    if "MASTER_PORT" in env:
        _master_port()
        _port_origin = "set by the launcher"
    elif world == 1:  # nobody to agree with: any free local port will do
        env["MASTER_PORT"] = str(_free_port())
        _port_origin = "free, chosen for a world of one"
    elif _slurm_job_id() is not None:
        env["MASTER_PORT"] = str(slurm_port(_slurm_job_id(), _slurm_step_id()))
        _port_origin = (f"derived from SLURM_JOB_ID={_slurm_job_id()}"
                        + (f", SLURM_STEP_ID={_slurm_step_id()}" if _slurm_step_id() else ""))
    else:
        env["MASTER_PORT"] = str(DEFAULT_PORT)
        _port_origin = "torch's default: set MASTER_PORT to choose another"
    env.setdefault("RANK", str(rank))
    env.setdefault("WORLD_SIZE", str(world))
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if not env["MASTER_ADDR"].strip():
        raise LaunchError("environment variable MASTER_ADDR is empty")
    rendezvous_timeout()  # a bad value is refused now, before any work


def check_ranks() -> tuple[int, int]:
    """``(WORLD_SIZE, RANK)``, checked against each other and against ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE``: unset ones are a world of one's. Raises :class:`LaunchError`."""
    env = os.environ
    world = env_int("WORLD_SIZE", 1, minimum=1)
    rank = env_int("RANK", 0, minimum=0)
    local = env_int("LOCAL_RANK", 0, minimum=0)
    ws = f"WORLD_SIZE={world}" + ("" if "WORLD_SIZE" in env else " (unset: a world of one)")
    if rank >= world:
        raise LaunchError(f"RANK={rank} with {ws}: ranks run from 0 to WORLD_SIZE-1 (was "
                          "WORLD_SIZE left out, or set for another launch?)")
    if local >= world:
        raise LaunchError(f"LOCAL_RANK={local} with {ws}: a local rank is below the world size")
    if "LOCAL_WORLD_SIZE" in env:
        local_world = env_int("LOCAL_WORLD_SIZE", minimum=1)
        if local_world > world:
            raise LaunchError(f"LOCAL_WORLD_SIZE={local_world} with {ws}: a node cannot hold "
                              "more processes than the world")
        if local >= local_world:
            raise LaunchError(f"LOCAL_RANK={local} with LOCAL_WORLD_SIZE={local_world}: a local "
                              "rank is below the local world size")
    return world, rank


def _master_port() -> int:
    port = env_int("MASTER_PORT")
    if not 1 <= port <= 65535:
        raise LaunchError(f"environment variable MASTER_PORT={os.environ['MASTER_PORT']!r} is "
                          "not a TCP port (1-65535)")
    return port


def _slurm_job_id() -> int | None:
    try:
        return int(os.environ["SLURM_JOB_ID"])
    except (KeyError, ValueError):
        return None


def _slurm_step_id() -> int:
    try:
        return max(int(os.environ["SLURM_STEP_ID"]), 0)
    except (KeyError, ValueError):  # the batch step says "batch", or there is no step
        return 0


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """The port every task of SLURM job ``job_id`` (step ``step_id``) derives alike: in
    ``[SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN)``. The first steps of two jobs share
    one only when their ids differ by a multiple of ``SLURM_PORT_SPAN``; concurrent steps of
    one job differ by their step id."""
    return SLURM_PORT_BASE + (job_id * 101 + step_id) % SLURM_PORT_SPAN


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
    return env_int("LOCAL_RANK", 0, minimum=0)


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


def extensions_dir() -> str | None:
    """Where DeepSpeed's JIT-built ops are cached: ``TORCH_EXTENSIONS_DIR``; in a virtual
    environment where it is unset, ``<venv>/torch_extensions`` (set by :func:`setup_env`),
    the folder ``make`` uses, so a direct ``python train.py`` reuses the build."""
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def _built(op: str) -> bool:
    import glob

    root = extensions_dir()
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return bool(glob.glob(os.path.join(root, op, f"{op}*.so"))
                or glob.glob(os.path.join(root, "*", op, f"{op}*.so")))


def init_process_group() -> None:
    """Pin this process to its GPU, then join the process group with the accelerator's own
    backend (nccl on CUDA, gloo on the CPU). ``set_device`` comes first, so that nothing
    (NCCL's communicator included) creates a context on GPU 0 for every local rank.

    The rendezvous is ``env://``'s with a deadline (:func:`rendezvous_timeout`): a process
    that does not meet all ``WORLD_SIZE`` processes in time raises :class:`LaunchError`
    naming ``MASTER_ADDR:MASTER_PORT``, its rank and the world size. Collectives keep
    DeepSpeed's own timeout."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _register_rendezvous()
    if accelerator_name() == "cuda":
        torch.cuda.set_device(local_rank())
    elif os.environ.get("RANK", "0") == "0" and not _built("deepspeed_shm_comm"):
        log.info("building DeepSpeed's CPU communication op once (about a minute; needs a C++ "
                 "compiler); it is cached in %s", extensions_dir() or "torch's default folder")
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               init_method=f"{RENDEZVOUS_SCHEME}://")


def _register_rendezvous() -> None:
    from torch.distributed.rendezvous import register_rendezvous_handler

    try:
        register_rendezvous_handler(RENDEZVOUS_SCHEME, _rendezvous_handler)
    except RuntimeError:  # registered by an earlier call
        pass


def _rendezvous_handler(url: str, timeout: timedelta | None = None, **kwargs):
    """``env://`` (the launcher's variables; the elastic agent's store under torchrun) whose
    store waits at most :func:`rendezvous_timeout` for the others, then a barrier on that
    store within the same deadline: every process has arrived when it returns."""
    world, rank = check_ranks()
    wait = rendezvous_timeout()
    port = _master_port()
    addr = os.environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise LaunchError("environment variable MASTER_ADDR is not set (or empty)")
    origin = f" (port {_port_origin})" if _port_origin else ""
    log.info("rendezvous at %s:%s%s: rank %d of %d, waiting up to %g s (%s)", addr, port,
             origin, rank, world, wait, RENDEZVOUS_TIMEOUT_VAR)
    start = time.monotonic()

    def failure(e: BaseException) -> LaunchError:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300].rstrip(".")
        return LaunchError(
            f"rendezvous at MASTER_ADDR:MASTER_PORT = {addr}:{port}{origin} failed for rank "
            f"{rank} of WORLD_SIZE={world} after {time.monotonic() - start:.0f} s: "
            f"{reason}. Check that all {world} processes were started with the same "
            f"MASTER_ADDR, MASTER_PORT and WORLD_SIZE, and that rank 0 can listen on that "
            f"port ({RENDEZVOUS_TIMEOUT_VAR}={wait:g} s is the deadline)")

    try:
        if rank != 0:  # rank 0 listens; wait for it here, where a retry logs nothing
            _wait_for_listener(addr, port, start + wait)
        store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(
            seconds=max(wait - (time.monotonic() - start), 1.0))))
    except Exception as e:  # noqa: BLE001  no server, a port in use, clients missing
        raise failure(e) from None
    key = f"msn_ds/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        if store.add(key, 1) >= world:
            store.set(key + "/all", "1")
        store.set_timeout(timedelta(seconds=max(wait - (time.monotonic() - start), 1.0)))
        store.wait([key + "/all"])
    except Exception as e:  # noqa: BLE001  a process missing, or rank 0 gone
        raise failure(e) from None
    if timeout is not None:
        store.set_timeout(timeout)  # collectives' own (torch sets it again)
    yield store, rank, world
    raise RuntimeError(f"{RENDEZVOUS_SCHEME}:// cannot rendezvous again")


def _wait_for_listener(addr: str, port: int, deadline: float) -> None:
    """Until something accepts connections at ``addr:port`` (rank 0's store), or
    ``TimeoutError`` at ``deadline`` (``time.monotonic()``)."""
    import socket

    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(min(left, 2.0), 0.1)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing accepted a connection at {addr}:{port} "
                                   f"({e.strerror or e}): rank 0 not started, or elsewhere"
                                   ) from None
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))


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


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
"""SLURM's pre-emption (SIGTERM) and time-limit warning (SIGUSR1), and Ctrl-C (SIGINT)."""


def shield_worker(*_) -> None:
    """Keep a data-loading worker process alive through :data:`STOP_SIGNALS` (a
    ``worker_init_fn`` for torch's DataLoader, called by DALI's host workers too).

    SLURM's ``scancel`` and pre-emption, and Ctrl-C in a terminal, signal every process of
    the job's process group, loader workers included. A worker that dies of the signal takes
    the trainer down (``DataLoader worker ... killed by signal``) before it can save. So a
    worker ignores these signals, and the trainer, which received the same signal, saves,
    stops and shuts its workers down as usual. Two cases still end a worker, as torch's own
    handler does: SIGTERM sent by its parent (a loader terminating a stuck worker) and any
    of them once its parent is gone. The sender is known only to ``sigwaitinfo``, so the
    signals are blocked and a thread waits for them; a thread that was started before and
    so did not block them meets a handler that ignores them."""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask"):
        return
    sigs = {getattr(signal, n) for n in STOP_SIGNALS if hasattr(signal, n)}
    parent = os.getppid()
    for s in sigs:
        signal.signal(s, _ignore_signal)
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(sigs)
            if (info.si_signo == signal.SIGTERM and info.si_pid == parent
                    or os.getppid() != parent):
                os._exit(0)

    threading.Thread(target=wait, name="stop-signal-shield", daemon=True).start()


def _ignore_signal(signum, frame) -> None:
    pass


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's pre-emption and time-limit warnings) and SIGINT (Ctrl-C;
    a second one stops at once, without saving) set a flag. The
    training step carries it to every process inside the all-reduce it makes anyway
    (``MSNTrainer.step``/``poll``), so that all processes save and stop at the same step
    without a host sync of their own.

    ``level`` says how the run ends once saved: ``SIGNAL`` with exit status 0 (pre-emption:
    the scheduler requeues and the run resumes), ``FAILURE`` with 2 (the run cannot go on,
    e.g. too much unreadable data: a requeue must not take it for a clean finish). Processes
    agree on the highest level any of them asked for."""

    SIGNAL, FAILURE = 1, 2

    def __init__(self, signals=STOP_SIGNALS):
        import signal

        self.flag = False
        self.level = 0
        self.received: str | None = None
        for name in signals:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":  # Ctrl-C twice: stop at once
            raise KeyboardInterrupt
        if name == "SIGINT":
            import logging

            logging.getLogger("msn_ds").warning(
                "SIGINT: saving at the end of this step, then exiting (Ctrl-C again to stop "
                "at once, without saving)")
        self.flag = True
        self.level = max(self.level, self.SIGNAL)
        self.received = name

    def fail(self, reason: str) -> None:
        """Stop because the run cannot go on (exit status 2 after saving)."""
        self.flag, self.level, self.received = True, self.FAILURE, reason
