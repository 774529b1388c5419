"""Edges of a run's inputs and outputs, refused before any work with their names: a Latin-1
config, a YAML alias bomb, an unwritable folder or TensorBoard folder, a disk without room for
one checkpoint; temporaries of a killed write are cleaned up by the next one."""
import os
import time

import pytest

from msn_ds.config import ConfigError, load_config
from msn_ds.deepspeed_config import read_ds_config
from msn_ds.io.atomic import atomic_write, remove_stale_temps
from msn_ds.run_folder import output_problem


def test_latin1_config_names_the_byte(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("meta:\n  model_name: vit_pico_4  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_config(str(cfg), check_paths=False)
    ds = tmp_path / "d.json"
    ds.write_bytes('{"note": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"d.json: not UTF-8 text"):
        read_ds_config(str(ds))


def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("meta:\n" + "".join(f"  {line}\n" for line in lines))
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_config(str(cfg), check_paths=False)


def test_outputs_that_cannot_be_written_are_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert output_problem(str(run), tensorboard=True) is None
    (run / "tb").write_text("a file")
    assert "tb is not a folder" in output_problem(str(run), tensorboard=True)
    assert output_problem(str(run), tensorboard=False) is None
    (run / "tb").unlink()
    (run / "metrics.jsonl").mkdir()
    assert "metrics.jsonl is a folder" in output_problem(str(run), tensorboard=False)
    (run / "metrics.jsonl").rmdir()
    assert "MiB free; one checkpoint" in output_problem(str(run), False, needed=2 ** 62)
    if os.geteuid() != 0:  # root writes anywhere
        (run / "metrics.jsonl").write_text("")
        os.chmod(run / "metrics.jsonl", 0o444)
        assert "metrics.jsonl is not writable" in output_problem(str(run), False)
        os.chmod(run, 0o555)
        try:
            assert "is not writable" in output_problem(str(run / "sub"), False)
        finally:
            os.chmod(run, 0o755)


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    out = tmp_path / "w.safetensors"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f"w.safetensors.{dead}.0badc0de.tmp"
    fresh = tmp_path / f"w.safetensors.{dead}.0000beef.tmp"
    mine = tmp_path / f"w.safetensors.{os.getpid()}.12345678.tmp"
    for p in (stale, fresh, mine):
        p.write_bytes(b"half")
    old = time.time() - 600
    os.utime(stale, (old, old))
    os.utime(mine, (old, old))
    assert remove_stale_temps(str(out)) == [str(stale)]
    atomic_write(str(out), lambda tmp: open(tmp, "wb").write(b"whole"))
    assert out.read_bytes() == b"whole" and fresh.exists() and mine.exists()
