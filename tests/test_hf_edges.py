"""Hugging Face export and import at their edges (msn_ds.io.hf), in-process and without
transformers: the export folder is written whole and never replaces a folder it was not told
to; every malformed config or index value is refused naming the file and the key; a shard
index cannot make the import read a file outside the folder."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import load_script
from msn_ds.io import hf
from msn_ds.io.weights import TARGET_PREFIX, encoder_metadata, read_weights, save_weights
from msn_ds.models import MSNEncoder

ARCH = "vit_pico_16"  # 4 blocks, width 128: exported and imported in milliseconds


def weights_file(path, seed=0) -> str:
    torch.manual_seed(seed)
    enc = MSNEncoder(ARCH, img_size=224, hidden_dim=64, output_dim=32)
    save_weights(str(path), enc, None, encoder_metadata(enc, 224, 64, 32, True))
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Weights files of two seeds, and the first one's export."""
    d = tmp_path_factory.mktemp("hf_edges")
    first, second = weights_file(d / "a.safetensors"), weights_file(d / "b.safetensors", seed=1)
    hf.export(first, str(d / "hf"))
    return first, second, d / "hf"


def snapshot(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def leftovers(parent) -> list:
    return [n for n in os.listdir(parent) if n.endswith((".tmp", ".old"))]


# ------------------------------------------------------------------------------- export


def test_out_folder_with_files_is_refused_without_overwrite(exported, tmp_path, capsys):
    first, _, _ = exported
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(hf.ExportError, match=r"--out .*mine already holds files \(notes\.txt\); "
                                             r"pass --overwrite"):
        hf.export(first, str(out))
    assert snapshot(out) == {"notes.txt": b"keep me"}
    cli = load_script("scripts/export_hf.py")
    assert cli.main([first, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "Traceback" not in err
    # --overwrite does not make a user's folder an export: refused, untouched
    assert cli.main([first, "--out", str(out), "--overwrite"]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert snapshot(out) == {"notes.txt": b"keep me"}
    empty = tmp_path / "empty"  # an empty folder (mktemp -d) is fine
    empty.mkdir()
    hf.export(first, str(empty))
    assert sorted(os.listdir(empty)) == sorted(hf.EXPORT_FILES)


@pytest.mark.parametrize("make,pattern", [
    (lambda p: p.write_text("x"), r"exists and is not a folder"),
    (lambda p: (p.mkdir(), (p / ".git").mkdir(), (p / "config.json").write_text(
        json.dumps({"model_type": "vit_msn"}))), r"holds subfolders \(\.git\)"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text(json.dumps({"model_type": "bert"}))),
     r"not an earlier export"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{not json")), r"not an earlier export"),
])
def test_overwrite_replaces_only_an_earlier_export(exported, tmp_path, make, pattern):
    first, _, _ = exported
    out = tmp_path / "out"
    make(out)
    with pytest.raises(hf.ExportError, match=pattern):
        hf.export(first, str(out), overwrite=True)


def test_overwrite_replaces_the_folder_as_a_whole(exported, tmp_path):
    first, second, _ = exported
    out = tmp_path / "out"
    hf.export(first, str(out))
    (out / "stale.bin").write_bytes(b"from before")
    hf.export(second, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == sorted(hf.EXPORT_FILES)  # nothing of the old folder
    assert load_file(str(out / "model.safetensors"))["layernorm.bias"].equal(
        read_weights(second)[0][TARGET_PREFIX + "norm.bias"])
    assert not leftovers(tmp_path)


def test_overwrite_without_an_atomic_swap(exported, tmp_path, monkeypatch):
    """A file system without renameat2's exchange: moved aside, renamed, removed."""
    first, second, _ = exported
    out = tmp_path / "out"
    hf.export(first, str(out))
    monkeypatch.setattr(hf, "_exchange", lambda a, b: False)
    hf.export(second, str(out), overwrite=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "vit_msn"
    assert sorted(os.listdir(out)) == sorted(hf.EXPORT_FILES) and not leftovers(tmp_path)


def test_an_export_interrupted_mid_write_keeps_the_previous_folder(exported, tmp_path,
                                                                    monkeypatch):
    """A kill after the new model.safetensors is written: before, config.json was still the
    old one beside it. Now the previous folder is whole and the temporary folder is gone; one
    that SIGKILL left behind (its process gone) is cleaned by the next export."""
    first, second, _ = exported
    out = tmp_path / "out"
    hf.export(first, str(out))
    before = snapshot(out)
    real_fsync, calls = os.fsync, []

    def killed_after_the_first_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", killed_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        hf.export(second, str(out), overwrite=True)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert snapshot(out) == before and not leftovers(tmp_path)
    stale = tmp_path / f"out.{2 ** 30}.0123abcd.tmp"  # no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    hf.export(second, str(out), overwrite=True)
    assert not stale.exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------- import


def hf_folder(tmp_path, exported, edit=None, name="src"):
    """A copy of the export, its config edited by ``edit(cfg)``."""
    _, _, folder = exported
    src = tmp_path / name
    src.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    if edit:
        edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    return src


def set_(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


@pytest.mark.parametrize("edit,message", [
    (set_("hidden_size", "128"), r"hidden_size='128' is not an integer"),
    (set_("hidden_size", 128.0), r"hidden_size=128\.0 is not an integer"),
    (set_("num_hidden_layers", None), r"num_hidden_layers=None is not an integer"),
    (set_("num_hidden_layers", -4), r"num_hidden_layers=-4 must be positive"),
    (set_("num_attention_heads", [4]), r"num_attention_heads=\[4\] is not an integer"),
    (set_("intermediate_size", {}), r"intermediate_size=\{\} is not an integer"),
    (set_("intermediate_size", 500), r"intermediate_size=500 is not 4 x hidden_size=128"),
    (set_("patch_size", "16"), r"patch_size='16' is not an integer"),
    (set_("patch_size", [16, 8]), r"patch_size=\[16, 8\] is not square"),
    (set_("patch_size", [[16]]), r"patch_size=\[\[16\]\] is not an integer"),
    (set_("image_size", -32), r"image_size=-32 must be from 1 to 65536"),
    (set_("image_size", 0), r"image_size=0 must be from 1 to 65536"),
    (set_("image_size", 10 ** 30), r"image_size=1000000000000000000000000000000 must be"),
    (set_("image_size", True), r"image_size=True is not an integer"),
    (set_("image_size", 8), r"image_size=8 is smaller than patch_size=16"),
    (set_("image_size", [224, 160]), r"image_size=\[224, 160\] is not square"),
    (set_("layer_norm_eps", "1e-6"), r"layer_norm_eps='1e-6' is not a number"),
    (set_("qkv_bias", 1), r"qkv_bias=1; msn_ds's ViT has True"),
    (lambda cfg: cfg.pop("hidden_size"), r"no hidden_size"),
    (lambda cfg: cfg.pop("patch_size"), r"no patch_size"),
])
def test_malformed_config_values_are_named(exported, tmp_path, edit, message):
    src = hf_folder(tmp_path, exported, edit)
    with pytest.raises(hf.ImportHFError, match=re.escape(str(src / "config.json")) + ": "
                       + message):
        hf.import_folder(str(src), str(tmp_path / "w.safetensors"))
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", r"a list, not a JSON object"),
    (b"{\"model_type\": \"vit_msn\"", r"not valid JSON"),
    ("{\"model_type\": \"vit_m\xe9n\"}".encode("latin-1"), r"not valid JSON"),
])
def test_unreadable_config_is_named(exported, tmp_path, content, message):
    src = hf_folder(tmp_path, exported)
    (src / "config.json").write_bytes(content)
    with pytest.raises(hf.ImportHFError, match=r"config\.json: " + message):
        hf.import_folder(str(src), str(tmp_path / "w.safetensors"))


def sharded(tmp_path, exported, weight_map=None, index=None):
    """The export split into two shards under model.safetensors.index.json."""
    src = hf_folder(tmp_path, exported)
    state = load_file(str(src / "model.safetensors"))
    os.remove(src / "model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    for name, part in (("model-1.safetensors", keys[:half]), ("model-2.safetensors", keys[half:])):
        save_file({k: state[k] for k in part}, str(src / name))
    if weight_map is None:
        weight_map = {k: "model-1.safetensors" if i < half else "model-2.safetensors"
                      for i, k in enumerate(keys)}
    blob = {"metadata": {}, "weight_map": weight_map} if index is None else index
    (src / "model.safetensors.index.json").write_text(json.dumps(blob))
    return src


def test_a_sharded_folder_imports(exported, tmp_path):
    first, _, _ = exported
    src = sharded(tmp_path, exported)
    hf.import_folder(str(src), str(tmp_path / "w.safetensors"))
    before, after = read_weights(first)[0], read_weights(str(tmp_path / "w.safetensors"))[0]
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith(TARGET_PREFIX))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{abs}",
                                   "sub/../../outside.safetensors", "..\\outside.safetensors"])
def test_shards_outside_the_folder_are_refused(exported, tmp_path, shard):
    """A valid weights file beside the folder: an index naming it must not read it."""
    outside = tmp_path / "outside.safetensors"
    save_file(load_file(str(exported[2] / "model.safetensors")), str(outside))
    shard = shard.replace("{abs}", str(outside))
    src = sharded(tmp_path, exported, weight_map={"layernorm.bias": shard})
    with pytest.raises(hf.ImportHFError, match=r"index\.json: weight_map names the shard .*"
                                               r"outside the folder"):
        hf.import_folder(str(src), str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight_map=["model-1.safetensors"]), r"weight_map is a list, not an object"),
    (dict(weight_map={}), r"weight_map is a dict with no entry"),
    (dict(weight_map={"layernorm.bias": 5}), r"weight_map value 5 is not a file name"),
    (dict(index={"metadata": {}}), r"no weight_map"),
    (dict(index=["model-1.safetensors"]), r"no weight_map"),
    (dict(weight_map={"layernorm.bias": "missing.safetensors"}),
     r"missing\.safetensors: unreadable"),
])
def test_malformed_index_is_named(exported, tmp_path, kwargs, message):
    src = sharded(tmp_path, exported, **kwargs)
    with pytest.raises(hf.ImportHFError, match=message):
        hf.import_folder(str(src), str(tmp_path / "w.safetensors"))


def test_a_bin_that_is_not_a_state_dict_is_named(exported, tmp_path):
    src = hf_folder(tmp_path, exported)
    os.remove(src / "model.safetensors")
    torch.save([torch.zeros(1)], src / "pytorch_model.bin")
    with pytest.raises(hf.ImportHFError, match=r"pytorch_model\.bin: not a state dict"):
        hf.import_folder(str(src), str(tmp_path / "w.safetensors"))


def test_import_cli_exits_2_without_traceback(exported, tmp_path, capsys):
    src = hf_folder(tmp_path, exported, set_("image_size", -32))
    cli = load_script("scripts/import_hf.py")
    assert cli.main([str(src), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"error: {src / 'config.json'}: image_size=-32" in err and "Traceback" not in err
