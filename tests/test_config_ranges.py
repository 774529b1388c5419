"""Every numeric config key has a declared range, checked before any work (issue 22, item
4): NaN, infinities, negative rates and size typos exit 2 naming the key and the value;
sizes above a sanity ceiling need ``meta.allow_large: true``; a weights file's metadata
cannot size a terabyte encoder either."""
import os

import pytest
import torch
from safetensors.torch import save_file

from helpers import ROOT, run_cli
from msn_ds.config import RANGES, SCHEMA, ConfigError, defaults, load_config
from msn_ds.io.weights import read_weights

DEMO = os.path.join(ROOT, "configs", "demo_cpu.yaml")


def test_every_numeric_key_has_a_range():
    numeric = {(section, key) for section, keys in SCHEMA.items()
               for key, (types, _) in keys.items() if int in types or float in types}
    assert numeric == set(RANGES), (numeric ^ set(RANGES))


def test_defaults_and_shipped_configs_are_in_range():
    cfg = defaults()
    for (section, key), rng in RANGES.items():
        value = cfg[section][key]
        assert value is None or rng.problem(value) is None, (section, key, value)
    for base, _, files in os.walk(os.path.join(ROOT, "configs")):
        for name in files:
            if name.endswith(".yaml"):
                load_config(os.path.join(base, name), check_paths=False)


@pytest.mark.parametrize("override,shown", [
    ("optimization.lr=.nan", "got nan"),
    ("optimization.lr=nan", "got nan"),
    ("optimization.lr=-1e-3", "got -0.001"),
    ("optimization.start_lr=.inf", "got inf"),
    ("optimization.final_lr=-.inf", "got -inf"),
    ("optimization.weight_decay=-0.1", "got -0.1"),
    ("optimization.final_weight_decay=.nan", "got nan"),
    ("criterion.temperature=.inf", "got inf"),
    ("criterion.temperature=0", "got 0"),
    ("criterion.start_sharpen=-0.1", "got -0.1"),
    ("criterion.memax_weight=.nan", "got nan"),
    ("criterion.ent_weight=-1", "got -1"),
    ("optimization.clip_grad=.nan", "got nan"),
    ("optimization.clip_grad=-1", "got -1"),
    ("optimization.ipe_scale=0", "got 0"),
    ("optimization.ipe_scale=-1.25", "got -1.25"),
    ("optimization.warmup=.nan", "got nan"),
    ("optimization.warmup=-1", "got -1"),
    ("optimization.epochs=0", "got 0"),
    ("optimization.start_momentum=1.5", "got 1.5"),
    ("optimization.final_momentum=.nan", "got nan"),
    ("logging.keep_last=-2", "got -2"),
    ("logging.log_every=0", "got 0"),
    ("logging.peak_tflops=.inf", "got inf"),
    ("data.max_bad_fraction=.nan", "got nan"),
    ("data.color_jitter_strength=3", "got 3"),
    ("data.patch_drop=.nan", "got nan"),
    ("meta.drop_path_rate=1", "got 1"),
    ("meta.seed=-1", "got -1"),
    ("meta.nonfinite_patience=0", "got 0"),
    ("meta.bottleneck=2", "got 2"),
    ("eval.knn_k=0", "got 0"),
    ("eval.knn_every_steps=-5", "got -5"),
])
def test_out_of_range_refused_naming_key_and_value(override, shown):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"demo_cpu\.yaml: {key} must be .*{shown}"):
        load_config(DEMO, [override], check_paths=False)


@pytest.mark.parametrize("override", ["meta.hidden_dim=1000000", "criterion.num_proto=100000000",
                                      "meta.output_dim=100000", "criterion.batch_size=100000",
                                      "data.rand_size=100000", "data.focal_views=1000"])
def test_sizes_above_the_ceiling_need_allow_large(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"{key} = {value} is above its sanity ceiling of "
                                          r"\d+ .*set meta\.allow_large=true"):
        load_config(DEMO, [override], check_paths=False)
    cfg = load_config(DEMO, [override, "meta.allow_large=true"], check_paths=False)
    assert cfg[key.split(".")[0]][key.split(".")[1]] == int(value)


@pytest.mark.parametrize("override", ["meta.hidden_dim=1e6", "criterion.num_proto=1e8"])
def test_float_sizes_refused(override):
    """YAML reads ``1e6`` as a string: refused as a non-integer, naming key and value."""
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"{key} must be int, got '{value}'"):
        load_config(DEMO, [override], check_paths=False)


@pytest.mark.parametrize("override", ["optimization.lr=0", "optimization.weight_decay=0",
                                      "optimization.clip_grad=0", "optimization.warmup=0",
                                      "logging.keep_last=0", "optimization.ipe_scale=1",
                                      "criterion.sinkhorn_iters=0", "data.focal_views=0",
                                      "data.max_bad_fraction=1", "meta.hidden_dim=16384"])
def test_boundaries_accepted(override):
    load_config(DEMO, [override], check_paths=False)


def tiny_weights(path, **meta):
    save_file({"target_head.fc1.weight": torch.zeros(64, 128),
               "target_encoder.pos_embed": torch.zeros(1, 65, 128)}, str(path),
              metadata={"arch": "vit_pico_4", "img_size": "32", "hidden_dim": "64",
                        "output_dim": "32", "use_bn": "true", **meta})
    return path


@pytest.mark.parametrize("key,value,message", [
    ("hidden_dim", "1000000", "metadata hidden_dim=1000000 is above the sanity ceiling of 16384 "
                              "and no tensor in the file has that size"),
    ("output_dim", "-3", "metadata output_dim=-3 is out of range"),
    ("img_size", "100000", "metadata img_size=100000 is above the sanity ceiling"),
    ("hidden_dim", "lots", "metadata hidden_dim='lots' is not an integer"),
])
def test_weights_metadata_cannot_size_a_huge_encoder(tmp_path, key, value, message):
    """A 4 TB head (hidden_dim 1e6: a 1e6 x 1e6 layer) was sized from the metadata before
    any check; now the file is refused on reading, before anything is built."""
    path = tiny_weights(tmp_path / "w.safetensors", **{key: value})
    with pytest.raises(ValueError, match=message):
        read_weights(str(path))


def test_weights_metadata_held_by_a_tensor_passes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"target_head.fc1.weight": torch.zeros(20000, 1)}, str(path),
              metadata={"arch": "vit_pico_4", "hidden_dim": "20000", "output_dim": "32"})
    assert read_weights(str(path))[1]["hidden_dim"] == "20000"
    assert read_weights(str(tiny_weights(tmp_path / "ok.safetensors")))[1]["img_size"] == "32"


@pytest.mark.slow
def test_train_py_refuses_nan_lr_before_any_work(tmp_path):
    """The issue's probe: ``optimization.lr=.nan`` trained to the end with NaN weights (exit
    0). Now train.py exits 2 at once, naming the key and the value, without a traceback and
    before DeepSpeed starts (no run folder is made)."""
    run = tmp_path / "run"
    r = run_cli("train.py", "--config", DEMO, "--deepspeed_config", "ds_configs/zero0_fp32.json",
                f"logging.folder={run}", "optimization.lr=.nan", timeout=300, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "optimization.lr must be a finite number in [0, 10], got nan" in r.stderr
    assert "Traceback" not in r.stderr and "DeepSpeed" not in r.stderr
    assert not run.exists()
