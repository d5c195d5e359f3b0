"""
Tests of rollout.py (advantages of Eq. A, answer-forcing, tree search, rollout_task end to end) and
of the sign and value of rl.unified_loss. Expected values are computed by hand (population std,
first argmax), re-derived from what the functions return (all-failed groups recounted from the
rewards), or measured against the sampler's own recorded states (diffusion.sample's on_step hook).
The world is tiny: world.build_pools with a few examples, a fake VQ whose codes ARE the cells
(code k in cell i draws shape k of a fixed list, or nothing), and 1-layer random Transformers.

    python -m pytest tests/test_rollout.py -q
"""
import math
import os
from contextlib import nullcontext
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data  # noqa: E402
import diffusion as DF  # noqa: E402
import likelihood as LK  # noqa: E402
import rewards as RW  # noqa: E402
import rl  # noqa: E402
import rollout as RO  # noqa: E402
import study  # noqa: E402   (studies/study.py: the tree study's diagnostics)
import tokens as TK  # noqa: E402
import train  # noqa: E402   (the RL stage: run_rl and the log's statistics)
import world as W  # noqa: E402
from bench import n_steps  # noqa: E402   (studies/bench.py: the plan's length)
from config import ModelConfig, make_config  # noqa: E402
from model import Transformer  # noqa: E402

# tiny tensors on a shared 2-core box: extra intra-op threads only add contention

EPS = 1e-4      # the GRPO std epsilon of rollout.py's docstring


# ----------------------------------------------------------------------------------------------
# 1. advantages on hand-made groups

def ones(*shape):
    return torch.ones(*shape, dtype=torch.bool)


def test_all_equal_rewards_give_zero_grpo_part():
    # gamma = 0: only the GRPO part. Values that are not exact binary fractions, and groups of
    # 3, 7, 8 (the default N): the mean must not leave a rounding residue that /std blows up
    for n in (3, 7, 8):
        for v in (0.0, 0.3, 5 / 6, 1 / 3, 0.7, 1.0):
            r = torch.full((2, n), v)
            a = rl.advantages(r, ones(2, n), gamma=0.0)
            assert torch.count_nonzero(a) == 0, (n, v, a)
            a = rl.advantages(r, ones(2, n), gamma=0.0, use_std=False)
            assert torch.count_nonzero(a) == 0, (n, v, a)
    # all zeros: no distillation target either, so the whole row is 0 for every gamma
    for gamma in (0.0, 0.5, 1.0):
        assert torch.count_nonzero(rl.advantages(torch.zeros(3, 4), ones(3, 4), gamma)) == 0
    # all equal and positive, gamma = 0.5: GRPO part 0, distillation 1 on the FIRST member only
    a = rl.advantages(torch.full((1, 7), 0.3), ones(1, 7), gamma=0.5)
    assert a.tolist() == [[0.5] + [0.0] * 6]


def test_distillation_weight_lands_on_first_argmax():
    r = torch.tensor([[0.2, 0.9, 0.1, 0.9],      # tie: first argmax is index 1
                      [0.7, 0.1, 0.7, 0.7],      # three-way tie: index 0
                      [0.0, 0.0, 0.0, 0.4],      # last
                      [0.0, 0.0, 0.0, 0.0]])     # best reward 0: no target at all
    a = rl.advantages(r, ones(4, 4), gamma=1.0)
    want = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert a.tolist() == want


def test_grpo_part_by_hand_population_std():
    r = [[1.0, 0.0, 0.0, 1.0, 1.0], [0.2, 0.5, 0.9, 0.4, 0.0]]
    a = rl.advantages(torch.tensor(r), ones(2, 5), gamma=0.0)
    for g, row in enumerate(r):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / len(row))      # population std (/n)
        for i, x in enumerate(row):
            assert math.isclose(a[g, i].item(), (x - mean) / (std + EPS), rel_tol=1e-5, abs_tol=1e-6)
    # first row by hand: mean 0.6, std sqrt(0.24)
    assert math.isclose(a[0, 0].item(), 0.4 / (math.sqrt(0.24) + EPS), rel_tol=1e-5)
    # Dr.-GRPO form: r - mean, no division
    b = rl.advantages(torch.tensor(r), ones(2, 5), gamma=0.0, use_std=False)
    assert torch.allclose(b[0], torch.tensor([0.4, -0.6, -0.6, 0.4, 0.4]), atol=1e-6)
    assert torch.allclose(b[1], torch.tensor([0.2, 0.5, 0.9, 0.4, 0.0]) - 0.4, atol=1e-6)


def test_mixed_gamma_by_hand():
    row = [0.2, 0.8, 0.5]
    mean = 0.5
    std = math.sqrt((0.09 + 0.09 + 0.0) / 3)
    a = rl.advantages(torch.tensor([row]), ones(1, 3), gamma=0.5)[0]
    want = [0.5 * (x - mean) / (std + EPS) + (0.5 if i == 1 else 0.0) for i, x in enumerate(row)]
    assert torch.allclose(a, torch.tensor(want), atol=1e-5)


def test_non_member_slot_is_zero_and_excluded_from_mean_and_std():
    # group 0: members [0, 1, 1] + a non-member slot holding a reward of 1 (an unused forced sample)
    r = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    member = torch.tensor([[True, True, True, False], [True, True, True, False]])
    for gamma in (0.0, 0.5, 1.0):
        a = rl.advantages(r, member, gamma)
        assert a[0, 3] == 0 and a[1, 3] == 0
        # group 1 is all-failed among its members: the non-member's 1 must not leak in
        assert torch.count_nonzero(a[1]) == 0
        mean, std = 2 / 3, math.sqrt(2 / 9)          # over the three members only
        grpo = [(x - mean) / (std + EPS) for x in (0.0, 1.0, 1.0)]
        dist = [0.0, 1.0, 0.0]                         # first argmax among members
        want = [gamma * d + (1 - gamma) * g for d, g in zip(dist, grpo)] + [0.0]
        assert torch.allclose(a[0], torch.tensor(want), atol=1e-5), (gamma, a[0], want)
    # a non-member holding the largest reward never takes the distillation weight
    a = rl.advantages(torch.tensor([[0.1, 0.3, 0.9]]), torch.tensor([[True, True, False]]), gamma=1.0)
    assert a.tolist() == [[0.0, 1.0, 0.0]]


def test_forced_member_turns_an_all_failed_group_nonzero():
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0]])                 # 3 failures + the forced sample
    without = rl.advantages(r, torch.tensor([[True, True, True, False]]), 0.5)
    assert torch.count_nonzero(without) == 0
    a = rl.advantages(r, ones(1, 4), 0.5)[0]
    std = math.sqrt(3) / 4                                     # rewards 0,0,0,1: mean 1/4
    assert math.isclose(a[3].item(), 0.5 + 0.5 * 0.75 / (std + EPS), rel_tol=1e-5)
    for i in range(3):
        assert math.isclose(a[i].item(), 0.5 * -0.25 / (std + EPS), rel_tol=1e-5)
    assert a[3] > 0 and (a[:3] < 0).all()


# ----------------------------------------------------------------------------------------------
# the tiny world: pools -> tokenizer -> fake VQ codes -> task sets

CELL_SHAPES = [W.Shape(k, c, z) for k in W.KINDS for c in W.COLOURS for z in W.SIZES]   # 24 shapes


class FakeVQ:
    """One code per grid cell: code k draws CELL_SHAPES[k % 25] (k % 25 == 24: empty cell)."""

    def __init__(self, grid: int, image_size: int):
        self.grid, self.size = grid, image_size

    def encode_scene(self, scene) -> list[int]:
        return [24 if s is None else CELL_SHAPES.index(s) for s in scene]

    def scene_of(self, codes) -> tuple:
        return tuple(None if int(k) % 25 == 24 else CELL_SHAPES[int(k) % 25] for k in codes)

    def decode(self, codes: torch.Tensor):
        """(N, n_img) codes -> (N, H, W, 3) float pictures in [0, 1]."""
        pics = [torch.from_numpy(W.render(self.scene_of(c), self.grid, self.size).copy()).float() / 255 for c in codes]
        return torch.stack(pics)


@pytest.fixture(scope="module")
def world():
    # levels 1-2 only: the fake answering model below writes answers 0-3 / yes / no, which level-3
    # sums would outgrow (these tests check the loss, not the levels)
    cfg = make_config("toy", {"data.n_sft": 6, "data.n_rl": 12, "data.n_eval": 2,
                              "data.rl_levels": "1,2", "data.eval_levels": "1,2"})
    pools = W.build_pools(cfg.data, W.DEFAULT_WORLD)
    tok = TK.Tokenizer.fit(TK.all_texts(pools), cfg.vq.codebook_size, max_number=cfg.data.image_size)
    n_img = (cfg.data.image_size // cfg.vq.downsample) ** 2
    assert n_img == cfg.data.grid ** 2            # the fake VQ needs one code per cell
    lay, P = TK.layouts_for(pools, tok, n_img), TK.prompt_width(pools, tok, n_img)
    vq = FakeVQ(cfg.data.grid, cfg.data.image_size)
    sets = {}
    for task, splits in pools.items():
        sets[task] = {}
        for split, exs in splits.items():
            codes = torch.tensor([vq.encode_scene(e.scene) for e in exs]) if task != "t2i" else None
            tcodes = torch.tensor([vq.encode_scene(e.answer) for e in exs]) if task in ("edit", "t2i") else None
            sets[task][split] = TK.tokenize_split(task, exs, tok, lay[task], P, codes, tcodes)
    assert tok.n_unknown == 0
    # the fake VQ really is the world's picture: decode(encode(scene)) re-reads as the scene
    ex = pools["edit"]["rl"][0]
    pic = vq.decode(torch.tensor([vq.encode_scene(ex.answer)]))[0].numpy()
    assert W.read_scene(pic, cfg.data.grid) == ex.answer
    return SimpleNamespace(cfg=cfg, tok=tok, lay=lay, P=P, vq=vq, bundle=SimpleNamespace(tok=tok, sets=sets),
                           judge=data.picture_judge(cfg, vq))


def tiny_model(vocab: int, seed: int = 0, scale: float = 0.0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, max_len=128), vocab).eval()
    if scale:       # larger weights than the 0.02 init: confidences far apart
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1:
                    p.normal_(0, scale)
    return m


class Biased(nn.Module):
    """A tiny random Transformer plus a fixed logit bias (T, V). No `cfg` attribute, so the sampler
    runs the plain forward (no prefix cache)."""

    def __init__(self, net: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.net, self.bias, self.cfg = net, bias, None

    def forward(self, idx, valid=None, is_prompt=None):
        return self.net(idx, valid, is_prompt) + self.bias[:idx.shape[1]]


def vqa_answering_model(w, seed: int = 0) -> Biased:
    """Writes '<answer> z </answer>' in the last three text slots with z one of 0 1 2 3 yes no, and
    never an answer tag anywhere else: every on-policy sample parses, about 1 in 6 is right, and an
    answer-forced sample is always right."""
    tok, P, lay = w.tok, w.P, w.lay["vqa"]
    T = P + lay.R
    bias = torch.zeros(T, tok.vocab_size)
    bias[P:P + lay.R_text, [tok.ANS, tok.EANS]] = -30.0
    end = P + lay.R_text
    bias[end - 3, tok.ANS] = 30.0
    bias[end - 1, tok.EANS] = 30.0
    bias[end - 2, [tok.stoi[x] for x in ("0", "1", "2", "3", "yes", "no")]] = 12.0
    return Biased(tiny_model(tok.vocab_size, seed), bias).eval()


def rollout_context(model, bundle, cfg, device, autocast, vq, gen) -> RO.RolloutContext:
    """The rollout context of `model` on the tiny world's sets, its pictures judged through `vq`."""
    return RO.RolloutContext(model, bundle.tok, bundle.sets, data.picture_judge(cfg, vq), cfg, device, autocast, gen)


def rollout_task(model, bundle, task, idx, cfg, device, autocast, vq, gen, split="rl"):
    """One task's part of an RL step as the update sees it: rollout.sample_groups, the advantages
    (rl.group_advantages) and the rows rl.triplets keeps (no SFT rows), with train.group_stats and
    N of Eq. U ("members")."""
    import copy
    ro = rollout_context(model, bundle, cfg, device, autocast, vq, gen)
    g = RO.sample_groups(ro, task, idx, split)
    a = rl.group_advantages(g, cfg.rl)
    c = copy.deepcopy(cfg)
    c.rl.sft_rows = 0
    trip = rl.triplets([g], [a], replace(ro, cfg=c), None)
    stats = {**train.group_stats(g, a, cfg.rl.tau, bundle.tok), "members": trip.n}
    return SimpleNamespace(task=task, rewards=g.rewards, batch=trip.batch, adv=trip.adv, stats=stats, groups=g)


def one_process_ctx(log):
    """A stand-in for common.Ctx on one CPU process: fp32, rank 0 of 1, so summing over the ranks is
    the identity and there are no other ranks' gradients to average."""
    return SimpleNamespace(device="cpu", autocast=nullcontext(), rank=0, world=1, master=True, ddp=False, log=log,
                           all_sum=lambda x: x, from_rank0=lambda x: x, average_gradients=lambda model: None)


def rl_cfg(w, **rl):
    """The world's config with rl fields set directly (the toy diffusion settings)."""
    cfg = make_config("toy", {"data.n_sft": 6, "data.n_rl": 12, "data.n_eval": 2})
    for k, v in rl.items():
        assert hasattr(cfg.rl, k), k
        setattr(cfg.rl, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------
# 2. answer-forcing

@pytest.mark.parametrize("task", ["vqa", "ground"])
def test_force_answer_canvas_and_sampler_keep_the_answer(world, task):
    w = world
    ts = w.bundle.sets[task]["rl"]
    lay, P, tok = ts.layout, w.P, w.tok
    idx = [0, 1, 2]
    exs = [ts.examples[i] for i in idx]
    base = TK.collate({task: ts}, [(task, i) for i in idx], tok, responses=False)
    before = base.tokens.clone()
    canvas, forbid = RO.force_answer(base, exs, tok, lay)
    assert torch.equal(base.tokens, before), "force_answer modified its input"
    # the banned ids are exactly the two answer tags, on every row
    assert forbid.shape == (len(idx), tok.vocab_size)
    assert [set(r.nonzero().flatten().tolist()) for r in forbid] == [{tok.ANS, tok.EANS}] * len(idx)
    end = P + lay.R_text
    for b, ex in enumerate(exs):
        ans = TK.answer_ids(ex, tok)
        # the block by hand: <answer> z </answer>, z = the truth (vqa) / the box's 4 numbers (ground)
        z = ex.answer if task == "vqa" else " ".join(str(v) for v in ex.answer)
        assert ans == [tok.ANS] + [tok.stoi[x] for x in z.split()] + [tok.EANS]
        assert canvas.tokens[b, end - len(ans):end].tolist() == ans
        assert (canvas.tokens[b, P:end - len(ans)] == tok.MASK).all()            # reasoning: all [M]
        assert torch.equal(canvas.tokens[b, :P], before[b, :P])                   # prompt untouched
        assert torch.equal(canvas.tokens[b, end:], before[b, end:])
    # inpaint with a random tiny model at temperature 1, pushed to write answer tags everywhere:
    # the ban must hold in every masked slot, so the forced row still has exactly one answer block
    net = tiny_model(tok.vocab_size, seed=1, scale=0.3)
    bias = torch.zeros(canvas.tokens.shape[1], tok.vocab_size)
    bias[:, [tok.ANS, tok.EANS]] = 30.0
    model = Biased(net, bias)
    final, order = DF.sample(model, canvas, tok, w.cfg.diffusion, temperature=1.0,
                             generator=torch.Generator().manual_seed(0), forbid=forbid)
    for b in range(len(idx)):
        text = final[b, P:end].tolist()
        assert text.count(tok.ANS) == 1 and text.count(tok.EANS) == 1, "a second answer tag was written"
    # without the ban the same model does write them: the check above has power
    loose, _ = DF.sample(model, canvas, tok, w.cfg.diffusion, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert (loose[:, P:end] == tok.ANS).sum() > len(idx)
    for b, ex in enumerate(exs):
        ans = TK.answer_ids(ex, tok)
        assert final[b, end - len(ans):end].tolist() == ans, "the sampler changed the forced answer"
        assert (order[b, lay.R_text - len(ans):lay.R_text] == -1).all()
        assert (order[b, :lay.R_text - len(ans)] >= 0).all()                   # the rest was sampled
    resp = final[:, P:P + lay.R]
    assert not ((resp == tok.MASK) | (resp == tok.IMASK)).any()
    # the inpainted rows as rewards see them: with the GT answer block, an all-failed group of 3
    # plus this forced member gets a positive advantage for it and negative ones for the failures
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    a = rl.advantages(r, ones(1, 4), 0.5)
    assert a[0, 3] > 0 and (a[0, :3] < 0).all()


# ----------------------------------------------------------------------------------------------
# 3. rollout_task end to end

STATS_KEYS = {"reward", "nonzero_adv_frac", "grpo_nonzero_frac", "all_failed_frac", "af_fired", "members", "rollout_s",
              "parse_fail", "unparsable_frac", "forced_rows"}


def check_rows(rc, w, task, idx, n_cols, member, gamma):
    """The returned rows are exactly the nonzero-advantage members, prompt-major, with the
    advantages recomputed from the returned rewards."""
    G = len(idx)
    a = rl.advantages(rc.rewards, member, gamma, True).reshape(-1)
    keep = a != 0
    assert torch.allclose(rc.adv, a[keep], atol=1e-6)
    assert (rc.adv != 0).all(), "a zero-advantage row was kept"
    assert rc.batch.tokens.shape[0] == int(keep.sum()) == len(rc.batch.tasks)
    assert set(rc.batch.tasks) <= {task}
    # every kept row carries its own prompt: row j of the flat order belongs to prompt j // n_cols
    ts = w.bundle.sets[task]["rl"]
    owners = torch.arange(G * n_cols)[keep] // n_cols
    for row, g in enumerate(owners.tolist()):
        assert torch.equal(rc.batch.tokens[row, :w.P], ts.prompt[idx[g]])
    return keep


@pytest.mark.parametrize("tau", [0.5, 0.0])
def test_rollout_task_vqa_answer_forcing(world, tau):
    w = world
    N, idx = 3, [0, 1, 2, 3, 4, 5, 6, 7]
    G = len(idx)
    cfg = rl_cfg(w, group_size=N, af_prob=1.0, af_mode="failed_groups", tau=tau, gamma=0.5, adv_std=True,
                 temperature=1.0)
    model = vqa_answering_model(w, seed=3)
    roll = rollout_task(model, w.bundle, "vqa", idx, cfg, "cpu", nullcontext(), w.vq,
                           torch.Generator().manual_seed(5))
    assert roll.task == "vqa"
    assert STATS_KEYS <= set(roll.stats)
    assert roll.rewards.shape == (G, N + 1)
    on, forced = roll.rewards[:, :N], roll.rewards[:, N]
    assert set(on.flatten().tolist()) <= {0.0, 1.0}
    # recount the all-failed groups from the returned rewards: af_prob = 1 fires on each of them
    all_failed = (on < tau).all(1)
    assert torch.equal(roll.groups.forced, all_failed)
    assert (forced[all_failed] == 1.0).all(), "the answer-forced sample must score 1 (GT answer, one block)"
    assert (forced[~all_failed] == 0.0).all(), "an unjoined forced slot is a placeholder"
    assert ("forced_reward" in roll.stats) == bool(all_failed.any())
    assert roll.stats.get("forced_unparsable", 0) == 0
    assert roll.stats["af_fired"] == int(all_failed.sum())
    assert roll.stats["members"] == G * N + int(all_failed.sum())
    assert math.isclose(roll.stats["reward"], on.mean().item(), rel_tol=1e-6)
    assert math.isclose(roll.stats["all_failed_frac"], all_failed.float().mean().item())
    assert isinstance(roll.stats["parse_fail"], dict) and set(roll.stats["parse_fail"]) <= {
        "no_answer_tag", "unclosed", "multiple_answers", "empty", "garbage"}
    assert roll.stats["rollout_s"] >= 0
    member = torch.cat([ones(G, N), all_failed[:, None]], 1)
    keep = check_rows(roll, w, "vqa", idx, N + 1, member, 0.5)
    adv = rl.advantages(roll.rewards, member, 0.5)
    assert math.isclose(roll.stats["nonzero_adv_frac"], (adv.abs().sum(1) > 0).float().mean().item())
    # GRPO signal: a group counts when its members' rewards are not all equal (plain Python recount)
    differ = [len({x for x, m in zip(roll.rewards[g].tolist(), member[g].tolist()) if m}) > 1 for g in range(G)]
    assert math.isclose(roll.stats["grpo_nonzero_frac"], sum(differ) / G)
    if tau > 0:
        # the seeds give both kinds of group, so both branches are exercised
        assert 0 < int(all_failed.sum()) < G
        # every group now carries a gradient: failed ones through the forced member
        assert roll.stats["nonzero_adv_frac"] == 1.0
        # the forced rows are in the batch, positive, and end in the ground truth's answer block
        keep = keep.view(G, N + 1)
        ts = w.bundle.sets["vqa"]["rl"]
        end = w.P + w.lay["vqa"].R_text
        for g in all_failed.nonzero().flatten().tolist():
            assert keep[g, N]
            row = int(keep.reshape(-1)[:g * (N + 1) + N].sum())          # its index among kept rows
            assert roll.adv[row] > 0
            ans = TK.answer_ids(ts.examples[idx[g]], w.tok)
            assert roll.batch.tokens[row, end - len(ans):end].tolist() == ans
            assert (adv[g, :N] < 0).all()
    else:
        # tau = 0: no group counts as failed, the forced slot never joins
        assert roll.stats["af_fired"] == 0 and not all_failed.any()
        assert roll.stats["members"] == G * N


def test_rollout_task_edit_tree_search(world):
    w = world
    N, idx = 3, [0, 1, 2, 3]
    G = len(idx)
    cfg = rl_cfg(w, group_size=N, tree_schedule="0,2", tree_tasks="edit", gamma=0.5, adv_std=True,
                 temperature=1.0, af_prob=1.0)
    model = tiny_model(w.tok.vocab_size, seed=4, scale=0.3)
    roll = rollout_task(model, w.bundle, "edit", idx, cfg, "cpu", nullcontext(), w.vq,
                           torch.Generator().manual_seed(6))
    assert STATS_KEYS <= set(roll.stats) and "forced_reward" not in roll.stats     # no GT: no forcing
    assert roll.rewards.shape == (G, 2 * N)                                        # rounds at [0, 2]
    assert roll.stats["af_fired"] == 0 and roll.stats["members"] == 2 * G * N
    rounds = study.round_stats(roll.groups)           # the tree study's per-round figures, recounted
    assert len(rounds["round_mean"]) == 2
    assert math.isclose(rounds["round_mean"][0], roll.rewards[:, :N].mean().item(), rel_tol=1e-6)
    for k in range(2):
        assert math.isclose(rounds["round_max"][k], roll.rewards[:, k * N:(k + 1) * N].amax(1).mean().item(),
                            rel_tol=1e-6)
    assert math.isclose(rounds["best_so_far"][1], roll.rewards.amax(1).mean().item(), rel_tol=1e-6)
    assert len(rounds["round_hamming"]) == 2 and all(0 <= h <= 1 for h in rounds["round_hamming"])
    assert ((roll.rewards >= 0) & (roll.rewards <= 1)).all()
    assert len(set(roll.rewards.flatten().tolist())) > 2, "edit rewards should be real-valued"
    keep = check_rows(roll, w, "edit", idx, 2 * N, ones(G, 2 * N), 0.5).view(G, 2 * N)
    # the scores are the exact edit scores of the decoded pictures of the kept rows
    ts = w.bundle.sets["edit"]["rl"]
    lay, P = w.lay["edit"], w.P
    flat_r = roll.rewards.reshape(-1)[keep.reshape(-1)]
    owners = (torch.arange(G * 2 * N).view(G, 2 * N)[keep] // (2 * N)).tolist()
    for row, g in enumerate(owners):
        codes = roll.batch.tokens[row, P + lay.R_text:P + lay.R] - w.tok.img_offset
        ex = ts.examples[idx[g]]
        assert math.isclose(flat_r[row].item(), RW_edit(ex, w.vq.scene_of(codes), w.judge), rel_tol=1e-6)
    # round 1 branches from round 0's best sample at image step 2: every text token (all revealed
    # before the first image step) is the parent's, and at least the 1 + 1 image tokens revealed in
    # image steps 0 and 1 (cosine schedule, 16 slots: floor(16 cos(pi/16)) = 15, floor(16 cos(pi/8)) = 14)
    # are shared by the parent and all its children
    pos = torch.arange(G * 2 * N).view(G, 2 * N)
    kept_index = torch.full((G * 2 * N,), -1)
    kept_index[keep.reshape(-1)] = torch.arange(int(keep.sum()))
    checked = 0
    for g in range(G):
        parent = int(roll.rewards[g, :N].argmax())
        rows = [int(kept_index[pos[g, j]]) for j in [parent] + list(range(N, 2 * N))]
        if min(rows) < 0:           # a zero-advantage row is not returned
            continue
        x = roll.batch.tokens[rows]
        text, img = x[:, P:P + lay.R_text], x[:, P + lay.R_text:P + lay.R]
        assert (text == text[0]).all(), f"group {g}: a child's plan differs from its parent's"
        assert int((img == img[0]).all(0).sum()) >= 2
        checked += 1
    assert checked >= 2


def test_rollout_tokens_per_step_sets_the_text_plan_and_the_branch_step(world, monkeypatch):
    """rl.tokens_per_step=4: every rollout call samples with 4 text tokens per step, and tree search
    branches at (text steps under THAT plan) + s, counted here from the layout by hand."""
    w = world
    cfg = rl_cfg(w, group_size=2, tree_schedule="0,2", tree_tasks="edit", tokens_per_step=4)
    assert cfg.diffusion.tokens_per_step != 4
    calls = []
    real = RO.sample

    def spy(model, batch, tok, dcfg, **kw):
        calls.append((dcfg.tokens_per_step, kw.get("start_step", 0)))
        return real(model, batch, tok, dcfg, **kw)

    monkeypatch.setattr(RO, "sample", spy)
    rollout_task(tiny_model(w.tok.vocab_size, seed=1, scale=0.3), w.bundle, "edit", [0, 1], cfg, "cpu",
                    nullcontext(), w.vq, torch.Generator().manual_seed(0))
    R_text, B = w.lay["edit"].R_text, cfg.diffusion.block_len
    text_steps = sum(math.ceil((min(lo + B, R_text) - lo) / 4) for lo in range(0, R_text, B))
    assert calls == [(4, 0), (4, text_steps + 2)]
    assert cfg.diffusion.tokens_per_step == make_config("toy").diffusion.tokens_per_step   # not mutated


def RW_edit(ex, pred_scene, judge):
    return RW.edit_reward(ex, pred_scene, judge)


# ----------------------------------------------------------------------------------------------
# 4. the tree-search state from (final tokens, order)

def test_rebuilt_tree_state_equals_sampler_state_and_branches_keep_the_prefix(world):
    w = world
    ts = w.bundle.sets["edit"]["rl"]
    tok, P, lay, dcfg = w.tok, w.P, ts.layout, w.cfg.diffusion
    base = TK.collate({"edit": ts}, [("edit", 0), ("edit", 1)], tok, responses=False)
    assert lay.R_text > 0 and lay.n_img > 0
    model = tiny_model(tok.vocab_size, seed=2, scale=0.3)
    states = {}
    final, order = DF.sample(model, base, tok, dcfg, temperature=1.0, image_temperature=1.0,
                             generator=torch.Generator().manual_seed(0),
                             on_step=lambda g, x: states.__setitem__(g, x.clone()))
    s = DF.image_step_offset(base, dcfg) + 2
    # independent: the text plan of LLaDA blocks, ceil(len / tokens_per_step) steps per block
    n_text_steps = sum(math.ceil((min(lo + dcfg.block_len, lay.R_text) - lo) / dcfg.tokens_per_step)
                       for lo in range(0, lay.R_text, dcfg.block_len))
    assert s == n_text_steps + 2
    state, st_order = DF.rebuild_state(final, order, s, base, tok)
    assert torch.equal(state, states[s]), "rebuilt state differs from the sampler's state at step s"
    # by hand: a slot is shown iff the sampler revealed it before step s
    shown = ~((states[s][:, P:] == tok.MASK) | (states[s][:, P:] == tok.IMASK))
    assert torch.equal(shown, (order >= 0) & (order < s))
    assert bool(shown[:, lay.R_text:].any()) and bool((~shown[:, lay.R_text:]).any())
    # N continuations per row from the rebuilt state
    N = 4
    branch = base.with_tokens(state).repeat(N)
    cont, cont_order = DF.sample(model, branch, tok, dcfg, temperature=1.0, image_temperature=1.0,
                                 generator=torch.Generator().manual_seed(1),
                                 order=st_order.repeat_interleave(N, 0), start_step=s)
    parent = final.repeat_interleave(N, 0)
    porder = order.repeat_interleave(N, 0)
    early = torch.zeros_like(cont, dtype=torch.bool)
    early[:, P:] = (porder >= 0) & (porder < s)
    early[:, :P] = True                                               # the prompt too
    assert torch.equal(cont[early], parent[early]), "a continuation changed a token revealed before s"
    assert torch.equal(cont_order[early[:, P:]], porder[early[:, P:]])
    assert (cont_order[~early[:, P:]] >= s).all()
    assert not ((cont[:, P:] == tok.MASK) | (cont[:, P:] == tok.IMASK)).any()
    # the same number of reveals per remaining step as the parent (same schedule, same masked count)
    for g in range(s, n_steps(base, dcfg)):
        assert torch.equal((cont_order == g).sum(1), (porder == g).sum(1))
    # they really are new samples: the children of a row are not all identical
    late = cont[:, P + lay.R_text:].view(2, N, -1)
    assert any(not (late[b] == late[b, 0]).all() for b in range(2))


def test_branch_step_picks_the_highest_entropy_slot():
    """Hand-built: row 0's most uncertain revealed slot is 1 (step 5) over all slots, 4 (step 8)
    among the image slots 3-5; the given slot 2 (order -1) never counts, however high its entropy.
    Row 1 revealed no text slot (all given): its text branch falls back to step 0."""
    order = torch.tensor([[3, 5, -1, 7, 8, 9],
                          [-1, -1, -1, 2, 4, 6]])
    ent = torch.tensor([[0.1, 2.0, 9.0, 0.5, 1.0, 0.2],
                        [5.0, 5.0, 5.0, 0.3, 0.1, 0.7]])
    img = torch.tensor([False, False, False, True, True, True])
    assert RO.branch_step(order, ent, torch.ones(6, dtype=torch.bool)).tolist() == [5, 6]
    assert RO.branch_step(order, ent, img).tolist() == [8, 6]
    assert RO.branch_step(order, ent, ~img).tolist() == [5, 0]
    assert RO.branch_step(order, ent, ~img, fallback=4).tolist() == [5, 4]     # the span's own first step


def test_sampler_records_each_revealed_slots_entropy(world):
    """diffusion.sample(on_reveal=rollout.EntropyRecorder(...)) against the entropy recomputed from the
    model's logits at the recorded state before each step (on_step), over the ids the slot may take,
    at the temperature of its modality (text 0.7, image 1.3 here)."""
    w = world
    ts = w.bundle.sets["edit"]["rl"]
    tok, P, lay, dcfg = w.tok, w.P, ts.layout, w.cfg.diffusion
    base = TK.collate({"edit": ts}, [("edit", 0), ("edit", 1)], tok, responses=False)
    model = tiny_model(tok.vocab_size, seed=2, scale=0.3)
    states, ent = {}, torch.full((2, lay.R), -1.0)
    _, order = DF.sample(model, base, tok, dcfg, temperature=0.7, image_temperature=1.3,
                         generator=torch.Generator().manual_seed(0), on_reveal=RO.EntropyRecorder(ent),
                         on_step=lambda g, x: states.__setitem__(g, x.clone()), use_cache=False)
    text_ok, img_ok = DF.vocab_masks(tok, "cpu")
    checked = 0
    for g, x in states.items():
        with torch.no_grad():
            logits = model(x, base.valid, base.is_prompt)[:, P:].float()              # (2, R, V)
        for b in range(2):
            for k in (order[b] == g).nonzero().flatten().tolist():
                is_img = k >= lay.R_text
                T = 1.3 if is_img else 0.7
                lg = logits[b, k].masked_fill(~(img_ok if is_img else text_ok), float("-inf")) / T
                p = lg.softmax(-1)
                want = -(p[p > 0] * p[p > 0].log()).sum().item()
                assert math.isclose(ent[b, k].item(), want, rel_tol=1e-4, abs_tol=1e-5), (g, b, k)
                checked += 1
    assert checked == 2 * lay.R and (ent >= 0).all()                     # every slot, once


def test_rows_rebuilt_at_different_steps_continue_as_if_alone(world):
    """Greedy text and image (temperature 0, low-confidence reveals: deterministic), two rows rebuilt at
    different steps (rebuild_state with a (B,) step) and continued in one sampler call from the
    earlier step: each row ends exactly as when it is rebuilt and continued alone from its own step
    (an int). rebuild_state with a tensor equals the per-row loop with ints. Greedy entropy is 0."""
    w = world
    ts = w.bundle.sets["edit"]["rl"]
    tok, dcfg = w.tok, w.cfg.diffusion
    base = TK.collate({"edit": ts}, [("edit", 0), ("edit", 1)], tok, responses=False)
    model = tiny_model(tok.vocab_size, seed=5, scale=0.3)
    greedy = dict(temperature=0.0, image_temperature=0.0)
    ent = torch.full((2, ts.layout.R), 7.0)
    final, order = DF.sample(model, base, tok, dcfg, on_reveal=RO.EntropyRecorder(ent), **greedy)
    assert (ent == 0).all()                                       # greedy: nothing was drawn at random
    off = DF.image_step_offset(base, dcfg)
    steps = torch.tensor([3, off + 5])                            # a text step and an image step
    state, st_order = DF.rebuild_state(final, order, steps, base, tok)
    for b in range(2):
        s_b, o_b = DF.rebuild_state(final[b:b + 1], order[b:b + 1], int(steps[b]), base.rows(torch.tensor([b])), tok)
        assert torch.equal(state[b:b + 1], s_b) and torch.equal(st_order[b:b + 1], o_b)
    both, _ = DF.sample(model, base.with_tokens(state), tok, dcfg, order=st_order, start_step=int(steps.min()), **greedy)
    for b in range(2):
        one = base.rows(torch.tensor([b]))
        alone, _ = DF.sample(model, one.with_tokens(state[b:b + 1]), tok, dcfg, order=st_order[b:b + 1],
                             start_step=int(steps[b]), **greedy)
        assert torch.equal(both[b:b + 1], alone), b
        assert torch.equal(alone, final[b:b + 1])              # greedy: the continuation is the original


def test_uncertainty_branching_rebuilds_each_group_at_its_own_step(world, monkeypatch):
    """rl.tree_schedule = 0,H: each group's children keep every token their parent revealed before the
    step branch_step chose for that group (a step per group, so the sampler starts at the smallest and
    a group ahead of it waits), and redraw the rest."""
    w = world
    N, idx = 3, [0, 1, 2, 3]
    G = len(idx)
    seen = {}
    real = RO.branch_step

    def spy(order, entropy, span, fallback=0):
        seen["order"], seen["entropy"], seen["step"] = order.clone(), entropy.clone(), real(order, entropy, span, fallback)
        return seen["step"]

    monkeypatch.setattr(RO, "branch_step", spy)
    cfg = rl_cfg(w, group_size=N, tree_schedule="0,H", tree_tasks="edit", temperature=1.0)
    model = tiny_model(w.tok.vocab_size, seed=4, scale=0.3)
    ts = w.bundle.sets["edit"]["rl"]
    base = TK.collate({"edit": ts}, [("edit", i) for i in idx], w.tok, responses=False)
    ro = rollout_context(model, w.bundle, cfg, "cpu", nullcontext(), w.vq, torch.Generator().manual_seed(3))
    toks, r, _ = RO.sample_rounds(ro, base, [ts.examples[i] for i in idx], [0, "H"], ts.layout)
    assert toks.shape[:2] == (G, 2 * N) and r.shape == (G, 2 * N)
    step, porder, P = seen["step"], seen["order"], w.P
    assert (seen["entropy"][porder >= 0] > 0).all()          # temperature 1: every revealed slot has entropy
    assert len(set(step.tolist())) > 1, "the groups should branch at different steps here"
    for g in range(G):
        parent = toks[g, int(r[g, :N].argmax())]
        keep = (porder[g] >= 0) & (porder[g] < step[g])                 # revealed before the branch
        for j in range(N, 2 * N):
            assert torch.equal(toks[g, j, P:][keep], parent[P:][keep])
        # and what was revealed from the branch step on is redrawn, not copied: some child differs there
        redraw = porder[g] >= step[g]
        assert redraw.any() and any(not torch.equal(toks[g, j, P:][redraw], parent[P:][redraw]) for j in range(N, 2 * N)), g


# ----------------------------------------------------------------------------------------------
# 5. the unified loss: its value by hand, and the sign of its gradient

def per_token(terms: LK.Terms) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, R), scored (B, R) bool): each slot's weighted terms summed over the draws (so that
    values.sum(1) = terms.seq()), and which slots any draw scored."""
    return (terms.weight * terms.logp).sum(0), terms.scored.any(0)


def hand_complementary_logp(model, batch, tok, seed: int) -> torch.Tensor:
    """Eq. C written out: replay likelihood.complementary's draws (t1 per row, then the (B, T)
    uniforms), mask by hand, run the model on both copies, sum log p of the clean token over the
    response, each token from the copy in which it is masked."""
    g = torch.Generator().manual_seed(seed)
    B, T = batch.tokens.shape
    t1 = torch.rand(B, generator=g)
    m1 = (torch.rand(B, T, generator=g) < t1[:, None]) & batch.is_resp
    m2 = batch.is_resp & ~m1
    out = torch.zeros(B)
    for m in (m1, m2):
        fill = torch.where(batch.is_image, torch.full_like(batch.tokens, tok.IMASK),
                           torch.full_like(batch.tokens, tok.MASK))
        x = torch.where(m, fill, batch.tokens)
        logp = F.log_softmax(model(x, batch.valid, batch.is_prompt).float(), -1)
        lp = logp.gather(-1, batch.tokens[..., None]).squeeze(-1)          # (B, T)
        out = out + (lp * m).sum(1)
    assert not (m1 & m2).any() and torch.equal(m1 | m2, batch.is_resp)
    return out


def test_unified_loss_value_and_gradient_sign(world):
    w = world
    tok = w.tok
    sets = {"vqa": w.bundle.sets["vqa"]["sft"], "ground": w.bundle.sets["ground"]["sft"]}
    batch = TK.collate(sets, [("vqa", 0), ("ground", 1)], tok)          # 2 rows with real responses
    model = tiny_model(tok.vocab_size, seed=7, scale=0.1).train()
    rc = rl_cfg(w, likelihood="complementary", logp_norm="sum", shared_t=False).rl
    adv = torch.tensor([1.0, -1.0])
    seed = 11
    loss, terms, kl, clipped = rl.unified_loss(model, batch, adv, tok, rc, seed)
    assert kl is None and clipped is None
    with torch.no_grad():
        seq = hand_complementary_logp(model, batch, tok, seed)
    want = -(1.0 * seq[0] - 1.0 * seq[1])                  # the numerator of -J: policy_update divides by N
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5), (loss.item(), want.item())
    assert torch.allclose(terms.seq().detach(), seq, rtol=1e-5)
    assert int(terms.scored.sum()) == int(batch.is_resp.sum())        # each response token scored once

    # one SGD step on that loss: log pi^ of the A = +1 row goes up, of the A = -1 row goes down,
    # both measured with one fixed mask draw (the same seed before and after)
    def measure():
        with torch.no_grad():
            lp, scored = per_token(LK.complementary(model, batch, tok, generator=torch.Generator().manual_seed(99)))
        return (lp * scored).sum(1)

    before = measure()
    assert torch.allclose(before, hand_complementary_logp(model, batch, tok, 99).detach(), rtol=1e-5)
    with torch.no_grad():
        J_before = (adv * hand_complementary_logp(model, batch, tok, seed)).sum()
    # small enough to stay first-order (row 0 moves by ~+0.4 nats, row 1 by ~-0.02)
    opt = torch.optim.SGD(model.parameters(), lr=3e-4)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = measure()
    assert after[0] > before[0] + 1e-3, (before, after)
    assert after[1] < before[1] - 1e-3, (before, after)
    # and the objective itself, on the loss's own masks, went up
    with torch.no_grad():
        J_after = (adv * hand_complementary_logp(model, batch, tok, seed)).sum()
    assert J_after > J_before


def test_run_rl_step_with_no_sft_rows_and_all_zero_advantages(world, tmp_path):
    """Regression: rl.sft_rows = 0 (the pure-RL ablation) and a step whose groups all failed left
    no rows at all, and run_rl crashed in cat_batches([]). Now J = 0: the step is logged, no update."""
    import json
    w = world
    cfg = rl_cfg(w, sft_rows=0, task_mix="vqa:1", af_prob=0.0, max_steps=1, eval_interval=0,
                 prompts_per_step=2, group_size=2)
    cfg.train.out_dir = str(tmp_path)
    logs = []
    ctx = one_process_ctx(log=logs.append)
    tok = w.tok
    bias = torch.zeros(w.P + w.lay["vqa"].R, tok.vocab_size)
    bias[:, [tok.ANS, tok.EANS]] = -30.0              # never an answer tag: every reward is 0
    model = Biased(tiny_model(tok.vocab_size, seed=8), bias)
    params = [p.detach().clone() for p in model.parameters()]
    train.run_rl(cfg, ctx, w.bundle, w.vq, model)
    hist = json.load(open(tmp_path / "rl_log.json"))
    assert len(hist) == 1 and hist[0]["step"] == 1
    assert hist[0]["vqa"]["reward"] == 0.0 and hist[0]["vqa"]["nonzero_adv_frac"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters())), "an empty step moved the weights"
    assert (tmp_path / "ckpt_rl.pt").exists()


def test_run_rl_stops_on_persistent_non_finite_loss(world, tmp_path, monkeypatch):
    """A loss that is NaN at every step must not loop forever: each step is skipped without moving
    the weights, and after 5 in a row run_rl exits with a one-line message naming the step and the
    loss term (the same guard as SFT's)."""
    w = world
    cfg = rl_cfg(w, sft_rows=2, task_mix="vqa:1", af_prob=0.0, max_steps=1000, eval_interval=0,
                 prompts_per_step=1, group_size=2, time_budget_s=0.0)
    cfg.train.out_dir = str(tmp_path)
    logs, calls = [], []
    ctx = one_process_ctx(log=logs.append)
    model = vqa_answering_model(w, seed=3)
    params = [p.detach().clone() for p in model.parameters()]
    real = rl.unified_loss

    def nan_loss(*a, **k):
        calls.append(1)
        loss, *rest = real(*a, **k)
        return (loss * float("nan"), *rest)
    monkeypatch.setattr(rl, "unified_loss", nan_loss)
    with pytest.raises(SystemExit, match=r"5 non-finite RL updates in a row at step 0 \(last: loss\)"):
        train.run_rl(cfg, ctx, w.bundle, w.vq, model)
    assert len(calls) == 5                       # one micro-batch per step (4 rows <= micro_batch), 5 steps
    assert sum("update skipped" in m for m in logs) == 5
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters())), "a NaN step moved the weights"


def test_pass_at_k_metrics_on_a_model_that_answers_at_random(world, monkeypatch):
    """The answering model writes one of six answers at random in the answer slot (about 1 in 6 is
    right): pass@k must rise with k, stay in [0, 1], and pass@1 must equal the mean reward of the
    same samples (recorded from the scorer: 6 prompts x 8 samples, rewards 0 / 1); the rate itself is
    checked loosely."""
    import metrics
    w = world
    rewards, score_rows = [], metrics.RW.score_rows

    def recording(*a, **k):
        out = score_rows(*a, **k)
        rewards.extend(out[0])
        return out
    monkeypatch.setattr(metrics.RW, "score_rows", recording)
    cfg = rl_cfg(w)
    cfg.eval.n_per_task, cfg.eval.batch_size = 6, 48
    model = vqa_answering_model(w, seed=1)
    bundle = SimpleNamespace(sets={"vqa": w.bundle.sets["vqa"]}, tok=w.tok)
    m = metrics.pass_at_k_metrics(model, bundle, w.vq, cfg, "cpu", nullcontext(), n_samples=8, ks=(1, 4, 8, 16),
                                  split="rl", n=6)
    assert set(m) == {"vqa_pass@1", "vqa_pass@4", "vqa_pass@8"}          # k = 16 > 8 samples: skipped
    assert 0 <= m["vqa_pass@1"] <= m["vqa_pass@4"] <= m["vqa_pass@8"] <= 1
    assert 0.02 < m["vqa_pass@1"] < 0.5 and m["vqa_pass@8"] > m["vqa_pass@1"]
    # every prompt has the same 8 samples, so the mean over prompts of c/8 is the mean reward
    assert len(rewards) == 6 * 8 and set(rewards) <= {0.0, 1.0}
    assert m["vqa_pass@1"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# rl.ppo_epochs > 1: the importance ratio on the same masks, clipped (d1's diffu-GRPO form)

def test_clipped_objective_by_hand():
    """Two rows of two tokens, eps = 0.2, each token's term min(rho A, clip(rho) A) by hand:
      row 0, A = +2: rho = e^0.5 = 1.649 -> min(3.297, 1.2 * 2) = 2.4 (clipped: no reward past 1 + eps)
                     rho = e^-0.1 = 0.905 -> min(1.810, 1.810) = 1.810 (inside the band)
      row 1, A = -1: rho = e^0.5 = 1.649 -> min(-1.649, -1.2) = -1.649 (never clipped when it hurts)
                     rho = e^-0.5 = 0.607 -> min(-0.607, -0.8) = -0.8, once that token is scored."""
    logp = torch.tensor([[[0.0, -1.1], [0.0, -0.5]]])                 # (D = 1, M = 2, R = 2)
    old = torch.tensor([[[-0.5, -1.0], [-0.5, 0.0]]])
    adv = torch.tensor([2.0, -1.0])
    scored = torch.tensor([[[True, True], [True, False]]])
    want = 1.2 * 2 + math.exp(-0.1) * 2 + (-math.exp(0.5))
    got, active = rl.clipped_objective(LK.Terms(logp, scored.float()), old, adv, 0.2)
    assert math.isclose(got.item(), want, rel_tol=1e-6), (got.item(), want)
    assert active.tolist() == [[[True, False], [False, False]]]       # only row 0's first token is clipped
    scored[0, 1, 1] = True
    got, active = rl.clipped_objective(LK.Terms(logp, scored.float()), old, adv, 0.2)
    assert math.isclose(got.item(), want - 0.8, rel_tol=1e-6), (got.item(), want - 0.8)
    assert active.tolist() == [[[True, False], [False, True]]]


def hand_terms(name: str, L: int, norm: str, moved: int, delta: float):
    """A hand-built estimate of one row with L response tokens under estimator `name`: the raw
    log-probs are all -1, and the new policy moves token `moved` by `delta` nats in every draw that
    scores it. The weights are the estimator's own: complementary and one_step 1 per token (one
    draw); elbo_mc L/k per masked token in each of 2 draws (k = 2 and k = L masked), mc_unweighted
    2/n = 1; a token masked in both draws has two terms. norm = mean divides every weight by L."""
    D = 1 if name in ("complementary", "one_step") else 2
    scored = torch.ones(D, 1, L, dtype=torch.bool)
    if D == 2:
        scored[0, 0, 2:] = False                                       # draw 0 masks tokens 0, 1 (k = 2)
    k = scored.sum(2, keepdim=True).float()                            # (D, 1, 1) masked counts
    w = {"complementary": torch.ones(1, 1, 1), "one_step": torch.ones(1, 1, 1),
         "elbo_mc": L / k / D, "mc_unweighted": torch.full((D, 1, 1), 2.0 / D)}[name] * scored
    if norm == "mean":
        w = w / L
    old = torch.where(scored, torch.full((D, 1, L), -1.0), torch.zeros(D, 1, L))
    new = old.clone()
    new[:, 0, moved] += delta * scored[:, 0, moved]
    return LK.Terms(new, w), old


@pytest.mark.parametrize("name", ["complementary", "elbo_mc", "mc_unweighted", "one_step"])
def test_the_ratio_and_its_clip_band_are_the_same_for_every_estimator_and_normalisation(name):
    """rho is formed on the raw per-token log-probs, before the estimator's weight: with nothing
    moved rho = 1 and the surrogate is exactly sum_i A_i log pi^_i; when one token's log-prob moves
    by delta, the clip fires exactly when e^delta leaves [1 - eps, 1 + eps] (for A > 0: above
    1 + eps), whatever the estimator (elbo_mc's L/k, a token masked in both draws) or the reading
    (sum or mean). Before the fix, rho was formed on the weighted terms: under elbo_mc the band in
    log-prob was scaled by k/L, under mean by L."""
    L, eps, adv = 4, 0.2, torch.tensor([1.0])
    for norm in ("sum", "mean"):
        same, old = hand_terms(name, L, norm, moved=0, delta=0.0)
        got, active = rl.clipped_objective(same, old, adv, eps)
        assert torch.equal(torch.exp(same.logp - old), torch.ones_like(old))         # rho = 1
        assert not active.any()
        # its value at rho = 1 is sum w A (its gradient is A grad log pi^: test_first_ppo_epoch_...)
        assert math.isclose(got.item(), (same.weight * adv).sum().item(), rel_tol=1e-6)
        for delta, fires in ((0.1, False), (0.17, False), (0.19, True), (0.5, True), (-0.5, False)):
            assert (math.exp(delta) > 1 + eps) == fires                              # the band by hand
            terms, old = hand_terms(name, L, norm, moved=0, delta=delta)
            _, active = rl.clipped_objective(terms, old, adv, eps)
            want = torch.zeros_like(active)
            want[:, 0, 0] = fires & terms.scored[:, 0, 0]                              # token 0, every draw
            assert torch.equal(active, want), (name, norm, delta)


def test_mean_and_sum_normalisation_clip_the_same_terms(world):
    """The same rows, masks and weights under logp_norm = sum and = mean: the policy's raw terms and
    hence every clipping decision are identical; only the weights differ, by 1/L per row."""
    w = world
    tok = w.tok
    sets = {"vqa": w.bundle.sets["vqa"]["sft"], "edit": w.bundle.sets["edit"]["sft"]}
    batch = TK.collate(sets, [("vqa", 0), ("edit", 1)], tok)
    old_model, model = tiny_model(tok.vocab_size, seed=3, scale=0.2), tiny_model(tok.vocab_size, seed=4, scale=0.2)
    adv = torch.tensor([1.0, -1.0])
    out = {}
    for norm in ("sum", "mean"):
        rc = rl_cfg(w, likelihood="elbo_mc", logp_norm=norm).rl
        with torch.no_grad():
            old = rl.token_terms(old_model, batch, tok, rc, 5).logp
            new = rl.token_terms(model, batch, tok, rc, 5)
        out[norm] = (new, rl.clipped_objective(new, old, adv, 0.2)[1])
    (ts, cs), (tm, cm) = out["sum"], out["mean"]
    assert torch.equal(ts.logp, tm.logp) and torch.equal(cs, cm)
    assert 0 < int(cs.sum()) < int(ts.scored.sum())                   # some terms clipped, not all
    L = batch.is_resp[:, batch.P:].sum(1).float()
    assert torch.allclose(tm.weight * L[None, :, None], ts.weight)


def test_first_ppo_epoch_has_the_on_policy_gradient(world):
    """With logp_old taken from the same weights on the same masks (the first of rl.ppo_epochs
    epochs), rho = 1 everywhere, nothing is clipped, and the gradient of the surrogate equals the
    gradient of -J (Eq. U) exactly; the on-policy loss (ppo_epochs = 1) is -J itself, by hand."""
    w = world
    tok = w.tok
    sets = {"vqa": w.bundle.sets["vqa"]["sft"], "ground": w.bundle.sets["ground"]["sft"]}
    batch = TK.collate(sets, [("vqa", 0), ("ground", 1)], tok)
    model = tiny_model(tok.vocab_size, seed=7, scale=0.1).train()
    rc = rl_cfg(w, likelihood="complementary", logp_norm="sum", shared_t=False).rl
    rc.clip_eps = 0.2
    adv, seed = torch.tensor([1.5, -0.5]), 1234

    def grads(**kw):
        model.zero_grad()
        loss, *_ = rl.unified_loss(model, batch, adv, tok, rc, seed, **kw)
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    loss_on, g_on = grads()
    with torch.no_grad():
        want = -(adv * hand_complementary_logp(model, batch, tok, seed)).sum()
        old = rl.token_terms(model, batch, tok, rc, seed).logp
    assert math.isclose(loss_on.item(), want.item(), rel_tol=1e-5)
    _, g_ppo = grads(logp_old=old)
    for a, b in zip(g_on, g_ppo):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rft_arm_trains_only_on_accepted_samples(world):
    """rl.advantage = "rft": the rows handed to the update are exactly the accepted samples (reward
    >= the task's threshold, recounted here from the returned rewards), each with A = 1; rejected
    samples are not in the batch at all, so nothing pushes away from them."""
    w = world
    N, idx = 4, [0, 1, 2, 3, 4, 5]
    cfg = rl_cfg(w, group_size=N, af_prob=0.0, advantage="rft", rft_accept="vqa:1,ground:0.5,edit:0.9",
                 temperature=1.0)
    model = vqa_answering_model(w, seed=3)
    roll = rollout_task(model, w.bundle, "vqa", idx, cfg, "cpu", nullcontext(), w.vq,
                           torch.Generator().manual_seed(5))
    accepted = roll.rewards >= 1.0                                        # (G, N)
    assert 0 < int(accepted.sum()) < accepted.numel()                     # both kinds are present
    assert len(roll.adv) == int(accepted.sum()) and (roll.adv == 1.0).all()
    # each kept row is a right answer: rescore the rows' text with the reward function itself
    exs = [w.bundle.sets["vqa"]["rl"].examples[i] for i in idx]
    owners = [exs[g] for g in range(len(idx)) for n in range(N) if accepted[g, n]]
    texts = [w.tok.decode(r[w.P:w.P + w.lay["vqa"].R_text]) for r in roll.batch.tokens]
    assert [RW.vqa_reward(t, e.answer)[0] for t, e in zip(texts, owners)] == [1.0] * len(owners)
    assert torch.equal(rl.rft_advantages(torch.tensor([[1.0, 0.4, 0.9]]), torch.tensor([[True, True, False]]), 0.9),
                       torch.tensor([[1.0, 0.0, 0.0]]))      # a non-member never counts, even when it passes


def test_forced_rows_are_sampled_only_where_they_join(world, monkeypatch):
    """Answer-forcing flips its coin after the on-policy samples are scored: one sampler call of
    G*N on-policy rows, then one call with a forced row for each group that the join rule admits
    (coin landed and every on-policy reward below tau), never for the others."""
    w = world
    N, idx = 3, list(range(8))
    cfg = rl_cfg(w, group_size=N, af_prob=0.5, af_mode="failed_groups", tau=0.5, temperature=1.0)
    rows_seen, real = [], RO.sample

    def spy(model, batch, *a, **k):
        rows_seen.append(batch.tokens.shape[0])
        return real(model, batch, *a, **k)
    monkeypatch.setattr(RO, "sample", spy)
    roll = rollout_task(vqa_answering_model(w, seed=3), w.bundle, "vqa", idx, cfg, "cpu", nullcontext(), w.vq,
                           torch.Generator().manual_seed(5))
    F = roll.stats["forced_rows"]
    all_failed = (roll.rewards[:, :N] < 0.5).all(1)
    assert 0 < F < int(all_failed.sum())                                 # seed 5: some coins land, not all
    assert rows_seen == [len(idx) * N, F]
    assert roll.stats["af_fired"] == F == int(roll.groups.member[:, N].sum())
    assert not (roll.groups.forced & ~all_failed).any()                  # only failed groups get one


def test_rl_resume_continues_exactly(world, tmp_path):
    """4 RL steps straight == 2 steps, then --resume for 2 more: the same prompts, samples, SFT rows
    and masks (every random stream is in the checkpoint), so the same losses and the same weights."""
    import copy
    import json
    import common
    w = world

    def cfg_for(out: str, steps: int, resume: bool):
        cfg = rl_cfg(w, sft_rows=2, task_mix="vqa:1,edit:1", prompts_per_step=1, group_size=2, max_steps=steps,
                     eval_interval=0, af_prob=0.5, time_budget_s=0.0)
        cfg.model = ModelConfig(n_layer=1, n_head=2, d_model=32, max_len=128)
        cfg.train.out_dir, cfg.train.resume, cfg.train.ckpt_interval = out, resume, 1
        return cfg
    ctx = one_process_ctx(log=lambda m: None)
    torch.manual_seed(0)
    start = common.build_model(cfg_for("x", 1, False), w.tok, "cpu")
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.run_rl(cfg_for(a, 4, False), ctx, w.bundle, w.vq, copy.deepcopy(start))
    train.run_rl(cfg_for(b, 2, False), ctx, w.bundle, w.vq, copy.deepcopy(start))
    torch.manual_seed(123)                     # the resumed process starts with another global RNG state
    train.run_rl(cfg_for(b, 4, True), ctx, w.bundle, w.vq, None)
    ha, hb = (json.load(open(os.path.join(d, "rl_log.json"))) for d in (a, b))
    assert [h["step"] for h in hb] == [1, 2, 3, 4]
    for x, y in zip(ha, hb):
        assert x["loss"] == y["loss"] and x["vqa"]["reward"] == y["vqa"]["reward"], (x["step"], x["loss"], y["loss"])
    wa, wb = (torch.load(os.path.join(d, "ckpt_rl.pt"), weights_only=False)["model"] for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------
# 4. the diagnostics of the ablation studies (study.py)

def test_pairwise_hamming_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 3, (4, 5, 7), generator=g)
    t[1] = t[1, :1]                                        # group 1: five copies of one sample
    want = []
    for grp in t:
        d = [(grp[i] != grp[j]).float().mean().item() for i in range(5) for j in range(5) if i != j]
        want.append(sum(d) / len(d))
    assert math.isclose(study.pairwise_hamming(t), sum(want) / 4, rel_tol=1e-6)
    assert study.pairwise_hamming(t[1:2]) == 0.0 and study.pairwise_hamming(t[:, :1]) == 0.0


def test_forced_consistency_and_unparsable_rate_count_the_right_rows(world, monkeypatch):
    """forced_consistent = the share of forced vqa rows whose reasoning implies their forced answer,
    asked of trace_answer once per forced row with that row's decoded text; unparsable_frac counts
    the on-policy rows only."""
    w = world
    N, idx = 2, [0, 1, 2, 3, 4, 5]
    calls = []

    def fake_trace_answer(text, qtype):
        calls.append(text)
        return "yes"                     # "consistent" exactly where the truth is yes

    monkeypatch.setattr(train, "trace_answer", fake_trace_answer)
    cfg = rl_cfg(w, group_size=N, af_prob=1.0, af_mode="all_groups", temperature=1.0)
    roll = rollout_task(vqa_answering_model(w, seed=3), w.bundle, "vqa", idx, cfg, "cpu", nullcontext(), w.vq,
                           torch.Generator().manual_seed(5))
    exs = [w.bundle.sets["vqa"]["rl"].examples[i] for i in idx]
    assert len(calls) == len(idx) == roll.stats["forced_rows"]
    for text, ex in zip(calls, exs):          # each call saw its own forced answer at the end
        assert text.split()[-3:] == ["<answer>", RW.normalise(ex.answer), "</answer>"]
    assert math.isclose(roll.stats["forced_consistent"], sum(RW.normalise(e.answer) == "yes" for e in exs) / len(idx))
    # the answering model always writes a parsable block: no on-policy row fails to parse
    assert roll.stats["unparsable_frac"] == 0.0 and roll.stats["parse_fail"] == {}
    # a scorer that fails every row: only the G * N on-policy rows are counted, not the forced ones
    real = RO.score_rows
    monkeypatch.setattr(RO, "score_rows", lambda task, exs, *a: (lambda out: ([0.0] * len(exs), ["garbage"] * len(exs),
                                                                               *out[2:]))(real(task, exs, *a)))
    roll = rollout_task(vqa_answering_model(w, seed=3), w.bundle, "vqa", idx, cfg, "cpu", nullcontext(), w.vq,
                           torch.Generator().manual_seed(5))
    assert roll.stats["parse_fail"] == {"garbage": len(idx) * N} and roll.stats["unparsable_frac"] == 1.0
    # ... and a forced row that fails is counted on its own, so it shows in the log
    assert roll.stats["forced_unparsable"] == len(idx)


def test_kl_statistics_split_text_and_image_tokens(world):
    """With a reference model, the per-token k3 KL's mean and variance on text and on image tokens
    are those of the scored tokens of each kind (recomputed from two token_logp calls on the same
    masks), and so is the per-token NLL of each kind."""
    w = world
    tok = w.tok
    sets = {"vqa": w.bundle.sets["vqa"]["sft"], "edit": w.bundle.sets["edit"]["sft"]}
    batch = TK.collate(sets, [("vqa", 0), ("edit", 1), ("edit", 2)], tok)
    pol, ref = tiny_model(tok.vocab_size, seed=1, scale=0.2), tiny_model(tok.vocab_size, seed=2, scale=0.2)
    rc = rl_cfg(w, kl_coef=0.1).rl
    loss, terms, kl, _ = rl.unified_loss(pol, batch, torch.ones(3), tok, rc, 17, ref_model=ref)
    img = batch.is_image[:, batch.P:]
    stats = train.kind_stats([(terms.detach(), kl.detach(), None, img)])
    with torch.no_grad():
        lp, scored = per_token(rl.token_terms(pol, batch, tok, rc, 17))
        lr_, _ = per_token(rl.token_terms(ref, batch, tok, rc, 17))
        # the loss by hand: -sum log pi + kl_coef * sum of the k3 terms
        k3 = sum(math.exp(a - b) - (a - b) - 1 for a, b in zip(lr_[scored].tolist(), lp[scored].tolist()))
    assert math.isclose(loss.item(), -lp[scored].sum().item() + 0.1 * k3, rel_tol=1e-4)
    for name, sel in (("text", scored & ~img), ("image", scored & img)):
        nll = [-x for x in lp[sel].tolist()]
        assert math.isclose(stats[f"nll_{name}_mean"], sum(nll) / len(nll), rel_tol=1e-5)
        vals = [math.exp(a - b) - (a - b) - 1 for a, b in zip(lr_[sel].tolist(), lp[sel].tolist())]
        m = sum(vals) / len(vals)
        assert math.isclose(stats[f"kl_{name}_mean"], m, rel_tol=1e-4)
        assert math.isclose(stats[f"kl_{name}_var"], sum((v - m) ** 2 for v in vals) / len(vals), rel_tol=1e-3)
    assert int((scored & img).sum()) > 0 and int((scored & ~img).sum()) > 0


def test_kind_statistics_merge_over_micro_batches_like_one_batch():
    """step_record pools the per-kind statistics over micro-batches: a micro-batch without image
    tokens must not pull the image mean down, and the variance is over all tokens of the step (not a
    mean of variances)."""
    g = torch.Generator().manual_seed(0)
    v = -torch.rand(1, 6, 5, generator=g) * 3                  # raw log-probs: NLL = -v
    img = torch.zeros(6, 5, dtype=torch.bool)
    img[3:, 2:] = True                                         # rows 0-2: text only
    chunk = lambda rows: (LK.Terms(v[:, rows], torch.ones_like(v[:, rows])), None, None, img[rows])
    whole = train.kind_stats([chunk(slice(None))])
    merged = train.kind_stats([chunk(slice(0, 3)), chunk(slice(3, 6))])    # the first has no image token
    for kind in ("text", "image"):
        vals = -v[0][~img if kind == "text" else img]
        assert math.isclose(merged[f"nll_{kind}_mean"], vals.mean().item(), rel_tol=1e-6)
        assert math.isclose(merged[f"nll_{kind}_var"], vals.var(unbiased=False).item(), rel_tol=1e-5)
        assert math.isclose(merged[f"nll_{kind}_mean"], whole[f"nll_{kind}_mean"], rel_tol=1e-9)
    assert set(merged) == {"nll_text_mean", "nll_text_var", "nll_image_mean", "nll_image_var"}


def test_run_rl_with_a_reference_logs_per_kind_statistics(world, tmp_path):
    """The GRPO + KL ablation end to end: a step with edit rollouts and SFT rows (text and image
    tokens in different micro-batches) logs the per-kind NLL and KL means and variances, at step 1
    (the first epoch, before any update) with a KL of exactly 0: the policy is its own reference."""
    import json
    w = world
    cfg = rl_cfg(w, sft_rows=4, task_mix="vqa:1,edit:1", af_prob=0.0, max_steps=1, eval_interval=0,
                 prompts_per_step=1, group_size=2, kl_coef=0.1, tree_schedule="0", temperature=1.0)
    cfg.train.out_dir, cfg.train.micro_batch = str(tmp_path), 3
    ctx = one_process_ctx(log=lambda s: None)
    train.run_rl(cfg, ctx, w.bundle, w.vq, tiny_model(w.tok.vocab_size, seed=8, scale=0.3))
    rec = json.load(open(tmp_path / "rl_log.json"))[0]
    for q in ("nll_text", "nll_image", "kl_text", "kl_image"):
        assert f"{q}_mean" in rec and f"{q}_var" in rec and rec[f"{q}_var"] >= 0, q
    assert rec["kl_text_mean"] == rec["kl_image_mean"] == 0.0 and rec["nll_image_mean"] > 0
    assert not any(k.endswith(("_n", "_sum", "_sq")) for k in rec)


def test_iterated_rft_resamples_from_the_current_policy(world, monkeypatch):
    """The rft arm is iterated and on-policy: step 2's rollouts are drawn by the weights step 1's
    update produced (not by the start's, as a one-shot RFT on a fixed sample set would be)."""
    import common
    w = world
    cfg = rl_cfg(w, group_size=4, af_prob=0.0, advantage="rft", rft_accept="vqa:1,ground:0.5,edit:0.9",
                 temperature=1.0, sft_rows=2, lr=1e-2, task_mix="vqa:1")
    model = vqa_answering_model(w, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctx = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, ".")
    seen, real = [], RO.sample

    def spy(m, batch, *a, **k):
        seen.append(torch.cat([p.detach().flatten() for p in m.parameters()]).clone())
        return real(m, batch, *a, **k)
    monkeypatch.setattr(RO, "sample", spy)
    sft = data.TaskSampler(w.bundle.sets, "sft", {"vqa": 1.0}, 0)
    gen, pick = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    ro = rollout_context(model, w.bundle, cfg, ctx.device, ctx.autocast, w.vq, gen)
    after = []
    for _ in range(2):
        st = rl.rl_step(ro, opt, ctx, {"vqa": 6}, sft, pick)
        assert st.trip.n > 0 and not st.update.skipped                     # accepted rows: an update
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])
    assert torch.equal(seen[1], after[0])                                  # step 2 sampled with step 1's result
