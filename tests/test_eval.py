"""
Tests of metrics.py's diagnostic metrics (box padding, reading vs reasoning): hand-made examples and responses,
expected values counted by hand. pass@k and best-of-k against enumeration of every k-subset, and
eval.py --pass_k end to end against 1 - C(n-c, k) / C(n, k) written out here, on the sampled scores
and on rigged per-prompt counts.

    python -m pytest tests/test_eval.py -q
"""
import math
import os
from types import SimpleNamespace

import pytest

import metrics as E
import rewards as RW
from world import Example

FAKE_TOK = SimpleNamespace(decode=lambda text: text)     # responses are given as text already
WIDE = SimpleNamespace(R_text=10 ** 6)


def test_ground_box_pad_is_the_mean_outward_edge_offset():
    exs = [Example("ground", "unique", "q", None, (10, 10, 14, 14)),
           Example("ground", "unique", "q", None, (2, 2, 8, 8)),
           Example("ground", "unique", "q", None, (0, 0, 4, 4))]
    resp = ["<answer> 9 9 15 15 </answer>",     # 1 px too big on every side: +1
            "<answer> 3 2 8 7 </answer>",       # left and bottom edges 1 px inside: (-1 + 0 + 0 - 1) / 4
            "<answer> 1 2 </answer>"]           # unparsable: skipped
    m = E.box_pad_metric(exs, resp, WIDE, FAKE_TOK)
    assert math.isclose(m["ground_box_pad_px"], (1.0 - 0.5) / 2)


def test_trace_lists_reads_each_colon_to_dot_span():
    t = "red shapes : r0c1 r2c2 . count 2 . squares : none . count 0 . 2 > 0 yes"
    assert RW.trace_lists(t) == [("r0c1", "r2c2"), ("none",)]
    assert RW.trace_lists("sides : r0c1 3 r1c1 4 . 3 + 4 = 7") == [("r0c1", "3", "r1c1", "4")]
    # the model's decoded text: special tokens around it, and a list it never closed is dropped
    assert RW.trace_lists("<think> circles : r3c3 . count 1 . large shapes : r0c0 </think>") == [("r3c3",)]


def test_reading_metrics_split_reading_from_reasoning_errors_by_hand():
    def ex(trace, answer):
        return Example("vqa", "add", "q", None, answer, trace=trace)
    exs = [ex("red shapes : r0c1 . count 1 . circles : r1c1 r2c2 . count 2 . 1 + 2 = 3", "3"),
           ex("red shapes : r0c1 . count 1 . circles : r1c1 r2c2 . count 2 . 1 + 2 = 3", "3"),
           ex("blue shapes : none . count 0", "0"),
           ex("squares : r3c0 . count 1", "1")]
    resp = ["red shapes : r0c1 . count 1 . circles : r1c1 r2c2 . count 2 . 1 + 2 = 4 <answer> 4 </answer>",
            "red shapes : r0c1 . count 1 . circles : r2c2 r2c2 . count 2 . 1 + 2 = 3 <answer> 3 </answer>",
            "blue shapes : none . count 0 <answer> 0 </answer>",
            "squares : r3c1 . count 1 <answer> 1 </answer>"]
    rewards = [0.0, 1.0, 1.0, 1.0]       # row 2 is right by luck, row 4 by luck too
    m = E.reading_metrics(exs, resp, WIDE, FAKE_TOK, rewards)
    # truth lists: 2 + 2 + 1 + 1 = 6; exact: row 1 both, row 2 the first, row 3 its one -> 4 of 6
    assert math.isclose(m["vqa_lists_exact"], 4 / 6)
    # one wrong answer (row 1), and its lists were all exact: a reasoning slip
    assert m["vqa_wrong_lists_right"] == 1.0
    assert "vqa_wrong_lists_right" not in E.reading_metrics(exs[2:3], resp[2:3], WIDE, FAKE_TOK, [1.0])


# ----------------------------------------------------------------------------------------------
# pass@k and best-of-k against brute-force enumeration of every k-subset

def test_pass_at_k_equals_enumeration_of_subsets():
    import itertools
    for n in range(1, 7):
        for c in range(n + 1):
            right = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                want = sum(any(right[i] for i in s) for s in subsets) / len(subsets)
                assert math.isclose(E.pass_at_k(n, c, k), want, abs_tol=1e-12), (n, c, k)


def test_best_of_k_equals_enumeration_of_subsets():
    import itertools
    scores = [0.5, 0.9, 0.1, 0.9, 0.7, 0.0]          # ties included
    for k in range(1, len(scores) + 1):
        subsets = list(itertools.combinations(scores, k))
        want = sum(max(s) for s in subsets) / len(subsets)
        assert math.isclose(E.best_of_k(scores, k), want, abs_tol=1e-12), k


def test_pass_at_k_rejects_impossible_counts():
    import pytest
    for n, c, k in ((4, 1, 5), (4, 5, 1), (4, 1, 0)):
        with pytest.raises(ValueError, match="pass_at_k"):
            E.pass_at_k(n, c, k)


@pytest.mark.parametrize("script", ["train.py", "eval.py", "sample.py", "report.py"])
def test_every_entry_script_answers_help_with_exit_0(script):
    """`python X.py -h` prints its usage and exits 0 (sample.py exited 1 before)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, script, "-h"], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage" in (p.stdout + p.stderr).lower() or "--" in p.stdout


def test_level_metrics_by_hand():
    """Levels 1, 2 traced: L3 is the edge bucket, L4 far; the means and counts per level and bucket."""
    exs = [Example("vqa", "q", "p", None, "1", level=v) for v in (1, 2, 2, 3, 3, 4)]
    m = E.level_metrics("vqa_acc", exs, [1.0, 0.0, 1.0, 1.0, 0.0, 0.0], "1,2")
    assert m["vqa_acc_L2"] == 0.5 and m["vqa_acc_L3"] == 0.5 and m["vqa_acc_L4"] == 0.0
    assert m["vqa_acc_in"] == pytest.approx(2 / 3) and m["vqa_acc_edge"] == 0.5 and m["vqa_acc_far"] == 0.0
    assert m["vqa_acc_n"] == {"L1": 1, "L2": 2, "L3": 2, "L4": 1, "in": 3, "edge": 2, "far": 1}


def test_the_main_job_reports_buckets_before_and_after_rl(tmp_path):
    """With held-out levels above the traced ones, metrics.json holds the RL model's per-bucket numbers
    and the SFT checkpoint's on the same examples, and the log prints them side by side."""
    import json

    import train
    out = tmp_path / "run"
    train.main([f"--out_dir={out}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.n_sft=8", "--data.n_rl=4",
                "--data.n_eval=16", "--data.n_val=2", "--data.rl_levels=3", "--data.eval_levels=1,2,3,4",
                "--model.n_layer=1", "--model.n_head=2", "--model.d_model=32", "--vq.steps=10", "--vq.n_images=32",
                "--train.max_steps=2", "--train.batch_size=4", "--train.micro_batch=2", "--train.eval_interval=0",
                "--rl.max_steps=1", "--rl.prompts_per_step=1", "--rl.group_size=2", "--rl.sft_rows=2",
                "--eval.n_per_task=16", "--eval.grid_rows=1"])
    m = json.load(open(out / "metrics.json"))
    for name in ("vqa_acc", "ground_miou"):
        assert {f"{name}_in", f"{name}_edge"} <= set(m) and {f"{name}_in", f"{name}_edge"} <= set(m["sft_checkpoint"])
    assert "vqa_acc_far" in m                                          # vqa has a level 4; grounding stops at 3
    log = (out / "log.txt").read_text()
    assert "vqa_acc by bucket, SFT -> RL: in " in log and "edge" in log
    # eval.py on the same folder writes its own report card beside the run's, never over it
    import eval as E
    import report
    card = (out / "report.md").read_text()
    E.main([f"--out_dir={out}", "--eval.n_per_task=4", "--eval.grid_rows=1"])
    assert (out / "report.md").read_text() == card and "| edge (" in card
    ev = json.load(open(out / "metrics_eval.json"))
    assert (out / "report_eval.md").exists() and f"| {ev['vqa_acc']:.3f} |" in (out / "report_eval.md").read_text()
    assert report.report_name("metrics.json") == "report.md" and report.report_name("x/metrics_eval.json") == "report_eval.md"


# ----------------------------------------------------------------------------------------------
# eval.py --pass_k end to end: pass@k recomputed here with 1 - C(n-c, k) / C(n, k)

def hand_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT checkpoint (2 steps) to evaluate."""
    import train
    tmp = tmp_path_factory.mktemp("passk")
    train.main([f"--out_dir={tmp / 'run'}", f"--data.cache_dir={tmp / 'cache'}", "--data.n_sft=8", "--data.n_rl=4",
                "--data.n_eval=4", "--data.n_val=2", "--model.n_layer=1", "--model.n_head=2", "--model.d_model=32",
                "--vq.steps=10", "--vq.n_images=32", "--train.max_steps=2", "--train.batch_size=4",
                "--train.micro_batch=2", "--train.eval_interval=0", "--train.time_budget_s=0", "--stage=sft"])
    return tmp


def eval_pass_k(tmp, k: int, name: str) -> dict:
    import json

    import eval as EV
    EV.main([f"--out_dir={tmp / 'run'}", f"--pass_k={k}", f"--out={tmp / name}", "--eval.n_per_task=3",
             "--eval.batch_size=8", "--eval.grid_rows=1"])
    return json.load(open(tmp / name))


def test_eval_py_pass_k_from_the_sampled_scores_by_hand(sft_run, monkeypatch):
    """eval.py --pass_k=4 on a real checkpoint: the per-prompt scores its sampler returns give, by the
    formula here, vqa/ground pass@1 and pass@4 (right: reward 1 / IoU >= 0.5) and edit best@1 (the
    mean score) and best@4 (the mean of each prompt's best); pass@1 of vqa is the mean reward; k = 8
    is more than the 4 samples and is left out."""
    real, seen = E.sample_scores, {}

    def spy(model, bundle, vq, cfg, device, autocast, task, *a, **k):
        seen[task] = real(model, bundle, vq, cfg, device, autocast, task, *a, **k)
        return seen[task]
    monkeypatch.setattr(E, "sample_scores", spy)
    m = eval_pass_k(sft_run, 4, "passk_real.json")
    assert set(seen) == {"vqa", "ground", "edit"}
    for task, scores in seen.items():
        assert len(scores) == 3 and all(len(s) == 4 for s in scores)         # 3 prompts x 4 samples
    for task, right in (("vqa", 1.0), ("ground", 0.5)):
        counts = [sum(x >= right for x in s) for s in seen[task]]
        for k in (1, 4):
            assert m[f"{task}_pass@{k}"] == pytest.approx(sum(hand_pass_at_k(4, c, k) for c in counts) / 3)
    assert m["vqa_pass@1"] == pytest.approx(sum(map(sum, seen["vqa"])) / 12)
    assert m["edit_best@1"] == pytest.approx(sum(map(sum, seen["edit"])) / 12)
    assert m["edit_best@4"] == pytest.approx(sum(max(s) for s in seen["edit"]) / 3)
    assert not any(k.endswith("@8") for k in m)


def test_eval_py_pass_k_with_known_per_prompt_counts(sft_run, monkeypatch):
    """The rewards of the pass@k samples are rigged (edit: each group scores 0.25, 1, 0.5, 0): prompt p of the held-out vqa set gets c_p = 0, 2, 3
    right of 4 (the first c_p rows of its group), so eval.py's vqa_pass@k must be the formula's mean
    over those counts: pass@1 = (0 + 2 + 3) / 12, pass@4 = (0 + 1 + 1) / 3. This
    also checks that sample_scores cuts its batch into prompt-major groups (two prompts per sampler
    call here: eval.batch_size 8 // 4 samples)."""
    import rewards as RW
    real_metrics, known = E.pass_at_k_metrics, {}

    def rigged_rows(task, exs, resp, layout, tok, judge):
        if task == "edit":                      # every group scores 0.25, 1, 0.5, 0
            out = [(0.25, 1.0, 0.5, 0.0)[i % 4] for i in range(len(exs))]
        else:
            out = [float(task == "vqa" and i % 4 < known[id(e)]) for i, e in enumerate(exs)]
        return out, ["ok"] * len(out), None, None

    def rigged(model, bundle, *a, **k):
        known.update({id(e): c for e, c in zip(bundle.sets["vqa"]["eval"].examples, (0, 2, 3))})
        with pytest.MonkeyPatch.context() as mp:         # the rigged rewards for the pass@k samples only
            mp.setattr(RW, "score_rows", rigged_rows)
            return real_metrics(model, bundle, *a, **k)
    monkeypatch.setattr(E, "pass_at_k_metrics", rigged)
    m = eval_pass_k(sft_run, 4, "passk_rigged.json")
    counts = (0, 2, 3)
    assert m["vqa_pass@1"] == pytest.approx(5 / 12)
    assert m["vqa_pass@4"] == pytest.approx(2 / 3)
    for k in (1, 4):
        assert m[f"vqa_pass@{k}"] == pytest.approx(sum(hand_pass_at_k(4, c, k) for c in counts) / 3)
    assert m["ground_pass@1"] == 0.0
    # best-of-k of the scores 0.25, 1, 0.5, 0: one sample scores their mean, four always hold the 1
    assert m["edit_best@1"] == pytest.approx(1.75 / 4) and m["edit_best@4"] == 1.0
