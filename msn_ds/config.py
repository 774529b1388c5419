"""Experiment configuration: the reference's YAML sections and keys, plus ours.

A config written for the reference (``meta``, ``criterion``, ``data``, ``optimization``,
``logging``) loads unchanged; keys it lacks take the defaults below. Any key can be
overridden on the command line as ``section.key=value`` (the value is parsed as YAML).
Everything is checked before any work starts: an unknown key, a wrong type, a value out of
range (:data:`RANGES` declares one for every numeric key) or a missing data folder is an
error naming the key, the value and the file.
"""
from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

# section -> key -> (accepted types, default). ``None`` in the types means "may be null".
_NUM = (int, float)
SCHEMA: dict[str, dict[str, tuple[tuple, Any]]] = {
    "meta": {
        # reference keys
        "model_name": ((str,), "vit_small_16"),
        "output_dim": ((int,), 256),
        "hidden_dim": ((int,), 2048),
        "use_bn": ((bool,), True),
        "drop_path_rate": (_NUM, 0.0),
        "use_pred_head": ((bool,), False),
        "two_layer": ((bool,), False),
        "bottleneck": ((int,), 1),
        "load_checkpoint": ((bool,), False),
        "read_checkpoint": ((str, None), None),
        "copy_data": ((bool,), False),
        "use_fp16": ((bool,), False),
        # ours
        "seed": ((int,), 0),
        "activation_checkpointing": ((int,), 0),
        "nonfinite_patience": ((int,), 10),
        "compile": ((str,), ""),  # torch.compile backend for the ViT blocks; "" = eager
        "init_weights": ((str, None), None),  # a weights file to start both encoders from
        # init_weights' missing/unexpected keys are an error unless this is false
        "init_strict": ((bool,), True),
        # sizes above their sanity ceiling (RANGES: hidden_dim, num_proto, ...) are refused
        # unless this is true: a typo such as hidden_dim=1000000 would ask for terabytes
        "allow_large": ((bool,), False),
        # the target (EMA) encoder's forward: "model" computes in the engine's dtype (bf16
        # under a bf16 DeepSpeed config), "fp32" in fp32 from fp32 weights (TARGET_DTYPES)
        "target_dtype": ((str,), "model"),
    },
    "criterion": {
        "num_proto": ((int,), 1024),
        "temperature": (_NUM, 0.1),
        "start_sharpen": (_NUM, 0.25),
        "final_sharpen": (_NUM, 0.25),
        "me_max": ((bool,), True),
        "memax_weight": (_NUM, 1.0),
        "use_ent": ((bool,), False),
        "ent_weight": (_NUM, 1.0),  # the reference's default (used only with use_ent)
        "use_sinkhorn": ((bool,), True),
        "freeze_proto": ((bool,), False),
        "batch_size": ((int,), 64),
        # ours: the global batch a recipe is for; gradient_accumulation_steps follows from it
        # (global / (batch_size x processes)); null: batch_size x processes x the JSON's
        "global_batch_size": ((int, None), None),
        # ours
        "sinkhorn_iters": ((int,), 3),
        "per_sample_mask": ((bool,), False),
        # me-max's target: uniform (MSN) or PMSN's power law k^(-prior_tau) (docs/method.md)
        "prior": ((str,), "uniform"),
        "prior_tau": (_NUM, 0.25),
    },
    "data": {
        "root_path": ((str,), "datasets/"),
        "image_folder": ((str,), "imagenet/"),
        "num_workers": ((int,), 8),
        "pin_mem": ((bool,), True),
        "color_jitter_strength": (_NUM, 0.5),
        "label_smoothing": (_NUM, 0.0),
        "patch_drop": (_NUM, 0.15),
        "rand_size": ((int,), 224),
        "focal_size": ((int,), 96),
        "rand_views": ((int,), 1),
        "focal_views": ((int,), 10),
        # ours
        "rand_scale": ((list,), [0.3, 1.0]),
        "focal_scale": ((list,), [0.05, 0.3]),
        "max_bad_fraction": (_NUM, 0.01),
        # torch | dali | auto (dali with a CUDA GPU and DALI). torch by default until the
        # DALI GPU path has run on a GPU (its CPU mode is tested).
        "loader": ((str,), "torch"),
        # WebDataset tar shards instead of <root_path>/<image_folder>/train: a brace pattern
        # ("/data/train-{000000..000127}.tar") or a list of them (msn_ds/data/shards.py)
        "shards": ((str, list, None), None),
    },
    "optimization": {
        "epochs": ((int,), 800),
        "warmup": (_NUM, 15),
        "start_lr": (_NUM, 2e-4),
        "lr": (_NUM, 1e-3),
        "final_lr": (_NUM, 1e-6),
        "weight_decay": (_NUM, 0.04),
        "final_weight_decay": (_NUM, 0.4),
        "clip_grad": (_NUM, 3.0),
        # ours
        "ipe_scale": (_NUM, 1.25),
        "start_momentum": (_NUM, 0.996),
        "final_momentum": (_NUM, 1.0),
    },
    "logging": {
        "folder": ((str,), "runs/msn/"),
        "write_tag": ((str,), "msn"),
        # ours
        "log_every": ((int,), 10),
        "tensorboard": ((bool,), True),
        "checkpoint_every_steps": ((int,), 0),
        "keep_last": ((int,), 3),
        "peak_tflops": (_NUM, 0.0),  # the device's peak for MFU; 0: known GPUs by name
    },
    # ours: k-NN accuracy of the target encoder during pretraining (eval/knn_monitor.py)
    "eval": {
        "knn_every_steps": ((int,), 0),  # 0: off
        "knn_train": ((str, None), None),  # image folder or subset file; null: the train folder
        "knn_train_per_class": ((int, None), None),  # a balanced subset of the folder; null: all
        "knn_val": ((str, None), None),  # image folder; null: <root_path>/<image_folder>/val
        "knn_k": ((int,), 20),
        "knn_crop": ((int, None), None),  # null: data.rand_size
        "knn_resize": ((int, None), None),  # null: the crop x 256/224
        "knn_batch_size": ((int,), 256),
    },
}

# Reference keys that we accept for compatibility but that select behaviour we do not have.
UNSUPPORTED_IF = {
    ("meta", "use_pred_head"): True,
    ("meta", "two_layer"): True,
    ("meta", "copy_data"): True,
    ("meta", "load_checkpoint"): True,
}


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: finite, in ``[lo, hi]`` (``lo_open``/``hi_open``:
    the bound itself excluded). ``large``: a sanity ceiling below ``hi`` for sizes that
    allocate memory, lifted by ``meta.allow_large: true``. ``note``: why, for the message."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    large: Optional[int] = None
    note: str = ""

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        return (f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}"
                f"{')' if self.hi_open else ']'}")

    def problem(self, value: Any, allow_large: bool = False) -> Optional[str]:
        """Why ``value`` is out of this range (a phrase after the key), or None."""
        note = f" ({self.note})" if self.note else ""
        if not math.isfinite(value):
            return f"must be a finite number in {self.describe()}, got {value!r}{note}"
        below = value <= self.lo if self.lo_open else value < self.lo
        above = value >= self.hi if self.hi_open else value > self.hi
        if below or above:
            return f"must be in {self.describe()}, got {value!r}{note}"
        if self.large is not None and value > self.large and not allow_large:
            return (f"= {value!r} is above its sanity ceiling of {self.large} (a likely typo "
                    "that would allocate far more memory than any GPU has); set "
                    "meta.allow_large=true if you mean it")
        return None


INT_MAX = 2 ** 31 - 1  # counts with no natural ceiling
# (section, key) -> Range, for every numeric key of SCHEMA (a test checks none is missing).
# Checked first in validate(): nothing downstream sees a NaN, an infinity, a negative rate
# or a size typo. Cross-key rules (view geometry, the patch size) come after.
RANGES: dict[tuple[str, str], Range] = {
    ("meta", "output_dim"): Range(1, INT_MAX, large=16384),
    ("meta", "hidden_dim"): Range(1, INT_MAX, large=16384),
    ("meta", "drop_path_rate"): Range(0, 1, hi_open=True),
    ("meta", "bottleneck"): Range(1, 1, note="only 1, the reference's value, is supported"),
    ("meta", "seed"): Range(0, 2 ** 63 - 1),
    ("meta", "activation_checkpointing"): Range(0, 1024, note="0: off, k: every k-th block"),
    ("meta", "nonfinite_patience"): Range(1, INT_MAX),
    ("criterion", "num_proto"): Range(1, INT_MAX, large=65536),
    ("criterion", "temperature"): Range(0, 100, lo_open=True),
    ("criterion", "start_sharpen"): Range(0, 100, lo_open=True),
    ("criterion", "final_sharpen"): Range(0, 100, lo_open=True),
    ("criterion", "memax_weight"): Range(0, 1e6),
    ("criterion", "ent_weight"): Range(0, 1e6),
    ("criterion", "batch_size"): Range(1, INT_MAX, large=8192, note="images per process"),
    ("criterion", "global_batch_size"): Range(1, INT_MAX, note="images per optimizer step"),
    ("criterion", "sinkhorn_iters"): Range(0, 1000),
    ("criterion", "prior_tau"): Range(0, 100, note="PMSN's power-law exponent; 0 is uniform"),
    ("data", "num_workers"): Range(0, 1024),
    ("data", "color_jitter_strength"): Range(0, 2.5, note="its hue jitter, 0.2 x it, must "
                                                           "stay within 0.5"),
    ("data", "label_smoothing"): Range(0, 1, hi_open=True),
    ("data", "patch_drop"): Range(0, 1, hi_open=True),
    ("data", "rand_size"): Range(1, INT_MAX, large=1024),
    ("data", "focal_size"): Range(1, INT_MAX, large=1024),
    ("data", "rand_views"): Range(1, INT_MAX, large=64, note="the masked anchor view"),
    ("data", "focal_views"): Range(0, INT_MAX, large=256),
    ("data", "max_bad_fraction"): Range(0, 1),
    ("optimization", "epochs"): Range(1, 10 ** 6),
    ("optimization", "warmup"): Range(0, 10 ** 6, note="in epochs"),
    ("optimization", "start_lr"): Range(0, 10),
    ("optimization", "lr"): Range(0, 10),
    ("optimization", "final_lr"): Range(0, 10),
    ("optimization", "weight_decay"): Range(0, 10),
    ("optimization", "final_weight_decay"): Range(0, 10),
    ("optimization", "clip_grad"): Range(0, 1e9, note="0: no clipping"),
    ("optimization", "ipe_scale"): Range(0, 100, lo_open=True, note="the schedules' horizon "
                                                                    "over the training steps"),
    ("optimization", "start_momentum"): Range(0, 1),
    ("optimization", "final_momentum"): Range(0, 1),
    ("logging", "log_every"): Range(1, INT_MAX),
    ("logging", "checkpoint_every_steps"): Range(0, INT_MAX, note="0: off"),
    ("logging", "keep_last"): Range(0, INT_MAX, note="0: keep every checkpoint"),
    ("logging", "peak_tflops"): Range(0, 1e9, note="0: known GPUs by name"),
    ("eval", "knn_every_steps"): Range(0, INT_MAX, note="0: off"),
    ("eval", "knn_train_per_class"): Range(1, INT_MAX),
    ("eval", "knn_k"): Range(1, INT_MAX),
    ("eval", "knn_crop"): Range(1, INT_MAX, large=1024),
    ("eval", "knn_resize"): Range(1, INT_MAX, large=1024),
    ("eval", "knn_batch_size"): Range(1, INT_MAX, large=8192),
}
# logging.write_tag names files in logging.folder: a plain name, never a path
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")


LOADERS = ("auto", "dali", "torch")
PRIORS = ("uniform", "power_law")  # criterion.prior (msn_ds.loss.MSNLoss.PRIORS)
COMPILE_BACKENDS = ("", "inductor", "aot_eager")
TARGET_DTYPES = ("model", "fp32")  # meta.target_dtype (msn_ds.engine.init_target)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


def defaults() -> dict[str, dict[str, Any]]:
    return {sec: {k: copy.deepcopy(v[1]) for k, v in keys.items()} for sec, keys in SCHEMA.items()}


MAX_CONFIG_NODES = 100_000
"""A config expanded through its YAML aliases (``*name``) past this many values is refused:
nine nested aliases of nine ("a billion laughs") would otherwise expand to 10^9 values."""


def read_text(path: str) -> str:
    """A config file's text, which must be UTF-8: a Latin-1 file names the byte and where."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                          "save it as UTF-8") from None


def safe_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing a document that its aliases expand past
    :data:`MAX_CONFIG_NODES` values (the size every later step would see)."""
    value = yaml.safe_load(text)
    budget = [MAX_CONFIG_NODES]

    def walk(node: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0 or depth > 100:
            raise ConfigError(f"{source}: the YAML expands to more than {MAX_CONFIG_NODES} "
                              "values or 100 levels through its aliases (*name); refused")
        if isinstance(node, dict):
            for k, v in node.items():
                walk(k, depth + 1)
                walk(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                walk(v, depth + 1)

    walk(value, 0)
    return value


def load_config(path: Optional[str], overrides: Iterable[str] = (), check_paths: bool = True
                ) -> dict[str, dict[str, Any]]:
    """Defaults <- YAML file <- ``section.key=value`` overrides, then validated."""
    cfg = defaults()
    source = path or "<defaults>"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = safe_yaml(read_text(path), path) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, keys in raw.items():
            if section not in SCHEMA:
                raise ConfigError(f"{path}: unknown section {section!r} "
                                  f"(known: {', '.join(SCHEMA)})")
            if not isinstance(keys, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in keys.items():
                _set(cfg, section, key, value, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        if dotted.count(".") != 1:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        section, key = dotted.split(".")
        if section not in SCHEMA:
            raise ConfigError(f"command line: unknown section {section!r} in {item!r} "
                              f"(known: {', '.join(SCHEMA)})")
        try:
            value = safe_yaml(text, f"override {dotted}") if text != "" else ""
        except yaml.YAMLError:
            value = text
        _set(cfg, section, key, value, "command line")
    validate(cfg, source, check_paths=check_paths)
    return cfg


def _set(cfg: dict, section: str, key: str, value: Any, origin: str) -> None:
    schema = SCHEMA[section]
    if key not in schema:
        close = [k for k in schema if k.startswith(key[:4])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{origin}: unknown key {section}.{key}{hint}")
    cfg[section][key] = _coerce(value, schema[key][0], f"{origin}: {section}.{key}")


def _coerce(value: Any, types: tuple, where: str) -> Any:
    if value is None:
        if None in types:
            return None
        raise ConfigError(f"{where} must not be null")
    if bool in types:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(value, bool):  # bool is an int subclass: never accept it as a number
        raise ConfigError(f"{where} must be {_names(types)}, got {value!r}")
    if float in types:
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif int in types and isinstance(value, int):
        return value
    elif str in types and isinstance(value, str):
        return value
    elif list in types and isinstance(value, list):
        return value
    raise ConfigError(f"{where} must be {_names(types)}, got {value!r} ({type(value).__name__})")


def _names(types: tuple) -> str:
    return " or ".join("null" if t is None else t.__name__ for t in types)


def validate(cfg: dict, source: str = "<config>", check_paths: bool = True) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key} {msg}")

    for (section, key), bad in UNSUPPORTED_IF.items():
        if cfg[section][key] == bad:
            fail(f"{section}.{key}", f"= {bad} is not supported by msn_ds (the reference "
                 "configs set it to false)" + ("; resume with train.py --resume"
                                               if key == "load_checkpoint" else ""))
    allow_large = cfg["meta"]["allow_large"]
    for (section, key), rng in RANGES.items():  # first: nothing below sees a bad number
        value = cfg[section][key]
        problem = None if value is None else rng.problem(value, allow_large)
        if problem:
            fail(f"{section}.{key}", problem)
    tag = cfg["logging"]["write_tag"]
    if not TAG_RE.fullmatch(tag) or ".." in tag:
        fail("logging.write_tag", f"= {tag!r} must be a plain file name (letters, digits and "
             "'_.+-', no '/' or '..'): it names <tag>-config.yaml and "
             "<tag>-target.safetensors in logging.folder")
    if not cfg["logging"]["folder"].strip():
        fail("logging.folder", "must not be empty")
    from .models import resolve_arch  # late import: keeps config importable without timm

    try:
        spec = resolve_arch(cfg["meta"]["model_name"])
    except ValueError as e:
        fail("meta.model_name", str(e))

    if cfg["meta"]["compile"] not in COMPILE_BACKENDS:
        fail("meta.compile", f"must be one of {COMPILE_BACKENDS}, got {cfg['meta']['compile']!r}")
    for key in ("rand_scale", "focal_scale"):
        v = cfg["data"][key]
        if (len(v) != 2 or not all(isinstance(x, _NUM) and not isinstance(x, bool) for x in v)
                or not 0 < v[0] <= v[1] <= 1):
            fail(f"data.{key}", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {v}")
    _check_views(cfg["data"], spec.patch_size, fail)
    if cfg["criterion"]["prior"] not in PRIORS:
        fail("criterion.prior", f"must be one of {', '.join(PRIORS)}, got "
             f"{cfg['criterion']['prior']!r}")
    if cfg["meta"]["target_dtype"] not in TARGET_DTYPES:
        fail("meta.target_dtype", f"must be one of {', '.join(TARGET_DTYPES)}, got "
             f"{cfg['meta']['target_dtype']!r}")
    if cfg["data"]["loader"] not in LOADERS:
        fail("data.loader", f"must be one of {', '.join(LOADERS)}, got {cfg['data']['loader']!r}")
    if cfg["data"]["shards"] is not None:
        from .data.shards import shard_problem  # late import: the data layer loads torch

        problem = shard_problem(cfg["data"]["shards"], check_files=check_paths)
        if problem:
            fail("data.shards", problem)
    ev = cfg["eval"]
    if check_paths and ev["knn_every_steps"]:
        train, val = knn_folders(cfg)
        if not os.path.exists(train):
            fail("eval.knn_train", f"points to a missing folder or subset file: {train}")
        if not os.path.isdir(val):
            fail("eval.knn_val", f"points to a missing folder: {val} (k-NN needs labelled "
                 "validation images; set eval.knn_val or eval.knn_every_steps=0)")
    init = cfg["meta"]["init_weights"]
    if check_paths and init is not None and not (os.path.isfile(init) or os.path.isdir(init)):
        fail("meta.init_weights", f"points to a missing weights file or folder: {init}")
    if check_paths and cfg["data"]["shards"] is None:
        train_dir = train_folder(cfg)
        if not os.path.isdir(train_dir):
            fail("data.root_path/data.image_folder",
                 f"point to a missing training folder: {train_dir} "
                 "(expected class sub-folders under <root_path>/<image_folder>/train/)")


def _check_views(data: dict, patch: int, fail) -> None:
    """Crops the patch can tile, a mask that keeps a token, and focal views smaller than the
    random ones, as in the method (the encoder masks the views the trainer names, whatever
    their size: ``MSNEncoder.forward(masked_views=...)``)."""
    for key in ("rand_size", "focal_size"):
        if data[key] < patch:
            fail(f"data.{key}", f"= {data[key]} is smaller than the patch ({patch} px)")
    side = data["rand_size"] // patch
    keep = math.floor(side * side * (1.0 - data["patch_drop"]))
    if keep < 1:
        fail("data.patch_drop", f"= {data['patch_drop']} keeps no patch of the {side * side} in "
             f"a {data['rand_size']}-px view at patch {patch}")
    if data["focal_views"] and data["focal_size"] >= data["rand_size"]:
        fail("data.focal_size", f"= {data['focal_size']} must be smaller than data.rand_size = "
             f"{data['rand_size']} (MSN's focal views are small crops of local detail)")


def weights_metadata_problem(meta: Mapping[str, str],
                             shapes: Mapping[str, Sequence[int]]) -> Optional[str]:
    """Why a weights file's metadata cannot size the encoder it describes, or None. The
    metadata (``hidden_dim``, ``output_dim``, ``img_size``) is checked against the ranges
    of the config keys it stands for before anything is built from it: above their sanity
    ceiling only when a tensor of the file (``shapes``: name -> shape) has that size, so a
    forged ``hidden_dim`` cannot make a loader allocate terabytes."""
    dims = {d for shape in shapes.values() for d in shape}
    tokens = max((s[1] for k, s in shapes.items() if k.endswith("pos_embed") and len(s) > 1),
                 default=0)
    for key, (section, cfg_key) in (("hidden_dim", ("meta", "hidden_dim")),
                                    ("output_dim", ("meta", "output_dim")),
                                    ("img_size", ("data", "rand_size"))):
        if key not in meta:
            continue
        try:
            value = int(str(meta[key]).strip())
        except ValueError:
            return f"metadata {key}={meta[key]!r} is not an integer"
        rng = RANGES[(section, cfg_key)]
        if key == "img_size":
            try:
                from .models import resolve_arch

                patch = resolve_arch(str(meta.get("arch", ""))).patch_size
            except ValueError:
                patch = 1
            held = tokens >= (value // patch) ** 2 + 1
        else:
            held = value in dims
        if rng.problem(value, allow_large=True):
            return f"metadata {key}={value} is out of range: {rng.problem(value, True)}"
        if rng.problem(value, allow_large=held):
            return (f"metadata {key}={value} is above the sanity ceiling of {rng.large} and "
                    "no tensor in the file has that size")
    return None


def train_folder(cfg: dict) -> str:
    return os.path.join(cfg["data"]["root_path"], cfg["data"]["image_folder"], "train")


def val_folder(cfg: dict) -> str:
    return os.path.join(cfg["data"]["root_path"], cfg["data"]["image_folder"], "val")


def knn_folders(cfg: dict) -> tuple[str, str]:
    """``(train folder or subset file, val folder)`` of the k-NN monitor."""
    ev = cfg["eval"]
    return ev["knn_train"] or train_folder(cfg), ev["knn_val"] or val_folder(cfg)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
