"""
Faults that must end in one line and lose nothing (common.atomic_save, common.OutDirLock,
config.validate's folder checks).

    python -m pytest tests/test_faults.py -q
"""
import os

import pytest
import torch

import common
from config import ConfigError, make_config, validate


def test_a_failed_save_keeps_the_previous_file_and_removes_the_partial_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.atomic_save({"step": 1}, path)
    real = torch.save

    def full_disk(obj, f, *a, **k):          # writes a little, then the disk is full
        open(f, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"save error: cannot write .*ckpt.pt \(No space left on device; \d+ MiB free"):
        common.atomic_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(path)["step"] == 1                                  # the previous checkpoint stays
    assert os.listdir(tmp_path) == ["ckpt.pt"]                            # no partial .tmp left


def test_one_run_per_out_dir_and_stale_locks_are_taken_over(tmp_path):
    notes = []
    with common.OutDirLock(str(tmp_path), notes.append):
        assert open(tmp_path / ".lock").read() == str(os.getpid())
        with open(tmp_path / ".lock", "w") as f:
            f.write("1")                                                  # pid 1 is alive: another run
        with pytest.raises(SystemExit, match="another run \\(pid 1\\) is using"):
            common.OutDirLock(str(tmp_path)).__enter__()
    with open(tmp_path / ".lock", "w") as f:
        f.write("999999999")                                              # no such process: stale
    with common.OutDirLock(str(tmp_path), notes.append):
        pass
    assert any("stale lock" in n for n in notes) and not (tmp_path / ".lock").exists()


def test_unwritable_folders_and_a_jsonl_folder_are_config_errors(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="--data.cache_dir=.*cannot write there"):
        validate(make_config("toy", {"data.cache_dir": str(blocker / "cache")}))
    with pytest.raises(ConfigError, match="is a folder; pass the .jsonl file"):
        validate(make_config("toy", {"data.jsonl": str(tmp_path)}))
    with pytest.raises(ConfigError, match="eval.n_per_task"):
        validate(make_config("toy", {"eval.n_per_task": 0}))
