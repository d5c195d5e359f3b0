"""
Tests of the RL update (rl.py) and of answer-forcing's join rule and coin (rollout.py), each against
an independent reference:

  1. rl.policy_update on fixed triplets: its gradient is that of -J = -(1/N) sum_i A_i log pi_i
     (Eq. U), with log pi_i written out here from the masks the update used (each response token
     scored once, by hand, from the model's logits on the copy in which it is masked) and N counted
     by hand: the SFT rows plus EVERY group member, zero-advantage members included, so N exceeds
     the number of rows the update runs. One small SGD step moves the weights by -lr times that
     gradient and lowers -J on the same masks.
  2. rl.rl_step end to end: two runs from the same state and generators give identical rollouts,
     triplets and weights; its update is rl.policy_update on the triplets it built (replayed from
     the generator state at the update); its gradient is -grad J with the advantages of Eq. G, D, A
     recomputed here from the groups' rewards in plain Python. (Eq. A's values themselves are
     checked by hand in tests/test_rollout.py.)
  3. rollout.join_forced as an explicit truth table (both af_modes, a reward exactly at tau, a group
     with one success, the coin down); the coin drawn in rollout.answer_forcing lands within 4 sigma
     of the binomial mean n p over many groups.
  4. A stop request in the RL stage (train.main, the real entry point): SIGTERM in the middle of an RL
     step, or during an RL quick eval, writes ckpt_rl.pt at that step and exits 143, and --resume
     ends bit-identical to an uninterrupted run (same weights, same rl_log.json apart from timings).
     The 2-process version is in tests/test_distributed.py.

The world and the tiny models are tests/test_rollout.py's (a fake VQ whose codes are the cells,
1-layer Transformers); the stop tests use the small flags of tests/test_faults.py.

    python -m pytest tests/test_rl.py -q
"""
import json
import math
import os
import signal
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import data
import likelihood as LK
import metrics
import rl
import rollout as RO
import tokens as TK
import train
from test_distributed import rl_stage_flags  # noqa: E402
from test_rollout import one_process_ctx, rl_cfg, tiny_model, vqa_answering_model, world  # noqa: F401  (world: a fixture)


# ----------------------------------------------------------------------------------------------
# helpers: the masks the update used, log pi by hand, an optimizer that only records


def record_masks(monkeypatch) -> list:
    """Every call of likelihood.masked_logprobs from now on appends (its batch, its masks (n, B, T)):
    the masks an estimate drew, whichever way it drew them."""
    calls, real = [], LK.masked_logprobs

    def spy(model, batch, masks, tok, *a, **k):
        calls.append((batch, masks.detach().clone()))
        return real(model, batch, masks, tok, *a, **k)
    monkeypatch.setattr(LK, "masked_logprobs", spy)
    return calls


def hand_logp(model, batch: TK.Batch, masks: torch.Tensor, tok) -> torch.Tensor:
    """Eq. C written out for complementary masks (2, B, T): each response token's log-prob of its
    clean id from the one copy in which it is masked ([IMASK] on image slots, [MASK] on text), by a
    plain full forward of the model. Returns log pi (B,), differentiable."""
    m1, m2 = masks
    assert not (m1 & m2).any() and torch.equal(m1 | m2, batch.is_resp), "not a complementary pair"
    out = torch.zeros(batch.tokens.shape[0])
    for m in (m1, m2):
        fill = torch.where(batch.is_image, torch.full_like(batch.tokens, tok.IMASK), torch.full_like(batch.tokens, tok.MASK))
        logits = model(torch.where(m, fill, batch.tokens), batch.valid, batch.is_prompt).float()
        lp = F.log_softmax(logits, -1).gather(-1, batch.tokens[..., None]).squeeze(-1)      # (B, T)
        out = out + (lp * m).sum(1)
    return out


def visible(batch: TK.Batch) -> list[list[int]]:
    """Each row's non-padding tokens: rows compared across batches of different padded widths."""
    return [r[v].tolist() for r, v in zip(batch.tokens, batch.valid)]


class GradRecorder:
    """An optimizer that never moves the weights: step() records every parameter's gradient."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class FixedDraws:
    """The SFT-row sampler's interface (draw(k) -> (task, index) items) with fixed items."""

    def __init__(self, items):
        self.items = items

    def draw(self, k):
        assert k == len(self.items)
        return list(self.items)


def assert_grads_close(got, want, what="", rtol=1e-4):
    num = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(got, want)))
    den = math.sqrt(sum(float((b ** 2).sum()) for b in want))
    assert den > 1e-6, "the reference gradient is zero: the test would prove nothing"
    assert num <= rtol * den, f"{what} gradient off by {num / den:.2e} (relative)"


# ----------------------------------------------------------------------------------------------
# 1. policy_update on fixed triplets


SFT_ITEMS = [("t2i", 0), ("vqa", 3)]            # the step's SFT rows (A = 1): an image and a text response


def fixed_groups(w):
    """Two tasks' hand-made groups with hand-set advantages. The samples are SFT rows' full texts,
    each prompt paired with other examples' responses (valid (x, y) pairs of the layout).
    vqa: 2 prompts x (2 on-policy + 1 forced slot); the second group's forced sample did not join.
    ground: 1 prompt x 2 samples. Returns (groups, advantages, the rows expected to be kept as
    (task, prompt example, response example), their A, N counted by hand)."""
    tok, groups, advs = w.tok, [], []
    spec = {"vqa": ([0, 1], [[2, 3, 4], [5, 0, 1]], [[True, True, True], [True, True, False]],
                    [[0.7, 0.0, -1.3], [0.0, 0.0, 0.0]]),
            "ground": ([2], [[3, 4]], [[True, True]], [[0.5, -0.25]])}
    kept, A = [], []
    for task, (prompts, resp, member, adv) in spec.items():
        ts = w.bundle.sets[task]["sft"]
        base = TK.collate({task: ts}, [(task, i) for i in prompts], tok, responses=False)
        P = base.P
        toks = torch.stack([torch.stack([torch.cat([ts.prompt[g], TK.collate({task: ts}, [(task, j)], tok).tokens[0, P:]])
                                         for j in row]) for g, row in zip(prompts, resp)])       # (G, n, T)
        member, adv = torch.tensor(member), torch.tensor(adv)
        groups.append(RO.Groups(task, [ts.examples[i] for i in prompts], ts.layout, base, toks,
                                torch.zeros(adv.shape), member, member[:, -1] if task == "vqa" else torch.zeros(len(prompts), dtype=torch.bool),
                                forcing=(task == "vqa")))
        advs.append(adv)
        for g, row in enumerate(resp):
            for j, r in enumerate(row):
                if adv[g, j] != 0:
                    kept.append((task, prompts[g], r))
                    A.append(float(adv[g, j]))
    n = len(SFT_ITEMS) + (3 + 2) + 2          # SFT rows + every member (the unjoined forced slot is not one)
    return groups, advs, kept, A, n


def expected_rows(w, kept) -> list[list[int]]:
    """The visible tokens of the SFT rows, then of the kept group rows, built from the sets directly."""
    sets = {k: v["sft"] for k, v in w.bundle.sets.items()}
    rows = visible(TK.collate(sets, SFT_ITEMS, w.tok))
    for task, g, r in kept:
        b = TK.collate(sets, [(task, g)], w.tok)
        b.tokens[0, b.P:] = TK.collate(sets, [(task, r)], w.tok).tokens[0, b.P:]
        rows += visible(b)
    return rows


def update_cfg(w, shared_t=False):
    cfg = rl_cfg(w, likelihood="complementary", logp_norm="sum", shared_t=shared_t, sft_rows=len(SFT_ITEMS),
                 kl_coef=0.0, ppo_epochs=1)
    cfg.train.micro_batch = 4                 # 6 kept rows: two micro-batches (4 + 2)
    cfg.train.grad_clip = 1e6                 # no clipping: the raw gradient of -J is compared
    return cfg


def minus_J(model, calls, A, n, tok):
    """-(1/N) sum_i A_i log pi_i over the recorded micro-batches (rows in update order), by hand."""
    lp = torch.cat([hand_logp(model, b, m, tok) for b, m in calls])
    return -(torch.tensor(A) * lp).sum() / n


@pytest.mark.parametrize("shared_t", [False, True])
def test_policy_update_gradient_is_that_of_minus_J_with_N_over_every_triplet(world, monkeypatch, shared_t):
    """The update's gradient (recorded by an optimizer that does not step) equals the gradient of
    -(1/N) sum_i A_i log pi_i, with log pi by hand on the update's own masks and N = SFT rows + every
    group member (9 here, against 6 rows run): zero-advantage rows count in N, not in the sum. With
    rl.shared_t, both micro-batches are masked at one rate t1, drawn once for the step."""
    w = world
    model = tiny_model(w.tok.vocab_size, seed=7, scale=0.1).train()
    cfg = update_cfg(w, shared_t)
    ro = RO.RolloutContext(model, w.tok, w.bundle.sets, None, cfg, "cpu", nullcontext(), torch.Generator().manual_seed(3))
    groups, advs, kept, A, n = fixed_groups(w)
    trip = rl.triplets(groups, advs, ro, FixedDraws(SFT_ITEMS))
    assert trip.n == n == 9 and len(trip.adv) == len(SFT_ITEMS) + len(kept) == 6
    assert trip.adv.tolist() == pytest.approx([1.0] * len(SFT_ITEMS) + A)
    calls, rates, real = record_masks(monkeypatch), [], LK.complementary

    def spy(model, batch, tok, generator=None, norm="sum", shared_t=False, t1=None):
        rates.append(None if t1 is None else t1.tolist())
        return real(model, batch, tok, generator, norm, shared_t, t1)
    monkeypatch.setattr(LK, "complementary", spy)
    opt = GradRecorder(model.parameters())
    u = rl.policy_update(ro, opt, trip, one_process_ctx(lambda m: None))
    assert u.skipped is None and len(opt.grads) == 1
    if shared_t:                       # one rate for every row of both micro-batches
        assert len({x for r in rates for x in r}) == 1 and 0 < rates[0][0] < 1, rates
    assert [len(b.tokens) for b, _ in calls] == [4, 2]                            # micro-batches of 4
    assert sum((visible(b) for b, _ in calls), []) == expected_rows(w, kept)      # the rows, in order
    loss = minus_J(model, calls, [1.0] * len(SFT_ITEMS) + A, n, w.tok)
    want = torch.autograd.grad(loss, list(model.parameters()))
    assert u.loss == pytest.approx(loss.item(), rel=1e-5)
    assert_grads_close(opt.grads[0], want, "policy_update vs -grad J:")


def test_kl_ablation_keeps_every_group_member_and_the_same_N(world):
    """rl.kl_coef > 0: every group member is a row (the KL term covers every sampled row, A = 0 ones
    included; the unjoined forced slot is no member); N is the same count as without the KL."""
    w = world
    cfg = update_cfg(w)
    cfg.rl.kl_coef = 0.1
    ro = RO.RolloutContext(None, w.tok, w.bundle.sets, None, cfg, "cpu", nullcontext(), torch.Generator())
    groups, advs, _, _, n = fixed_groups(w)
    trip = rl.triplets(groups, advs, ro, FixedDraws(SFT_ITEMS))
    assert trip.n == n == 9 and len(trip.adv) == 9            # 2 SFT rows + 5 vqa members + 2 ground
    assert trip.adv.tolist() == pytest.approx([1.0, 1.0, 0.7, 0.0, -1.3, 0.0, 0.0, 0.5, -0.25])


def test_one_sgd_step_moves_by_minus_lr_grad_and_lowers_minus_J(world, monkeypatch):
    """policy_update with plain SGD: the weights move by -lr times the hand gradient of -J, and -J
    on the same masks is lower after the step (first order: lr small)."""
    w = world
    model = tiny_model(w.tok.vocab_size, seed=7, scale=0.1).train()
    cfg = update_cfg(w)
    ro = RO.RolloutContext(model, w.tok, w.bundle.sets, None, cfg, "cpu", nullcontext(), torch.Generator().manual_seed(3))
    groups, advs, kept, A, n = fixed_groups(w)
    A = [1.0] * len(SFT_ITEMS) + A
    trip = rl.triplets(groups, advs, ro, FixedDraws(SFT_ITEMS))
    calls = record_masks(monkeypatch)
    before = [p.detach().clone() for p in model.parameters()]
    lr = 1e-3
    rl.policy_update(ro, torch.optim.SGD(model.parameters(), lr=lr), trip, one_process_ctx(lambda m: None))
    after = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    loss_before = minus_J(model, calls, A, n, w.tok)
    want = torch.autograd.grad(loss_before, list(model.parameters()))
    # (float32 weights of ~0.1 moved by ~1e-4: the difference carries ~1e-4 relative rounding)
    assert_grads_close([(b - a) / lr for a, b in zip(after, before)], want, "SGD step / lr vs -grad J:", rtol=1e-3)
    with torch.no_grad():
        for p, a in zip(model.parameters(), after):
            p.copy_(a)
        loss_after = minus_J(model, calls, A, n, w.tok)
    assert loss_after < loss_before - 1e-6, (loss_before.item(), loss_after.item())


# ----------------------------------------------------------------------------------------------
# 2. rl_step end to end


def hand_advantages(r: list[float], member: list[bool], gamma: float) -> list[float]:
    """Eq. G, D, A for one group in plain Python: population std over the members, exactly 0 GRPO
    part when every member scores the same, 1 for the first best member when its reward is > 0."""
    rs = [x for x, m in zip(r, member) if m]
    mean = sum(rs) / len(rs)
    std = math.sqrt(sum((x - mean) ** 2 for x in rs) / len(rs))
    same = max(rs) == min(rs)
    best = max(rs)
    first = next(j for j, (x, m) in enumerate(zip(r, member)) if m and x == best)
    return [0.0 if not m else gamma * float(j == first and best > 0) + (1 - gamma) * (0.0 if same else (x - mean) / (std + 1e-4))
            for j, (x, m) in enumerate(zip(r, member))]


def rl_step_setup(w, model, opt_kind: str):
    """A step of 4 vqa prompts x 3 samples of test_rollout's answering model (about 1 in 6 right),
    answer-forcing on every group (af_prob 1, all_groups: a forced sample that scores 1 joins each
    group, so groups with and without an on-policy success both have a signal, and ties for the best
    occur), 2 SFT rows. The generators (sampling and masks, prompts, SFT rows) are seeded alike on
    every call."""
    cfg = rl_cfg(w, group_size=3, sft_rows=2, af_prob=1.0, af_mode="all_groups", gamma=0.5, adv_std=True,
                 likelihood="complementary", shared_t=False, kl_coef=0.0, ppo_epochs=1, temperature=1.0, lr=1e-2)
    cfg.train.micro_batch, cfg.train.grad_clip = 4, 1e6
    ro = RO.RolloutContext(model, w.tok, w.bundle.sets, w.judge, cfg, "cpu", nullcontext(), torch.Generator().manual_seed(5))
    sft = data.TaskSampler(w.bundle.sets, "sft", {"vqa": 1.0}, 17)
    opt = GradRecorder(model.parameters()) if opt_kind == "record" else torch.optim.AdamW(model.parameters(), lr=cfg.rl.lr)
    return ro, opt, sft, torch.Generator().manual_seed(9)


DRAWS = {"vqa": 4}


def test_rl_step_twice_from_the_same_state_is_identical(world):
    """The same weights, optimizer and generators give the same rollouts, triplets, loss and new
    weights, bit for bit, whatever the global torch RNG holds (every draw comes from the step's own
    generators, which the RL checkpoint saves)."""
    w = world
    outs = []
    for run in range(2):
        model = vqa_answering_model(w, seed=4)
        ro, opt, sft, pick = rl_step_setup(w, model, "adamw")
        torch.manual_seed(1000 + run)
        st = rl.rl_step(ro, opt, one_process_ctx(lambda m: None), DRAWS, sft, pick)
        outs.append((st, [p.detach().clone() for p in model.parameters()]))
    (a, wa), (b, wb) = outs
    assert a.update.skipped is None and len(a.trip.adv) > ro.cfg.rl.sft_rows       # rollout rows too
    for ga, gb in zip(a.groups, b.groups):
        assert torch.equal(ga.tokens, gb.tokens) and torch.equal(ga.rewards, gb.rewards)
    assert torch.equal(a.trip.batch.tokens, b.trip.batch.tokens) and torch.equal(a.trip.adv, b.trip.adv)
    assert a.trip.n == b.trip.n and a.update.loss == b.update.loss
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    init = [p.detach() for p in vqa_answering_model(w, seed=4).parameters()]
    assert max((x - y).abs().max().item() for x, y in zip(wa, init)) > 1e-3        # the step moved the weights


def test_rl_step_update_is_policy_update_on_its_triplets(world, monkeypatch):
    """rl_step's update == rl.policy_update on the triplets rl_step built, started from the same
    weights with the generator where rl_step's update found it (so the same masks)."""
    w = world
    at_update, real = [], rl.policy_update

    def spy(ro, opt, trip, ctx, ref=None):
        at_update.append(ro.generator.get_state())
        return real(ro, opt, trip, ctx, ref)
    monkeypatch.setattr(rl, "policy_update", spy)
    model = vqa_answering_model(w, seed=4)
    ro, opt, sft, pick = rl_step_setup(w, model, "adamw")
    st = rl.rl_step(ro, opt, one_process_ctx(lambda m: None), DRAWS, sft, pick)
    stepped = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(rl, "policy_update", real)
    again = vqa_answering_model(w, seed=4).train()
    ro2, opt2, _, _ = rl_step_setup(w, again, "adamw")
    ro2.generator.set_state(at_update[0])
    rl.policy_update(ro2, opt2, st.trip, one_process_ctx(lambda m: None))
    assert all(torch.equal(x, y.detach()) for x, y in zip(stepped, again.parameters()))


def test_rl_step_gradient_is_minus_grad_J_with_hand_advantages(world, monkeypatch):
    """The gradient of one rl_step (recorded, not applied) equals -grad J with A recomputed from the
    groups' rewards by Eq. G, D, A in plain Python, log pi by hand on the update's masks, and
    N = SFT rows + every group member (forced samples included), counted from the draws."""
    w = world
    model = vqa_answering_model(w, seed=4)
    ro, opt, sft, pick = rl_step_setup(w, model, "record")
    calls = record_masks(monkeypatch)
    st = rl.rl_step(ro, opt, one_process_ctx(lambda m: None), DRAWS, sft, pick)
    N = ro.cfg.rl.sft_rows + sum(k * (ro.cfg.rl.group_size + 1) for k in DRAWS.values())   # every group joined
    assert st.trip.n == N
    # the rows the update must see: the SFT rows, then every member with A != 0, prompt-major
    sft_items = data.TaskSampler(w.bundle.sets, "sft", {"vqa": 1.0}, 17).draw(2)
    rows = visible(TK.collate({k: v["sft"] for k, v in w.bundle.sets.items()}, sft_items, w.tok))
    A = [1.0] * len(rows)
    for g in st.groups:
        slots = visible(g.as_batch())                 # prompt-major: row i * n + j is slot j of prompt i
        n = g.tokens.shape[1]
        for i in range(len(g.examples)):
            a = hand_advantages(g.rewards[i].tolist(), g.member[i].tolist(), ro.cfg.rl.gamma)
            for j, x in enumerate(a):
                if abs(x) > 1e-6:                 # the code keeps A != 0; Eq. G's zeros are exact
                    rows.append(slots[i * n + j])
                    A.append(x)
    assert sum((visible(b) for b, _ in calls), []) == rows
    assert st.trip.adv.tolist() == pytest.approx(A, rel=1e-5, abs=1e-6)
    loss = minus_J(model, calls, A, N, w.tok)
    want = torch.autograd.grad(loss, list(model.parameters()))
    assert_grads_close(opt.grads[0], want, "rl_step vs -grad J:")


# ----------------------------------------------------------------------------------------------
# 3. answer-forcing: the join rule and the coin


# (rewards of the group's on-policy samples, coin, tau) -> joins under failed_groups / all_groups
JOIN_TABLE = [
    # rewards              coin   tau   failed_groups  all_groups
    ((0.0, 0.0, 0.0),      True,  0.5,  True,          True),     # all failed, coin landed
    ((0.0, 0.0, 0.0),      False, 0.5,  False,         False),    # all failed, coin down
    ((0.0, 1.0, 0.0),      True,  0.5,  False,         True),     # one success
    ((0.0, 1.0, 0.0),      False, 0.5,  False,         False),
    ((0.5, 0.2, 0.0),      True,  0.5,  False,         True),     # a reward exactly at tau is not a failure
    ((0.49, 0.2, 0.0),     True,  0.5,  True,          True),     # just below tau is
    ((0.3, 0.3, 0.3),      True,  0.3,  False,         True),     # every reward at tau
    ((0.0, 0.0, 0.0),      True,  0.0,  False,         True),     # tau = 0: no reward is below it
    ((0.9, 0.9, 0.9),      True,  1.0,  True,          True),     # tau = 1: only perfect scores succeed
]


def test_join_forced_truth_table():
    r = torch.tensor([row[0] for row in JOIN_TABLE])
    coin = torch.tensor([row[1] for row in JOIN_TABLE])
    for mode, col in (("failed_groups", 3), ("all_groups", 4)):
        for i, row in enumerate(JOIN_TABLE):      # one row at a time: tau differs between rows
            got = RO.join_forced(r[i:i + 1], coin[i:i + 1], row[2], mode)
            assert got.tolist() == [row[col]], (mode, row)
    # and batched, rows with one tau: the rule is per group
    same_tau = [i for i, row in enumerate(JOIN_TABLE) if row[2] == 0.5]
    got = RO.join_forced(r[same_tau], coin[same_tau], 0.5, "failed_groups")
    assert got.tolist() == [JOIN_TABLE[i][3] for i in same_tau]


@pytest.mark.parametrize("p,mode", [(0.1, "all_groups"), (0.3, "failed_groups"), (0.0, "all_groups")])
def test_answer_forcing_coin_lands_at_rate_af_prob(world, monkeypatch, p, mode):
    """rollout.answer_forcing over G = 4000 all-failed groups: the number that get a forced sample
    is within 4 sigma of the binomial mean G p (sigma = sqrt(G p (1 - p))), and exactly those groups'
    forced samples are drawn. The sampler and the reward are stubbed (the coin is what is tested)."""
    w = world
    G = 4000
    ts = w.bundle.sets["vqa"]["rl"]
    items = [("vqa", i % len(ts)) for i in range(G)]
    base = TK.collate({"vqa": ts}, items, w.tok, responses=False)
    exs = [ts.examples[i] for _, i in items]
    drawn = []

    def fake_sample(ro, canvas, **k):
        drawn.append(canvas.tokens.shape[0])
        return canvas.tokens, None
    monkeypatch.setattr(RO, "policy_sample", fake_sample)
    monkeypatch.setattr(RO, "score", lambda ro, tokens, P, exs, lay: (torch.ones(len(exs)), Counter()))
    cfg = rl_cfg(w, af_prob=p, af_mode=mode, tau=0.5)
    ro = RO.RolloutContext(None, w.tok, w.bundle.sets, None, cfg, "cpu", nullcontext(), torch.Generator().manual_seed(2024))
    joins, _, r_f, _ = RO.answer_forcing(ro, base, exs, torch.zeros(G, 3), ts.layout)
    k = int(joins.sum())
    mean, sd = G * p, math.sqrt(G * p * (1 - p))
    assert abs(k - mean) <= 4 * sd, (k, mean, sd)
    assert drawn == ([k] if k else [])
    assert torch.equal(r_f > 0, joins)


# ----------------------------------------------------------------------------------------------
# 4. a stop request in the RL stage, then --resume


# a run of seconds: 1 layer, d 32, 2 SFT steps, 3 RL steps of vqa + ground with answer-forcing (the
# flags the 2-process stop tests of test_distributed.py use too)
flags = rl_stage_flags


TIMING = ("seconds", "rollout_s", "update_s", "peak_mem_mb", "eval_seconds")


def untimed(x):
    """rl_log.json without its wall-clock fields (they differ between any two runs)."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [untimed(v) for v in x]
    return x


def ckpt(out: str) -> dict:
    return torch.load(os.path.join(out, "ckpt_rl.pt"), weights_only=False)


@pytest.fixture(scope="module")
def sft_start(tmp_path_factory):
    """One SFT checkpoint every RL run below starts from (--train.init_from)."""
    tmp = tmp_path_factory.mktemp("rl_stop")
    cache, base = str(tmp / "cache"), str(tmp / "sft")
    train.main(flags(cache, base, "--stage=sft"))
    return tmp, cache, os.path.join(base, "ckpt_sft.pt")


def rl_flags(sft_start, out: str, *extra) -> list[str]:
    tmp, cache, init = sft_start
    return flags(cache, str(tmp / out), "--stage=rl", f"--train.init_from={init}", *extra)


def assert_same_run(a: str, b: str, skip_eval_at=None):
    """Two RL runs end alike: the same weights bit for bit, the same random streams at the end, the
    same rl_log.json apart from timings (and the quick eval a stop cut short, at step skip_eval_at)."""
    ca, cb = ckpt(a), ckpt(b)
    assert ca["step"] == cb["step"] == 3
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    for sa, sb in zip(ca["rank_states"], cb["rank_states"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "a random stream ended elsewhere"
    la, lb = (untimed(json.load(open(os.path.join(d, "rl_log.json")))) for d in (a, b))
    if skip_eval_at is not None:
        assert "eval" not in lb[skip_eval_at - 1]
        la[skip_eval_at - 1].pop("eval")
    assert la == lb


def test_sigterm_mid_rl_step_checkpoints_that_step_and_resume_is_bit_identical(sft_start, monkeypatch):
    """SIGTERM in the middle of RL step 2 of 3: the step finishes, ckpt_rl.pt holds step 2, the run
    exits 143; --resume then ends exactly where the uninterrupted run ends."""
    train.main(rl_flags(sft_start, "straight"))
    real, calls = rl.rl_step, []

    def step_then_sigterm(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)           # arrives while the step runs
        return real(*a, **k)
    monkeypatch.setattr(rl, "rl_step", step_then_sigterm)
    stopped = rl_flags(sft_start, "stopped")
    with pytest.raises(SystemExit) as e:
        train.main(stopped)
    assert e.value.code == 143 and len(calls) == 2
    assert ckpt(str(sft_start[0] / "stopped"))["step"] == 2
    monkeypatch.setattr(rl, "rl_step", real)
    train.main(stopped + ["--resume"])
    assert_same_run(str(sft_start[0] / "straight"), str(sft_start[0] / "stopped"))


def test_sigterm_during_an_rl_quick_eval_checkpoints_and_resume_is_bit_identical(sft_start, monkeypatch):
    """SIGTERM during the quick eval after RL step 1 (rl.eval_interval = 1): the eval stops after its
    batch, ckpt_rl.pt holds step 1, exit 143; --resume ends where the uninterrupted run ends (whose
    log also holds the step-1 eval the stop cut short)."""
    train.main(rl_flags(sft_start, "straight_eval", "--rl.eval_interval=1"))
    real, calls = metrics.sample, []

    def sample_then_sigterm(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(metrics, "sample", sample_then_sigterm)
    stopped = rl_flags(sft_start, "stopped_eval", "--rl.eval_interval=1")
    with pytest.raises(SystemExit) as e:
        train.main(stopped)
    assert e.value.code == 143 and len(calls) == 1
    assert ckpt(str(sft_start[0] / "stopped_eval"))["step"] == 1
    monkeypatch.setattr(metrics, "sample", real)
    train.main(stopped + ["--resume"])
    assert_same_run(str(sft_start[0] / "straight_eval"), str(sft_start[0] / "stopped_eval"), skip_eval_at=1)
