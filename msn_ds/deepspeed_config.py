"""The DeepSpeed JSON config: read it, make it agree with the YAML, and refuse what
DeepSpeed would reject (or silently ignore) only after the engine has started."""
from __future__ import annotations

import copy
import functools
import json
import logging
import os

from . import distributed as D
from .config import ConfigError, read_text

log = logging.getLogger(__name__)


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no ``zero_optimization``)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def read_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a DeepSpeed config") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: must be a JSON object of DeepSpeed sections, got a "
                          f"{type(ds).__name__}")
    return ds


def resolve_ds_config(ds: dict, cfg: dict, world_size: int, source: str = "<ds_config>") -> dict:
    """Make the DeepSpeed config agree with the YAML: batch size per process comes from
    ``criterion.batch_size`` and clipping from ``optimization.clip_grad``. A value the JSON
    also sets must agree; a contradiction names both."""
    ds = copy.deepcopy(ds)
    micro = cfg["criterion"]["batch_size"]
    accum = accumulation_steps(ds, micro, world_size, source,
                               cfg["criterion"].get("global_batch_size"))
    checks = {"train_micro_batch_size_per_gpu": micro,
              "train_batch_size": micro * world_size * accum,
              "gradient_clipping": float(cfg["optimization"]["clip_grad"])}
    yaml_key = {"train_micro_batch_size_per_gpu": "criterion.batch_size",
                "train_batch_size": f"criterion.batch_size x {world_size} processes"
                                    + (f" x gradient_accumulation_steps {accum}" if accum > 1
                                       else ""),
                "gradient_clipping": "optimization.clip_grad"}
    for key, want in checks.items():
        if key in ds and ds[key] != "auto" and float(ds[key]) != float(want):
            raise ConfigError(f"{source}: {key}={ds[key]} contradicts {yaml_key[key]}={want}")
        ds[key] = want
    ds["gradient_accumulation_steps"] = accum
    check_ds_config(ds, source)
    if accum > 1:
        refuse_accumulation(ds, cfg, accum, source)
    if trainer_clips(ds):
        # MSNTrainer clips on the device instead (same rule, no host values: see
        # trainer_clips); DeepSpeed must not clip a second time
        ds["gradient_clipping"] = 0.0
    elif zero_stage(ds) == 0 and _enabled(ds, "bf16", "bfloat16", "fp16"):
        log.warning("%s: ZeRO-0 in bf16/fp16: DeepSpeed's FP16_UnfusedOptimizer reads every "
                    "gradient's overflow flag and each group's norm on the host at every step "
                    "(a device wait each); use ZeRO-1, which keeps the same memory on one "
                    "GPU and reads one flag per step", source)
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{source}: remove 'optimizer'/'scheduler': msn_ds builds AdamW with "
                          "the method's parameter groups and schedules them per step")
    if cfg["meta"]["compile"] and zero_stage(ds) == 3:
        raise ConfigError(f"{source}: meta.compile={cfg['meta']['compile']!r} with ZeRO-3: "
                          "its parameter-gathering hooks break the compiled graphs; use "
                          "ZeRO-1/2 or meta.compile=''")
    if zero_stage(ds) == 0 and _enabled(ds, "fp16"):
        # engine.backward scales the loss only for ZeRO optimizers, while ZeRO-0's
        # FP16_Optimizer.step() divides every gradient by the loss scale all the same: updates
        # 2^16 times too small, a run that silently does not train (DeepSpeed 0.19,
        # deepspeedai/DeepSpeed#8393)
        raise ConfigError(f"{source}: fp16 with ZeRO stage 0: DeepSpeed never scales the loss "
                          "there but unscales the gradients, so the updates are thousands of "
                          "times too small (deepspeedai/DeepSpeed#8393); use ZeRO-1 (the same "
                          "memory on one GPU), or bf16")
    if ds.get("fp16", {}).get("enabled") and D.accelerator_name() != "cuda":
        raise ConfigError(f"{source}: fp16 needs a GPU (DeepSpeed's CPU accelerator rejects it);"
                          " use a bf16 or fp32 config")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    _throughput_timer_off(ds, source)
    return ds


def accumulation_steps(ds: dict, micro: int, world_size: int, source: str,
                       global_batch: int | None = None) -> int:
    """DeepSpeed's ``gradient_accumulation_steps`` (``A``): the micro-batches of
    ``criterion.batch_size`` images each process runs per optimizer step, exactly as one step
    over ``A`` times the batch (msn_ds/accumulate.py: the gradient cache). Unset or
    ``"auto"``: DeepSpeed's rule, ``train_batch_size / (micro-batch x processes)``, when the
    JSON sets ``train_batch_size``, else 1. ``global_batch`` (``criterion.global_batch_size``,
    a recipe's own batch) acts as ``train_batch_size``: the same recipe then runs on any
    number of processes that divides it, as fewer processes x more micro-batches."""
    accum = ds.get("gradient_accumulation_steps", "auto")
    total = ds.get("train_batch_size", "auto")
    if global_batch is not None:
        per_pass = micro * world_size
        if global_batch % per_pass:
            raise ConfigError(
                f"criterion.global_batch_size={global_batch} is not a multiple of "
                f"criterion.batch_size {micro} x {world_size} processes = {per_pass}: change "
                "criterion.batch_size or the number of processes")
        want = global_batch // per_pass
        if total not in ("auto", None) and total != global_batch:
            raise ConfigError(f"{source}: train_batch_size={total} contradicts "
                              f"criterion.global_batch_size={global_batch}")
        if accum not in ("auto", None) and accum != want:
            raise ConfigError(f"{source}: gradient_accumulation_steps={accum} contradicts "
                              f"criterion.global_batch_size={global_batch} = "
                              f"{micro} x {world_size} processes x {want}")
        return want
    if accum == "auto" or accum is None:
        if total == "auto" or total is None:
            return 1
        per_pass = micro * world_size
        if not isinstance(total, int) or isinstance(total, bool) or total < per_pass \
                or total % per_pass:
            raise ConfigError(f"{source}: train_batch_size={total} is not a multiple of "
                              f"criterion.batch_size x {world_size} processes = {per_pass}")
        return total // per_pass
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise ConfigError(f"{source}: gradient_accumulation_steps={accum!r}: must be a whole "
                          "number >= 1")
    return accum


def refuse_accumulation(ds: dict, cfg: dict, accum: int, source: str) -> None:
    """What the gradient cache does not cover yet, refused before any work."""
    why = None
    zero = ds.get("zero_optimization", {})
    if any(isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"
             for k in ("offload_optimizer", "offload_param")):
        why = "ZeRO-Offload; use ZeRO-1/2 on the device"
    elif cfg["meta"]["compile"]:
        why = f"meta.compile={cfg['meta']['compile']!r}; use meta.compile=''"
    if why:
        raise ConfigError(f"{source}: gradient_accumulation_steps={accum} is not supported with "
                          f"{why}, or gradient_accumulation_steps=1")


def _throughput_timer_off(ds: dict, source: str) -> None:
    """DeepSpeed's throughput timer is on by default, ``synchronized``: since the engine
    gets no training data it calls ``get_accelerator().synchronize()`` at each forward and
    at each ``engine.step()`` (``deepspeed/utils/timer.py``, ``ThroughputTimer.start/stop``):
    two whole-device waits per step, for a number we never read (the monitor measures
    throughput itself). Off unless the JSON asks for it; then a warning says what it costs."""
    timers = ds.setdefault("timers", {})
    if not isinstance(timers, dict):
        raise ConfigError(f"{source}: timers must be a JSON object, got {timers!r}")
    if "throughput" not in timers:
        timers["throughput"] = {"enabled": False, "synchronized": False}
        return
    mine = timers["throughput"]
    if not isinstance(mine, dict):
        raise ConfigError(f"{source}: timers.throughput must be a JSON object, got {mine!r}")
    if mine.get("enabled", True) and mine.get("synchronized", True):  # DeepSpeed's defaults
        log.warning("%s: timers.throughput is enabled and synchronized: DeepSpeed then waits "
                    "for the device twice per step (at the forward and at engine.step()); "
                    "set \"synchronized\": false or drop the section to step without waits",
                    source)


def _enabled(ds: dict, *sections: str) -> bool:
    return any(isinstance(ds.get(k), dict) and ds[k].get("enabled", False) for k in sections)


def trainer_clips(ds: dict) -> bool:
    """ZeRO-0 in fp32: the trainer clips the gradients itself, on the device, between
    ``engine.backward`` and ``engine.step`` (``torch.nn.utils.clip_grad_norm_`` with foreach),
    and DeepSpeed's clipping is off. DeepSpeed's ``clip_grad_norm_`` (``runtime/utils.py``,
    via ``engine.clip_fp32_gradients``) builds ``max_norm`` and ``1.0`` as device tensors
    from host floats each step (on CUDA, a copy from pageable memory: a stream wait each)
    and all-reduces a norm that every process already has. Same rule, provably: at ZeRO-0
    the engine's backward has already averaged the gradients over processes, so every
    process holds the gradients DeepSpeed's step would clip, and both scale them by
    ``min(1, max_norm / (||g||_2 + 1e-6))`` over all the module's gradients. At ZeRO-1/2/3
    the gradients are reduced and partitioned inside DeepSpeed's step, and bf16/fp16 clip
    the fp32 master gradients there: DeepSpeed clips, as before."""
    return (zero_stage(ds) == 0 and not _enabled(ds, "bf16", "bfloat16", "fp16", "torch_autocast")
            and float(ds.get("gradient_clipping", 0.0) or 0.0) > 0.0)


def check_ds_config(ds: dict, source: str) -> None:
    """What DeepSpeed would reject after the engine starts, refused now: its own validation
    (ZeRO stage, unknown keys inside a section), plus unknown top-level keys, which it
    silently ignores (a typo such as ``zero_optimisation`` would drop ZeRO altogether)."""
    import difflib

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger
    from pydantic import ValidationError

    known = deepspeed_keys()
    for key in ds:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown DeepSpeed key {key!r}{hint}")
    probe = {k: v for k, v in ds.items() if k != "train_batch_size"}  # world size unknown yet
    quiet = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # its parser logs the world size it guessed
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        err = e.errors()[0]
        section = _DS_SECTIONS.get(e.title, e.title)
        where = ".".join(str(x) for x in (section, *err["loc"]))
        raise ConfigError(f"{source}: {where}: {err['msg']}"
                          + (f" (got {err['input']!r})" if "input" in err
                             and not isinstance(err["input"], dict) else "")) from None
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{source}: DeepSpeed rejects it: {type(e).__name__}: {e}") from None
    finally:
        ds_logger.setLevel(quiet)


_DS_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                "DeepSpeedFP16Config": "fp16", "DeepSpeedZeroOffloadParamConfig":
                "zero_optimization.offload_param", "DeepSpeedZeroOffloadOptimizerConfig":
                "zero_optimization.offload_optimizer"}


@functools.lru_cache(maxsize=1)
def deepspeed_keys() -> frozenset[str]:
    """The top-level keys this DeepSpeed knows: those its config parser reads (recorded on an
    empty config) and the key names in its config and constants modules."""
    import ast
    import pathlib

    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recorder(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __copy__(self):
            return self

    try:
        DeepSpeedConfig(Recorder(train_micro_batch_size_per_gpu=1))
    except Exception:  # the recorded keys are what matters
        pass
    root = pathlib.Path(deepspeed.__file__).parent
    for path in root.rglob("*.py"):
        if "constants" in path.name or "config" in path.name:
            try:
                tree = ast.parse(path.read_text())
            except (SyntaxError, UnicodeDecodeError):
                continue
            seen.update(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                        and isinstance(n.value, str) and n.value.isidentifier()
                        and n.value.islower())
    return frozenset(seen)
