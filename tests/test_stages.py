"""
The stages end to end and the pieces around them, each against a reference computed apart from the
code under test:

  1. The whole main job (`train.py --stage=all`) at a tiny size, run once for the module: the RL stage
     starts from the SFT weights (the policy rl.rl_step sees at RL step 0 is ckpt_sft.pt's model);
     the final metrics.json equals `eval.py` run on ckpt_rl.pt, and its `sft_checkpoint` block equals
     `eval.py --ckpt=ckpt_sft.pt`; every checkpoint holds what a resume or a reader needs; a best
     checkpoint is written exactly when the quick-eval score beats the best so far (the scores are
     fixed sequences, so the steps that must be saved are known in advance).
  2. The learning-rate schedule: common.lr_at against the warm-up / cosine formula written out here,
     and the progress the SFT loop feeds it under a time budget, on a fake clock whose readings are
     chosen by hand (quick-eval seconds excluded).
  3. metrics.evaluate and metrics.baselines on level-1 pools with a one-code-per-cell VQ and a fake
     model whose outputs are fixed (the answer "2", the whole-picture box, the input picture copied,
     an empty canvas): every number counted by hand from the examples.

    python -m pytest tests/test_stages.py -q
"""
import json
import math
import os
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import common
import config as C
import eval as E
import metrics
import rl
import tokens as TK
import train
import world as W

# ----------------------------------------------------------------------------------------------
# 1. the main job, once for the module

# the quick-eval scores the two stages see, in order: a best checkpoint must be written at the steps
# whose score beats every earlier one (SFT: steps 1 and 3; RL: steps 1 and 2)
SFT_SCORES, RL_SCORES = [0.5, 0.3, 0.6], [0.2, 0.4, 0.1]
EVAL_FLAGS = ["--eval.n_per_task=4", "--eval.batch_size=2", "--eval.grid_rows=1", "--eval.curve_n=2"]


def job_flags(tmp, out) -> list[str]:
    """A main job of seconds: 1 layer, d 32, 3 SFT and 3 RL steps with a quick eval after every step,
    held-out levels 1-3 over traced levels 1-2 (so metrics.json gets its SFT-checkpoint block), no
    time budgets. RL's lr is large so that RL visibly moves the weights away from SFT's."""
    return [f"--out_dir={out}", f"--data.cache_dir={tmp / 'cache'}", "--data.n_sft=8", "--data.n_rl=4",
            "--data.n_eval=4", "--data.n_val=2", "--model.n_layer=1", "--model.n_head=2", "--model.d_model=32",
            "--vq.steps=10", "--vq.n_images=32", "--train.max_steps=3", "--train.batch_size=4",
            "--train.micro_batch=2", "--train.eval_interval=1", "--train.ckpt_interval=100",
            "--train.time_budget_s=0", "--rl.time_budget_s=0", "--rl.max_steps=3", "--rl.prompts_per_step=1",
            "--rl.group_size=2", "--rl.sft_rows=2", "--rl.eval_interval=1", "--rl.lr=1e-2", *EVAL_FLAGS]


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in common.unwrap(model).state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Runs the main job once with spies: the policy's weights when rl.rl_step is first called, every
    quick-eval score handed out, and every best checkpoint written (file, step, score)."""
    tmp = tmp_path_factory.mktemp("job")
    out = tmp / "run"
    seen = SimpleNamespace(rl_start=None, scores=[], best_saves=[], held_out=[])
    scores = iter(SFT_SCORES + RL_SCORES)
    real_step, real_save, real_evaluate = rl.rl_step, metrics.save_checkpoint, metrics.evaluate

    def spy_step(ro, *a, **k):
        if seen.rl_start is None:
            seen.rl_start = weights(ro.model)
        return real_step(ro, *a, **k)

    def fixed_score(m):
        seen.scores.append(next(scores))
        return seen.scores[-1]

    def spy_save(path, model, opt, step, cfg, bundle, extra=None):
        seen.best_saves.append((os.path.basename(path), step, extra["score"]))
        return real_save(path, model, opt, step, cfg, bundle, extra)

    def spy_evaluate(model, *a, split="eval", **k):
        if split == "eval":                    # the held-out evaluations (quick evals use the val split)
            seen.held_out.append(weights(model))
        return real_evaluate(model, *a, split=split, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rl, "rl_step", spy_step)
        mp.setattr(metrics, "evaluate", spy_evaluate)
        mp.setattr(metrics, "selection_score", fixed_score)
        mp.setattr(metrics, "save_checkpoint", spy_save)
        train.main(job_flags(tmp, out))
    load = lambda name: torch.load(out / name, map_location="cpu", weights_only=False)
    return SimpleNamespace(tmp=tmp, out=out, seen=seen, metrics=json.load(open(out / "metrics.json")),
                           sft=load("ckpt_sft.pt"), rl=load("ckpt_rl.pt"), sft_best=load("ckpt_sft_best.pt"),
                           rl_best=load("ckpt_rl_best.pt"))


def run_eval_py(job, ckpt: str, name: str) -> tuple[dict, np.ndarray]:
    """eval.py on one of the job's checkpoints with the job's own --eval.* flags: its metrics file and
    its sample grid (responses as text: they tell two models apart where every number is the same)."""
    dst = job.tmp / name
    E.main([f"--out_dir={job.out}", f"--ckpt={job.out / ckpt}", f"--out={dst}", *EVAL_FLAGS])
    return json.load(open(dst)), grid(job.out / "samples_eval.png")


def grid(path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


TIMING = ("eval_seconds", "total_seconds")


def test_rl_starts_from_the_sft_checkpoint_and_moves_away_from_it(job):
    """The policy of RL step 0 is ckpt_sft.pt's model, and 3 updates later ckpt_rl.pt is not (so the
    first comparison is not between two copies of an untouched model)."""
    assert job.seen.rl_start is not None
    assert same_weights(job.seen.rl_start, job.sft["model"])
    assert not same_weights(job.rl["model"], job.sft["model"])


def test_final_metrics_equal_eval_py_on_the_rl_checkpoint(job):
    """metrics.json (timings aside, and without the SFT block) == eval.py --ckpt=ckpt_rl.pt, and the
    job's samples.png == eval.py's sample grid, pixel for pixel."""
    final = {k: v for k, v in job.metrics.items() if k not in TIMING + ("sft_checkpoint",)}
    again, pic = run_eval_py(job, "ckpt_rl.pt", "rl_eval.json")
    assert final == {k: v for k, v in again.items() if k not in TIMING}
    assert np.array_equal(pic, grid(job.out / "samples.png"))


def test_the_sft_block_equals_eval_py_on_the_sft_checkpoint(job):
    """metrics.json's sft_checkpoint block == eval.py --ckpt=ckpt_sft.pt's vqa/ground/edit numbers."""
    block = job.metrics["sft_checkpoint"]
    sft, pic = run_eval_py(job, "ckpt_sft.pt", "sft_eval.json")
    # the SFT model writes other responses than the RL model (the numbers alone are alike at this size)
    assert not np.array_equal(pic, grid(job.out / "samples.png"))
    want = {k: v for k, v in sft.items() if k.startswith(("vqa_acc", "ground_miou", "edit_score"))}
    assert block == want
    assert {"vqa_acc_in", "vqa_acc_edge", "ground_miou_in", "edit_score"} <= set(block)


def test_the_final_eval_scores_the_rl_model_then_the_sft_checkpoint(job):
    """At this size both models score alike (a 10-step VQ paints every picture the same), so the
    numbers alone cannot tell the two apart: the held-out evaluations must run on ckpt_rl.pt's
    weights (metrics.json) and then on ckpt_sft.pt's (its SFT block), which differ."""
    assert len(job.seen.held_out) == 2
    assert same_weights(job.seen.held_out[0], job.rl["model"])
    assert same_weights(job.seen.held_out[1], job.sft["model"])


COMMON_KEYS = {"model", "optim", "step", "config", "vocab_size", "vq_sha", "tok", "rng"}


def test_each_checkpoint_holds_what_resuming_and_reading_it_need(job):
    """ckpt_sft.pt: weights, optimizer, step, config, tokenizer, RNG, plus the sampler, every rank's
    random state, the quick-eval history and the loss; ckpt_rl.pt: the same without the SFT-only loss
    fields, with the RL log and its three random streams; a best checkpoint: weights and its score,
    no optimizer. Every one rebuilds the model it was written from."""
    assert set(job.sft) == COMMON_KEYS | {"elapsed", "history", "sampler", "rank_states", "loss", "loss_ema"}
    assert set(job.rl) == COMMON_KEYS | {"elapsed", "history", "rank_states"}
    for best in (job.sft_best, job.rl_best):
        assert set(best) == COMMON_KEYS | {"score", "elapsed"} and best["optim"] is None
    assert job.sft["step"] == 3 and job.rl["step"] == 3
    assert job.sft["optim"]["state"] and job.rl["optim"]["state"]          # AdamW moments to resume with
    assert [h["step"] for h in job.sft["history"]] == [1, 2, 3]               # one quick eval per step
    assert [h["step"] for h in job.rl["history"]] == [1, 2, 3]                # one log record per update
    assert len(job.rl["rank_states"]) == 1 and {"torch", "sampler", "gen", "pick"} <= set(job.rl["rank_states"][0])
    assert len(job.sft["rank_states"]) == 1 and {"torch", "sampler"} <= set(job.sft["rank_states"][0])
    assert job.sft["config"]["train"]["max_steps"] == 3 and job.rl["config"]["rl"]["max_steps"] == 3
    for blob in (job.sft, job.rl, job.sft_best, job.rl_best):
        assert same_weights(weights(common.model_from_checkpoint(blob, "cpu")), blob["model"])
    # the last SFT step is the best one (0.6): its best checkpoint holds the final SFT weights
    assert same_weights(job.sft_best["model"], job.sft["model"])
    assert [r["step"] for r in json.load(open(job.out / "rl_log.json"))] == [1, 2, 3]


def test_a_best_checkpoint_is_written_only_when_the_score_improves(job):
    """Quick-eval scores 0.5, 0.3, 0.6 (SFT) and 0.2, 0.4, 0.1 (RL): best checkpoints at SFT steps 1 and
    3 and RL steps 1 and 2, never on a worse score; each file ends with the best step and score."""
    assert job.seen.scores == SFT_SCORES + RL_SCORES                        # one quick eval per step
    assert job.seen.best_saves == [("ckpt_sft_best.pt", 1, 0.5), ("ckpt_sft_best.pt", 3, 0.6),
                                   ("ckpt_rl_best.pt", 1, 0.2), ("ckpt_rl_best.pt", 2, 0.4)]
    assert (job.sft_best["step"], job.sft_best["score"]) == (3, 0.6)
    assert (job.rl_best["step"], job.rl_best["score"]) == (2, 0.4)
    assert [h["score"] for h in json.load(open(job.out / "sft_curve.json"))] == SFT_SCORES


# ----------------------------------------------------------------------------------------------
# 2. the learning-rate schedule, and the progress the SFT loop feeds it


def hand_lr(step: int, progress: float, warmup: int, lr: float, min_frac: float) -> float:
    """Linear warm-up to lr over `warmup` steps (step 0 gets lr / warmup), then a half cosine from lr
    at progress 0 to lr * min_frac at progress 1, flat after 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(progress, 1.0)
    return lr * min_frac + (lr - lr * min_frac) * (math.cos(math.pi * p) + 1) / 2


def test_lr_at_warms_up_linearly_then_follows_the_cosine_by_hand():
    lr, frac = 1e-3, 0.1
    # the warm-up ignores progress: 1/4, 2/4, 3/4, 4/4 of lr
    assert [common.lr_at(s, 0.9, 4, lr, frac) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert common.lr_at(4, 0.0, 4, lr, frac) == pytest.approx(1e-3)             # cosine start: lr
    assert common.lr_at(9, 1.0, 4, lr, frac) == pytest.approx(1e-4)             # end: lr * min_frac
    assert common.lr_at(9, 0.5, 4, lr, frac) == pytest.approx(5.5e-4)           # midpoint: the mean of both
    # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2 = 0.868198 of lr
    assert common.lr_at(9, 0.25, 4, lr, frac) == pytest.approx(8.68198052e-4)
    assert common.lr_at(9, 1.5, 4, lr, frac) == pytest.approx(1e-4)             # past the end: stays at the floor
    for step, p in ((0, 0.3), (5, 0.1), (7, 0.6), (100, 0.99)):
        assert common.lr_at(step, p, 4, lr, frac) == pytest.approx(hand_lr(step, p, 4, lr, frac))


class FakeClock:
    """time.time() for train.py: it moves only when a test moves it."""

    def __init__(self):
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def sft_lrs(tmp_path, monkeypatch, seconds_per_step: float, eval_seconds: float = 0.0, **over) -> list[float]:
    """run_sft on the tiny world with a stub step that takes `seconds_per_step` of a fake clock and
    quick evals that take `eval_seconds`; returns the learning rate each step was taken with."""
    from test_distributed import FakeVQ, make_bundle, tiny_config
    cfg = tiny_config(str(tmp_path), str(tmp_path / "cache"), **{"train.ckpt_interval": 1000, "train.log_interval": 1000,
                                                                 **over})
    bundle, clock, lrs = make_bundle(cfg), FakeClock(), []
    monkeypatch.setattr(train, "time", clock)

    def step(model, opt, *a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        clock.now += seconds_per_step
        return 0.5, {"masked_acc": 0.0}, 0.0

    def quick_eval(*a, **k):
        clock.now += eval_seconds
        return {"eval_seconds": eval_seconds, "score": 0.0}
    monkeypatch.setattr(train, "sft_step", step)
    monkeypatch.setattr(metrics, "quick_eval", quick_eval)
    train.run_sft(cfg, common.setup(cfg), bundle, FakeVQ())
    return lrs


def test_without_a_time_budget_progress_is_the_step_fraction(tmp_path, monkeypatch):
    """No cap: progress = step / max_steps however slow the steps are (1000 fake seconds each)."""
    lr, frac = 1e-2, 0.1
    lrs = sft_lrs(tmp_path, monkeypatch, 1000.0, **{"train.max_steps": 4, "train.warmup": 2, "train.lr": lr,
                                                    "train.min_lr_frac": frac, "train.time_budget_s": 0})
    assert lrs == pytest.approx([lr / 2, lr, hand_lr(2, 2 / 4, 2, lr, frac), hand_lr(3, 3 / 4, 2, lr, frac)])


def test_under_a_time_budget_progress_is_the_larger_of_steps_and_training_seconds(tmp_path, monkeypatch):
    """A 100 s cap, 10 fake seconds per step, 20 steps planned, and a quick eval of 50 s after step 5:
    the clock runs ahead of the steps (step i starts at 10 i seconds: progress 0.1 i, not i / 20), the
    eval's seconds are not counted (else progress would jump by 0.5 after it), and the run stops after
    step 11, when 110 s > 100 s, its last step taken at the floor lr * min_frac."""
    lr, frac = 1e-2, 0.1
    lrs = sft_lrs(tmp_path, monkeypatch, 10.0, eval_seconds=50.0,
                  **{"train.max_steps": 20, "train.warmup": 1, "train.lr": lr, "train.min_lr_frac": frac,
                     "train.time_budget_s": 100.0, "train.eval_interval": 5})
    want = [lr] + [hand_lr(i, 0.1 * i, 1, lr, frac) for i in range(1, 11)]
    assert lrs == pytest.approx(want)
    assert lrs[-1] == pytest.approx(lr * frac)
    # and with a slow clock (1 s per step, cap 1000 s) the step fraction is the larger: i / 4
    lrs = sft_lrs(tmp_path / "slow", monkeypatch, 1.0, **{"train.max_steps": 4, "train.warmup": 1, "train.lr": lr,
                                                          "train.min_lr_frac": frac, "train.time_budget_s": 1000.0})
    assert lrs == pytest.approx([lr] + [hand_lr(i, i / 4, 1, lr, frac) for i in range(1, 4)])


# ----------------------------------------------------------------------------------------------
# 3. metrics.evaluate and metrics.baselines against a model whose outputs are fixed

CELLS = [W.Shape(k, c, z) for k in W.KINDS for c in W.COLOURS for z in W.SIZES]     # 24 cell contents
EMPTY = len(CELLS)                                                                  # code 24: an empty cell


class CellVQ:
    """A lossless picture tokenizer for the shape world: one code per grid cell (its shape, or 24 for
    an empty cell); decode renders the scene those codes name."""

    def __init__(self, grid: int, image_size: int):
        self.grid, self.size = grid, image_size

    def encode_scene(self, scene) -> list[int]:
        return [EMPTY if s is None else CELLS.index(s) for s in scene]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        scenes = [tuple(None if int(k) == EMPTY else CELLS[int(k)] for k in row) for row in codes]
        return torch.stack([torch.from_numpy(W.render(s, self.grid, self.size).copy()).float() / 255 for s in scenes])


class Scripted(nn.Module):
    """A model that ignores the canvas and writes, whatever it is asked: vqa '<answer> 2 </answer>',
    grounding the whole picture '<answer> 0 0 32 32 </answer>', edit its input picture unchanged (the
    input's codes sit at prompt columns 2.. after the task tag and <boi>), t2i an empty canvas; every
    other text slot [EOS]. One logit of +50 per position, so greedy decoding writes exactly that."""

    def __init__(self, tok, lay: dict, P: int, box: str = "0 0 32 32"):
        super().__init__()
        self.tok, self.lay, self.P = tok, lay, P
        self.task_of = {v: k for k, v in tok.TASK.items()}
        self.answers = {"vqa": ["<answer>", "2", "</answer>"], "ground": ["<answer>", *box.split(), "</answer>"]}

    def forward(self, idx, valid=None, is_prompt=None):
        tok, P = self.tok, self.P
        out = torch.zeros(*idx.shape, tok.vocab_size)
        for b in range(idx.shape[0]):
            task = self.task_of[int(idx[b, 0])]
            lay = self.lay[task]
            text = [tok.EOS] * lay.R_text
            if task in self.answers:
                ans = [tok.stoi[w] for w in self.answers[task]]
                text[lay.R_text - len(ans):] = ans
            img = {"edit": idx[b, 2:2 + lay.n_img].tolist(), "t2i": [tok.img_offset + EMPTY] * lay.n_img}.get(task, [])
            for j, t in enumerate(text + img):
                out[b, P + j, t] = 50.0
        return out


@pytest.fixture(scope="module")
def level1():
    """Level-1 pools of every family (12 RL prompts and 12 held-out examples each), tokenized with the
    cell VQ: the edits are single operations, so copying the input has a known score per type."""
    # 20 RL prompts: enough that the RL pool's most common answers differ from the held-out set's own
    cfg = C.make_config("toy", {"data.n_sft": 4, "data.n_rl": 20, "data.n_eval": 12, "data.n_val": 2,
                                "data.sft_levels": "1", "data.rl_levels": "1", "data.eval_levels": "1",
                                "eval.n_per_task": 12, "eval.batch_size": 6})
    d = cfg.data
    pools = W.build_pools(d, W.DEFAULT_WORLD)
    tok = TK.Tokenizer.fit(TK.all_texts(pools), cfg.vq.codebook_size, max_number=d.image_size)
    n_img = (d.image_size // cfg.vq.downsample) ** 2
    assert n_img == d.grid ** 2                                      # one code per cell
    lay, P, vq = TK.layouts_for(pools, tok, n_img), TK.prompt_width(pools, tok, n_img), CellVQ(d.grid, d.image_size)
    sets = {task: {split: TK.tokenize_split(
                task, exs, tok, lay[task], P,
                torch.tensor([vq.encode_scene(e.scene) for e in exs]) if task != "t2i" else None,
                torch.tensor([vq.encode_scene(e.answer) for e in exs]) if task in ("edit", "t2i") else None)
                for split, exs in splits.items()} for task, splits in pools.items()}
    bundle = SimpleNamespace(tok=tok, sets=sets)
    m = metrics.evaluate(Scripted(tok, lay, P), bundle, vq, cfg, "cpu", nullcontext())
    return SimpleNamespace(cfg=cfg, bundle=bundle, ev={t: pools[t]["eval"] for t in pools}, rl=pools["vqa"]["rl"],
                           m=m, base=metrics.baselines(bundle, cfg), vq=vq, tok=tok, lay=lay, P=P)


def test_evaluate_scores_a_fixed_vqa_answer_by_hand(level1):
    """Always '2': the accuracy is the share of held-out questions whose answer is 2, per type too."""
    exs, m = level1.ev["vqa"], level1.m
    right = [e.answer == "2" for e in exs]
    assert 0 < sum(right) < len(exs)                                 # both outcomes occur
    assert m["vqa_acc"] == pytest.approx(sum(right) / len(exs))
    for q in {e.qtype for e in exs}:
        assert m["vqa_acc_by_type"][q] == pytest.approx(np.mean([r for e, r in zip(exs, right) if e.qtype == q]))
    assert m["vqa_parse_fail"] == {} and m["vqa_acc_in"] == m["vqa_acc"]


def test_evaluate_scores_the_whole_picture_box_by_hand(level1):
    """The box 0 0 32 32 contains every true box b: IoU = area(b) / 32^2, right at IoU >= 0.5 only
    when the shape covers half the picture (never), and each edge lies 0 - x0, 0 - y0, 32 - x1,
    32 - y1 pixels outside it."""
    exs, m = level1.ev["ground"], level1.m
    ious = [(x1 - x0) * (y1 - y0) / 32 ** 2 for x0, y0, x1, y1 in (e.answer for e in exs)]
    assert m["ground_miou"] == pytest.approx(np.mean(ious)) and m["ground_miou"] > 0
    assert m["ground_p50"] == 0.0 and m["ground_parse_fail"] == {}
    pads = [(x0 + y0 + (32 - x1) + (32 - y1)) / 4 for x0, y0, x1, y1 in (e.answer for e in exs)]
    assert m["ground_box_pad_px"] == pytest.approx(np.mean(pads))


def test_evaluate_scores_a_one_cell_box_on_both_sides_of_iou_one_half(level1):
    """The box of the cell holding the most targets (8 x 8 px): a target inside it scores
    area / 64 (a large shape's 6 x 6 box 0.5625: right at IoU >= 0.5; a small one's 4 x 4 box 0.25:
    wrong), a target elsewhere 0 (boxes of different cells do not overlap)."""
    exs = level1.ev["ground"]
    cell_of = [(y0 // 8, x0 // 8) for x0, y0, _, _ in (e.answer for e in exs)]
    r, c = max(set(cell_of), key=cell_of.count)
    model = Scripted(level1.tok, level1.lay, level1.P, box=f"{8 * c} {8 * r} {8 * c + 8} {8 * r + 8}")
    m = metrics.evaluate(model, level1.bundle, level1.vq, level1.cfg, "cpu", nullcontext(), tasks=["ground"])
    ious = [(x1 - x0) * (y1 - y0) / 64 if cell == (r, c) else 0.0
            for (x0, y0, x1, y1), cell in zip((e.answer for e in exs), cell_of)]
    assert 0 < sum(v >= 0.5 for v in ious) < sum(v > 0 for v in ious)      # both sides of 0.5 occur
    assert m["ground_miou"] == pytest.approx(np.mean(ious))
    assert m["ground_p50"] == pytest.approx(np.mean([v >= 0.5 for v in ious]))


# copying the input: the changed cells earn nothing for add / remove / move (a shape where none should be,
# or none where one should be), 2 of 3 attributes for a recolour; the kept cells are all right
COPY_SCORE = {"add": 0.5, "remove": 0.5, "move": 0.5, "recolour": 0.5 * 2 / 3 + 0.5}


def test_evaluate_scores_a_copied_picture_and_an_empty_canvas_by_hand(level1):
    """Edit: the input copied scores COPY_SCORE of its type, never the exact target. t2i: an empty
    canvas gets the share of empty cells of the described scene, and no shape right."""
    m = level1.m
    edits, scenes = level1.ev["edit"], [e.answer for e in level1.ev["t2i"]]
    assert {e.qtype for e in edits} >= {"recolour", "remove"}       # both values occur
    assert m["edit_score"] == pytest.approx(np.mean([COPY_SCORE[e.qtype] for e in edits]))
    assert m["edit_exact"] == 0.0
    assert m["t2i_cell_acc"] == pytest.approx(np.mean([sum(s is None for s in sc) / len(sc) for sc in scenes]))
    assert m["t2i_shape_acc"] == 0.0


def test_baselines_by_hand(level1):
    """metrics.baselines recomputed here: the most common RL answer of each question type (ties to
    the first seen), a uniformly random shape's box (boxes of different cells never overlap, so only
    the true shape scores, IoU 1: 1 / number of shapes), the copied input, the empty canvas. The
    last two must also equal what the scripted model scored by actually copying / drawing nothing."""
    base, m = level1.base, level1.m
    counts, first = {}, {}
    for i, e in enumerate(level1.rl):
        c = counts.setdefault(e.qtype, {})
        c[e.answer] = c.get(e.answer, 0) + 1
        first.setdefault((e.qtype, e.answer), i)
    prior = {q: max(c, key=lambda a: (c[a], -first[(q, a)])) for q, c in counts.items()}
    hits = [prior.get(e.qtype) == e.answer for e in level1.ev["vqa"]]
    assert base["vqa_prior_acc"] == pytest.approx(np.mean(hits))
    # the guess is the RL pool's: the held-out set's own most common answers would score otherwise
    own = {q: max(sorted({e.answer for e in level1.ev["vqa"] if e.qtype == q}),
                  key=lambda a: sum(e.qtype == q and e.answer == a for e in level1.ev["vqa"])) for q in prior}
    assert np.mean([own.get(e.qtype) == e.answer for e in level1.ev["vqa"]]) != pytest.approx(np.mean(hits))
    for q, v in base["vqa_prior_by_type"].items():
        assert v == pytest.approx(np.mean([h for e, h in zip(level1.ev["vqa"], hits) if e.qtype == q]))
    n_shapes = [sum(s is not None for s in e.scene) for e in level1.ev["ground"]]
    assert base["ground_random_miou"] == pytest.approx(np.mean([1 / n for n in n_shapes]))
    assert base["ground_random_p50"] == pytest.approx(np.mean([1 / n for n in n_shapes]))
    assert base["edit_copy_score"] == pytest.approx(np.mean([COPY_SCORE[e.qtype] for e in level1.ev["edit"]]))
    assert base["edit_copy_score"] == pytest.approx(m["edit_score"])
    assert base["t2i_empty_cell_acc"] == pytest.approx(m["t2i_cell_acc"]) and base["t2i_empty_shape_acc"] == 0.0


# ----------------------------------------------------------------------------------------------
# the report card


def test_the_report_card_copies_metrics_json_and_names_what_differs_from_the_preset(job):
    """report.md, written at the end of the main job: every held-out number of its table is the one in
    metrics.json (this checkpoint and the SFT block, per bucket and overall, three decimals), the
    baselines beside them; the settings that differ from the toy preset are listed with both values;
    the RL stage's row counts the steps the log holds; the sample grid is linked."""
    text = (job.out / "report.md").read_text()
    m, sft = job.metrics, job.metrics["sft_checkpoint"]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("vqa accuracy", "grounding mIoU", "edit score"):
            rows[(cells[0], cells[1].split(" ")[0])] = cells[2:]
    names = {"vqa_acc": "vqa accuracy", "ground_miou": "grounding mIoU", "edit_score": "edit score"}
    checked = 0
    for key, name in names.items():
        for b in ("in", "edge", "far", "all"):
            k = key if b == "all" else f"{key}_{b}"
            if k not in m:
                assert (name, b) not in rows
                continue
            got_sft, got, base = rows[(name, b)]
            assert got == f"{m[k]:.3f}" and got_sft == f"{sft[k]:.3f}", (name, b)
            checked += 1
    assert checked >= 7                                  # all and in for each, edge where levels reach it
    assert rows[("vqa accuracy", "all")][2].startswith(f"{m['vqa_prior_acc']:.3f}")
    assert rows[("edit score", "all")][2].startswith(f"{m['edit_copy_score']:.3f}")
    assert "`model.n_layer: 4 -> 1`" in text and "`model.d_model: 128 -> 32`" in text
    rl_log = json.load(open(job.out / "rl_log.json"))
    assert f"| RL ({len(rl_log)} steps) |" in text
    assert "![samples.png](samples.png)" in text


def test_the_report_card_keeps_the_sft_and_rl_columns_apart(tmp_path):
    """A hand-made run folder whose SFT and RL numbers all differ (at the tiny size above they can
    coincide): each lands in its own column and bucket; a run without RL has no SFT column values
    ('-') and no RL curve; a folder without metrics is a one-line report error."""
    import config as C
    import report
    cfg = C.to_dict(C.make_config("toy", {"rl.max_steps": 7}))
    cfg["argv"] = ["train.py", "--preset=toy", "--rl.max_steps=7"]
    m = {"vqa_acc": 0.5, "vqa_acc_in": 0.6, "vqa_acc_edge": 0.3, "vqa_acc_n": {"in": 10, "edge": 5},
         "ground_miou": 0.7, "ground_miou_in": 0.8, "ground_miou_edge": 0.45, "vqa_prior_acc": 0.27,
         "ground_random_miou": 0.2, "total_seconds": 99.0,
         "sft_checkpoint": {"vqa_acc": 0.41, "vqa_acc_in": 0.62, "vqa_acc_edge": 0.11, "ground_miou": 0.69,
                            "ground_miou_in": 0.81, "ground_miou_edge": 0.33}}
    for name, obj in (("config.json", cfg), ("metrics.json", m),
                      ("rl_log.json", [{"step": s, "seconds": 2.0 * s, "vqa": {"reward": 0.1 * s}} for s in (1, 2)])):
        (tmp_path / name).write_text(json.dumps(obj))
    text = report.build(str(tmp_path))
    assert "| vqa accuracy | in (10) | 0.620 | 0.600 | |" in text
    assert "| vqa accuracy | edge (5) | 0.110 | 0.300 | |" in text
    assert "| vqa accuracy | all | 0.410 | 0.500 | 0.270 (image-blind prior) |" in text
    assert "| grounding mIoU | edge (?) | 0.330 | 0.450 | |" in text
    assert "`rl.max_steps: 64 -> 7`" in text and "    python train.py --preset=toy --rl.max_steps=7" in text
    assert "| RL (2 steps) | 4 |" in text and "| 2 | 0.200 |" in text
    assert "| the rest (data, loading, the SFT checkpoint's evaluation) | 95 |" in text     # 99 s - 4 s of RL
    # a longer RL log: its reward table holds window means (20 steps -> 8 windows of 2-3 steps)
    (tmp_path / "rl_log.json").write_text(json.dumps(
        [{"step": s, "seconds": 2.0 * s, "vqa": {"reward": 0.05 * s}, "ground": {"reward": 1.0}} for s in range(1, 21)]))
    windows = report.reward_windows(json.loads((tmp_path / "rl_log.json").read_text()))
    assert [b - a + 1 for a, b, _ in windows] in ([2, 3, 3, 2, 2, 3, 3, 2], [3, 2, 3, 2, 3, 2, 3, 2])
    assert [s for a, b, _ in windows for s in range(a, b + 1)] == list(range(1, 21))      # each step once
    for a, b, means in windows:                 # the mean of 0.05 s over s = a..b is 0.05 (a + b) / 2
        assert means["vqa"] == pytest.approx(0.05 * (a + b) / 2) and means["ground"] == 1.0
    text = report.build(str(tmp_path))
    a, b, means = windows[0]
    assert f"| {a}-{b} | {means['vqa']:.3f} | 1.000 |" in text and "| 19-20 | 0.975 | 1.000 |" in text
    del m["sft_checkpoint"]
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "rl_log.json").unlink()
    text = report.build(str(tmp_path))
    assert "| vqa accuracy | all | - | 0.500 |" in text and "RL training reward" not in text
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="^report error: .*needs metrics.json and config.json"):
        report.main([f"--out_dir={tmp_path}"])
