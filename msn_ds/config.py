"""Experiment configuration: the reference's YAML sections and keys, plus ours.

A config written for the reference (``meta``, ``criterion``, ``data``, ``optimization``,
``logging``) loads unchanged; keys it lacks take the defaults below. Any key can be
overridden on the command line as ``section.key=value`` (the value is parsed as YAML).
Everything is checked before any work starts: an unknown key, a wrong type, a value out of
range or a missing data folder is an error naming the key and the file.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Iterable, Optional

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
    },
    "criterion": {
        "num_proto": ((int,), 1024),
        "temperature": (_NUM, 0.1),
        "start_sharpen": (_NUM, 0.25),
        "final_sharpen": (_NUM, 0.25),
        "me_max": ((bool,), True),
        "memax_weight": (_NUM, 1.0),
        "use_ent": ((bool,), False),
        "ent_weight": (_NUM, 0.0),
        "use_sinkhorn": ((bool,), True),
        "freeze_proto": ((bool,), False),
        "batch_size": ((int,), 64),
        # ours
        "sinkhorn_iters": ((int,), 3),
        "per_sample_mask": ((bool,), False),
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


LOADERS = ("auto", "dali", "torch")
COMPILE_BACKENDS = ("", "inductor", "aot_eager")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


def defaults() -> dict[str, dict[str, Any]]:
    return {sec: {k: copy.deepcopy(v[1]) for k, v in keys.items()} for sec, keys in SCHEMA.items()}


def load_config(path: Optional[str], overrides: Iterable[str] = (), check_paths: bool = True
                ) -> dict[str, dict[str, Any]]:
    """Defaults <- YAML file <- ``section.key=value`` overrides, then validated."""
    cfg = defaults()
    source = path or "<defaults>"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
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
            value = yaml.safe_load(text) if text != "" else ""
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
                 "configs set it to false)" + ("; resuming is not implemented yet"
                                               if key == "load_checkpoint" else ""))
    if cfg["meta"]["bottleneck"] != 1:
        fail("meta.bottleneck", f"= {cfg['meta']['bottleneck']} is not supported (only 1, the "
             "reference's value)")
    from .models import resolve_arch  # late import: keeps config importable without timm

    try:
        spec = resolve_arch(cfg["meta"]["model_name"])
    except ValueError as e:
        fail("meta.model_name", str(e))

    positive = [("criterion", "batch_size"), ("criterion", "num_proto"), ("meta", "output_dim"),
                ("meta", "hidden_dim"), ("data", "rand_size"), ("data", "focal_size"),
                ("optimization", "epochs"), ("criterion", "temperature"),
                ("criterion", "start_sharpen"), ("criterion", "final_sharpen"),
                ("logging", "log_every")]
    for section, key in positive:
        if cfg[section][key] <= 0:
            fail(f"{section}.{key}", f"must be > 0, got {cfg[section][key]}")
    for section, key in [("data", "rand_views"), ("data", "focal_views"), ("data", "num_workers"),
                         ("optimization", "warmup"), ("optimization", "clip_grad"),
                         ("criterion", "sinkhorn_iters"), ("meta", "activation_checkpointing")]:
        if cfg[section][key] < 0:
            fail(f"{section}.{key}", f"must be >= 0, got {cfg[section][key]}")
    if cfg["meta"]["compile"] not in COMPILE_BACKENDS:
        fail("meta.compile", f"must be one of {COMPILE_BACKENDS}, got {cfg['meta']['compile']!r}")
    if cfg["data"]["rand_views"] < 1:
        fail("data.rand_views", "must be >= 1 (the masked anchor view)")
    for section, key, lo, hi in [("data", "patch_drop", 0.0, 1.0),
                                 ("data", "label_smoothing", 0.0, 1.0),
                                 ("data", "max_bad_fraction", 0.0, 1.0 + 1e-9),
                                 ("meta", "drop_path_rate", 0.0, 1.0)]:
        v = cfg[section][key]
        if not lo <= v < hi:
            fail(f"{section}.{key}", f"must be in [{lo}, {hi:g}), got {v}")
    m0, m1 = cfg["optimization"]["start_momentum"], cfg["optimization"]["final_momentum"]
    if not (0.0 <= m0 <= 1.0 and 0.0 <= m1 <= 1.0):
        fail("optimization.start_momentum/final_momentum", f"must be in [0, 1], got {m0}, {m1}")
    for key in ("rand_scale", "focal_scale"):
        v = cfg["data"][key]
        if len(v) != 2 or not all(isinstance(x, _NUM) for x in v) or not 0 < v[0] <= v[1] <= 1:
            fail(f"data.{key}", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {v}")
    _check_views(cfg["data"], spec.patch_size, fail)
    if cfg["data"]["loader"] not in LOADERS:
        fail("data.loader", f"must be one of {', '.join(LOADERS)}, got {cfg['data']['loader']!r}")
    ev = cfg["eval"]
    for key in ("knn_every_steps",):
        if ev[key] < 0:
            fail(f"eval.{key}", f"must be >= 0, got {ev[key]}")
    for key in ("knn_k", "knn_batch_size", "knn_crop", "knn_resize", "knn_train_per_class"):
        if ev[key] is not None and ev[key] < 1:
            fail(f"eval.{key}", f"must be >= 1, got {ev[key]}")
    if check_paths and ev["knn_every_steps"]:
        train, val = knn_folders(cfg)
        if not os.path.exists(train):
            fail("eval.knn_train", f"points to a missing folder or subset file: {train}")
        if not os.path.isdir(val):
            fail("eval.knn_val", f"points to a missing folder: {val} (k-NN needs labelled "
                 "validation images; set eval.knn_val or eval.knn_every_steps=0)")
    init = cfg["meta"]["init_weights"]
    if check_paths and init is not None and not os.path.isfile(init):
        fail("meta.init_weights", f"points to a missing weights file: {init}")
    if check_paths:
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
