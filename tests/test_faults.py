"""
Faults that must end in one line and lose nothing: saves on a full disk (common.atomic_save), two
runs on one folder (common.OutDirLock), values checked before work (config.validate, eval.py's
--pass_k, JSONL rows too long for the model), exit codes (common.run_main), checkpoints written
before the final evaluations and stop requests honoured inside them, hints and notes that name
files that exist. The fault table in tests/README.md lists each with its message and exit code.

    python -m pytest tests/test_faults.py -q
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import data
import metrics
import train
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


# ----------------------------------------------------------------------------------------------
# exit codes: config, data and checkpoint errors 2, runtime failures 1, SIGINT 130, SIGTERM 143

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("msg,code", [("config error: x", 2), ("data error: y", 2), ("checkpoint error: z", 2),
                                      ("eval: a missing tokenizer", 2), ("training error: t", 1), ("save error: s", 1)])
def test_one_line_errors_exit_with_their_kind(msg, code, capsys):
    def main(argv):
        raise SystemExit(msg)
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == code and capsys.readouterr().err == msg + "\n"


@pytest.mark.parametrize("argv,words", [(["train.py", "--train.dtype=fp16"], "--train.dtype"),
                                        (["eval.py", "--pass_k=-3"], "--pass_k=-3"),
                                        (["eval.py", "--pass_k=100"], "1..64")])
def test_the_entry_scripts_exit_2_on_a_bad_value_before_any_work(tmp_path, argv, words):
    p = subprocess.run([sys.executable, *argv, f"--out_dir={tmp_path}/out", f"--data.cache_dir={tmp_path}/cache"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "cache")              # nothing trained, nothing cached


def flags(tmp_path, out: str, *extra) -> list[str]:
    """A run of seconds: 1 layer, d 32, 2 SFT and 2 RL steps, 2 held-out examples per task."""
    return [f"--out_dir={out}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.n_sft=8", "--data.n_rl=4",
            "--data.n_eval=4", "--data.n_val=2", "--model.n_layer=1", "--model.n_head=2", "--model.d_model=32",
            "--vq.steps=10", "--vq.n_images=32", "--train.max_steps=2", "--train.batch_size=4",
            "--train.micro_batch=2", "--train.eval_interval=0", "--train.ckpt_interval=100", "--rl.max_steps=2",
            "--rl.prompts_per_step=1", "--rl.group_size=2", "--rl.sft_rows=2", "--rl.eval_interval=0",
            "--eval.curve_n=2", "--eval.n_per_task=4", "--eval.batch_size=2", "--eval.grid_rows=1", *extra]


def step(path: str) -> int:
    return torch.load(path, weights_only=False)["step"]


def test_sigterm_exits_143_after_the_checkpoint(tmp_path, monkeypatch):
    real, calls = train.sft_step, []

    def step_then_sigterm(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(train, "sft_step", step_then_sigterm)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(flags(tmp_path, out, "--train.max_steps=3"))
    assert e.value.code == 143 and len(calls) == 1 and step(f"{out}/ckpt_sft.pt") == 1
    assert not os.path.exists(f"{out}/.lock")                # the lock goes with the run


# ----------------------------------------------------------------------------------------------
# no work lost at the end: checkpoints before the final evaluations, stops honoured inside them


@pytest.mark.parametrize("stage,ckpt", [("sft", "ckpt_sft.pt"), ("rl", "ckpt_rl.pt")])
def test_the_checkpoint_is_on_disk_before_the_final_quick_eval(tmp_path, monkeypatch, stage, ckpt):
    """A run killed during its final quick eval (a time limit, an out-of-memory kill) keeps every
    step: the last checkpoint is written first. (RL used to evaluate first and lose its steps.)"""
    out = str(tmp_path / "run")
    if stage == "rl":
        train.main(flags(tmp_path, out, "--stage=sft"))
    def killed(*a, **k):
        raise RuntimeError("killed during the final quick eval")
    monkeypatch.setattr(metrics, "quick_eval", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train.main(flags(tmp_path, out, f"--stage={stage}", "--train.eval_interval=100", "--rl.eval_interval=100"))
    assert step(os.path.join(out, ckpt)) == 2


def signal_on_first_sample(monkeypatch, signum=signal.SIGTERM):
    """metrics' sampler sends `signum` to this process during its first batch."""
    real, calls = metrics.sample, []

    def sample_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(metrics, "sample", sample_then_signal)
    return calls


def test_a_stop_during_a_quick_eval_checkpoints_at_once(tmp_path, monkeypatch):
    """SIGTERM in the quick eval after SFT step 1 (of 4): the eval finishes its batch and stops, the
    step-1 checkpoint is written, the run exits 143 (it used to finish the eval and train a step more)."""
    calls = signal_on_first_sample(monkeypatch)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(flags(tmp_path, out, "--stage=sft", "--train.max_steps=4", "--train.eval_interval=1"))
    assert e.value.code == 143 and len(calls) == 1 and step(f"{out}/ckpt_sft.pt") == 1


def test_a_stop_during_the_held_out_evaluation_keeps_the_checkpoints(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    train.main(flags(tmp_path, out, "--stage=sft"))
    train.main(flags(tmp_path, out, "--stage=rl"))
    calls = signal_on_first_sample(monkeypatch, signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        train.main(flags(tmp_path, out, "--stage=eval"))
    assert e.value.code == 130 and len(calls) == 1                 # one batch, then the stop
    assert not os.path.exists(f"{out}/metrics.json") and step(f"{out}/ckpt_rl.pt") == 2


# ----------------------------------------------------------------------------------------------
# the lock, hints that name files that exist, notes


def test_a_second_run_on_the_same_out_dir_is_refused_before_work(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("1")                              # pid 1 is alive: another run holds it
    with pytest.raises(SystemExit, match=r"another run \(pid 1\) is using"):
        train.main(flags(tmp_path, str(out)))
    assert not os.path.exists(tmp_path / "cache")


def test_the_non_finite_hint_names_only_checkpoints_that_exist(tmp_path, monkeypatch):
    from test_distributed import FakeVQ, make_bundle, tiny_config
    cfg = tiny_config(str(tmp_path), str(tmp_path / "cache"), **{"train.max_steps": 6})
    bundle = make_bundle(cfg)
    monkeypatch.setattr(train, "sft_step", lambda *a, **k: (float("nan"), {}, float("nan")))
    with pytest.raises(SystemExit, match="ckpt_sft.pt is not written yet: nothing to resume") as e:
        train.run_sft(cfg, common.setup(cfg), bundle, FakeVQ())
    assert "resume from" not in str(e.value.code)
    monkeypatch.undo()
    train.run_sft(tiny_config(str(tmp_path), str(tmp_path / "cache"), **{"train.max_steps": 1}),
                  common.setup(cfg), bundle, FakeVQ())
    monkeypatch.setattr(train, "sft_step", lambda *a, **k: (float("nan"), {}, float("nan")))
    with pytest.raises(SystemExit, match=r"resume from .*ckpt_sft.pt \(add --resume\)"):
        train.run_sft(cfg, common.setup(cfg), bundle, FakeVQ())


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    from test_distributed import FakeVQ, make_bundle, tiny_config
    cfg = tiny_config(str(tmp_path), str(tmp_path / "cache"), **{"train.max_steps": 1, "train.resume": True})
    train.run_sft(cfg, common.setup(cfg), make_bundle(cfg), FakeVQ())
    assert "note: --resume, but there is no" in (tmp_path / "log.txt").read_text()


# ----------------------------------------------------------------------------------------------
# JSONL rows: too long for the model (named at load time), skipped rows' reasons printed


def jsonl(tmp_path, rows) -> str:
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "pic.png")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("long,part", [("prompt", "prompt"), ("response", "response")])
def test_a_row_too_long_for_the_model_is_a_data_error_naming_it(tmp_path, long, part):
    from test_distributed import make_bundle, tiny_config
    words = " ".join(["red"] * 300)                              # tiny_config's max_len is 128
    row = {"task": "vqa", "image": "pic.png", "prompt": "how many ?", "split": "sft",
           "response": "<think> red shapes : none . count 0 . </think> <answer> 0 </answer>"}
    if long == "prompt":
        row["prompt"] = f"how many {words} ?"
    else:
        row["response"] = f"<think> {words} . </think> <answer> 0 </answer>"
    path = jsonl(tmp_path, [{**row, "prompt": "how many ?", "response": "<think> a </think> <answer> 1 </answer>"}, row])
    cfg = tiny_config(str(tmp_path / "out"), str(tmp_path / "cache"), **{"data.jsonl": path})
    with pytest.raises(SystemExit, match=rf"data error: {re.escape(path)}:2: its {part} makes vqa need .* "
                                         rf"positions but --model.max_len=128"):
        make_bundle(cfg)


def test_the_first_skipped_rows_are_named_with_their_line(tmp_path):
    good = {"task": "vqa", "image": "pic.png", "prompt": "how many ?", "answer": "1"}
    path = jsonl(tmp_path, [good, "not json\n", {"task": "ocr"}, {**good, "image": "missing.png"},
                            {"task": "vqa"}, "[1, 2]\n"])
    cfg = make_config("toy", {"data.jsonl": path, "train.out_dir": str(tmp_path)})
    ctx = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, str(tmp_path))
    assert len(data.load_user_rows(cfg, ctx)) == 1
    log = (tmp_path / "log.txt").read_text()
    assert "(5 skipped: malformed, or held-out rows that repeat a training row)" in log
    for line in (2, 3, 4):
        assert f"  skipped {path}:{line}: " in log
    assert "... and 2 more" in log


def test_a_stage_without_its_starting_checkpoint_fails_before_the_vq_trains(tmp_path):
    for stage, words in (("rl", "--stage=rl starts from"), ("eval", "no checkpoint in")):
        with pytest.raises(SystemExit, match=words):
            train.main(flags(tmp_path, str(tmp_path / "run"), f"--stage={stage}"))
    assert not os.path.exists(tmp_path / "cache")                # no VQ trained, no data built
