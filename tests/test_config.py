"""Configuration: reference YAML loads unchanged, overrides, errors that name the key."""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from msn_ds.config import ConfigError, load_config
from msn_ds.deepspeed_config import resolve_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, "configs", "pretrain", "msn_vits16.yaml")


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_reference_config_loads_unchanged():
    cfg = load_config(REF, check_paths=False)
    assert cfg["meta"]["model_name"] == "deit_small"
    assert cfg["data"]["patch_drop"] == 0.15 and cfg["criterion"]["num_proto"] == 1024
    assert cfg["optimization"]["final_lr"] == 1e-6
    assert cfg["meta"]["seed"] == 0  # our keys take defaults


def test_overrides_parse_yaml_values(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    cfg = load_config(REF, [f"data.root_path={tmp_path}", "data.image_folder=d",
                            "criterion.batch_size=4", "optimization.lr=1e-4",
                            "data.rand_scale=[0.5, 1.0]", "criterion.use_sinkhorn=false"])
    assert cfg["criterion"]["batch_size"] == 4
    assert cfg["optimization"]["lr"] == pytest.approx(1e-4)  # '1e-4' (YAML 1.1 string) -> float
    assert cfg["data"]["rand_scale"] == [0.5, 1.0]
    assert cfg["criterion"]["use_sinkhorn"] is False


@pytest.mark.parametrize("data,match", [
    ({"meta": {"modle_name": "deit_small"}}, r"c\.yaml: unknown key meta\.modle_name"),
    ({"metaa": {}}, r"c\.yaml: unknown section 'metaa'"),
    ({"criterion": {"batch_size": "64"}}, r"c\.yaml: criterion\.batch_size must be int"),
    ({"criterion": {"batch_size": 0}}, r"criterion\.batch_size must be in \[1, \d+\], got 0"),
    ({"criterion": {"me_max": 1}}, r"criterion\.me_max must be true or false"),
    ({"data": {"patch_drop": 1.2}}, r"data\.patch_drop must be in \[0"),
    ({"meta": {"model_name": "resnet50"}}, r"meta\.model_name unknown model_name 'resnet50'"),
    ({"meta": {"use_pred_head": True}}, r"meta\.use_pred_head = True is not supported"),
])
def test_errors_name_key_and_file(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, data), check_paths=False)


def test_override_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: unknown key data\.patchdrop"):
        load_config(REF, ["data.patchdrop=0.1"], check_paths=False)
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(REF, ["patch_drop=0.1"], check_paths=False)


def test_missing_data_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root_path/data\.image_folder point to a missing "
                                          r"training folder: .*nope.*train"):
        load_config(REF, [f"data.root_path={tmp_path}", "data.image_folder=nope"])


def test_ds_config_single_source_of_truth():
    cfg = load_config(REF, ["criterion.batch_size=8"], check_paths=False)
    ds = resolve_ds_config({"zero_optimization": {"stage": 1}}, cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 32
    assert ds["gradient_clipping"] == 3.0
    with pytest.raises(ConfigError, match=r"x\.json: train_micro_batch_size_per_gpu=16 contradicts "
                                          r"criterion\.batch_size=8"):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 16}, cfg, 4, "x.json")
    with pytest.raises(ConfigError, match=r"gradient_clipping=1.0 contradicts optimization\.clip_grad=3"):
        resolve_ds_config({"gradient_clipping": 1.0}, cfg, 4, "x.json")
    # ZeRO-0 never scales an fp16 loss but unscales its gradients (deepspeedai/DeepSpeed#8393)
    with pytest.raises(ConfigError, match=r"x\.json: fp16 with ZeRO stage 0: .*#8393.*ZeRO-1"):
        resolve_ds_config({"fp16": {"enabled": True}}, cfg, 4, "x.json")
    if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator has no fp16
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            resolve_ds_config({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}},
                              cfg, 4, "x.json")
    # gradient accumulation is exact (msn_ds/accumulate.py): global batch 8 x 4 x 2
    ds = resolve_ds_config({"gradient_accumulation_steps": 2}, cfg, 4, "x.json")
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2 is not supported with "
                                          r"ZeRO-Offload"):
        resolve_ds_config({"gradient_accumulation_steps": 2, "zero_optimization": {
            "stage": 2, "offload_optimizer": {"device": "cpu"}}}, cfg, 4, "x.json")


@pytest.mark.slow
def test_train_py_fails_before_work(tmp_path):
    """A bad config stops train.py at once with the key in the message and exit code 2."""
    bad = write(tmp_path, {"meta": {"model_name": "deit_small", "bogus": 1}})
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", bad,
                        "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero0_fp32.json")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown key meta.bogus" in r.stderr and "c.yaml" in r.stderr


def test_reference_yaml_without_ent_weight_trains_with_weight_1(tmp_path):
    """The reference reads ``ent_weight`` with default 1: a YAML that turns ``use_ent`` on and
    omits the weight trains with entropy weight 1 (and ``use_ent: false`` with 0)."""
    from msn_ds.trainer import build_criterion

    for use_ent, want in ((True, 1.0), (False, 0.0)):
        path = tmp_path / f"ent_{use_ent}.yaml"
        path.write_text(f"criterion:\n  use_ent: {str(use_ent).lower()}\n")
        cfg = load_config(str(path), check_paths=False)
        assert build_criterion(cfg).entropy_weight == want
