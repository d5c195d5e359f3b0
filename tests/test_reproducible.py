"""
Same seed, same command -> the same run: the default stages are step-based (no time budget decides
anything), so two runs of a short job give bit-identical weights, losses and metrics on one machine
(timing fields aside).

    python -m pytest tests/test_reproducible.py -q
"""
import json
import os

import torch

import train

# what depends on the clock, and the process's peak memory (both runs share this process, so the second
# can only report the same peak or a higher one): measurements of the machine, not of the run
TIMING = ("eval_seconds", "total_seconds", "seconds", "rollout_s", "update_s", "peak_mem_mb")


def strip_timing(x):
    if isinstance(x, dict):
        return {k: strip_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [strip_timing(v) for v in x]
    return x


def test_two_runs_of_the_same_command_are_identical(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        train.main([f"--out_dir={out}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.n_sft=24", "--data.n_rl=24",
                    "--data.n_eval=4", "--data.n_val=4", "--vq.steps=20", "--vq.n_images=64", "--model.n_layer=1",
                    "--model.d_model=32", "--model.n_head=2", "--train.max_steps=6", "--train.batch_size=4",
                    "--train.micro_batch=4", "--train.eval_interval=3", "--eval.curve_n=2", "--rl.max_steps=2",
                    "--rl.prompts_per_step=1", "--rl.group_size=2", "--rl.sft_rows=2", "--eval.n_per_task=4",
                    "--eval.grid_rows=1"])
        runs.append(out)
    load = lambda run, f: json.load(open(os.path.join(run, f)))
    for f in ("metrics.json", "sft_curve.json", "rl_log.json"):
        assert strip_timing(load(runs[0], f)) == strip_timing(load(runs[1], f)), f
    a, b = (torch.load(os.path.join(r, "ckpt_rl.pt"), weights_only=False) for r in runs)
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sft = [torch.load(os.path.join(r, "ckpt_sft.pt"), weights_only=False)["loss"] for r in runs]
    assert sft[0] == sft[1]
