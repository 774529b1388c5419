"""The DeepSpeed JSON config: read it, make it agree with the YAML, and refuse what
DeepSpeed would reject (or silently ignore) only after the engine has started."""
from __future__ import annotations

import copy
import functools
import json
import logging
import os

from . import distributed as D
from .config import ConfigError


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no ``zero_optimization``)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def read_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path}")
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
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
    accum = ds.get("gradient_accumulation_steps", 1)
    if accum != 1:
        raise ConfigError(f"{source}: gradient_accumulation_steps={accum}: MSN's Sinkhorn and "
                          "me-max need the whole batch in one step; raise criterion.batch_size")
    checks = {"train_micro_batch_size_per_gpu": micro,
              "train_batch_size": micro * world_size,
              "gradient_clipping": float(cfg["optimization"]["clip_grad"])}
    yaml_key = {"train_micro_batch_size_per_gpu": "criterion.batch_size",
                "train_batch_size": f"criterion.batch_size x {world_size} processes",
                "gradient_clipping": "optimization.clip_grad"}
    for key, want in checks.items():
        if key in ds and ds[key] != "auto" and float(ds[key]) != float(want):
            raise ConfigError(f"{source}: {key}={ds[key]} contradicts {yaml_key[key]}={want}")
        ds[key] = want
    ds["gradient_accumulation_steps"] = 1
    check_ds_config(ds, source)
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{source}: remove 'optimizer'/'scheduler': msn_ds builds AdamW with "
                          "the method's parameter groups and schedules them per step")
    if cfg["meta"]["compile"] and zero_stage(ds) == 3:
        raise ConfigError(f"{source}: meta.compile={cfg['meta']['compile']!r} with ZeRO-3: "
                          "its parameter-gathering hooks break the compiled graphs; use "
                          "ZeRO-1/2 or meta.compile=''")
    if ds.get("fp16", {}).get("enabled") and D.accelerator_name() != "cuda":
        raise ConfigError(f"{source}: fp16 needs a GPU (DeepSpeed's CPU accelerator rejects it);"
                          " use a bf16 or fp32 config")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


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
