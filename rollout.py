"""
Rollouts for the unified RL step: groups of on-policy samples, tree search and answer-forcing, scored
by the exact rewards. The sampling side of LaViDa-R1 (arXiv 2602.14147), METHOD.md §4-§6; the
advantages and the objective that consume these groups are in rl.py.

  the policy      pi_theta is the sampler of METHOD.md §3 (diffusion.sample) at temperature
                  rl.temperature = 1 on text and image slots, revealing rl.tokens_per_step text tokens
                  per step (0 = diffusion.tokens_per_step): `policy_sample`. Every function here gets
                  one RolloutContext: the model, the tokenizer, the data, the picture judge, the
                  configs, the device and the generator of the sampling noise.
  groups          N = rl.group_size samples per prompt. Every prompt and sample of a task goes through
                  the sampler in ONE batched call (rows = prompts x samples), never a Python loop.
  tree search     (METHOD.md §6; real-valued rewards: edit; `sample_rounds`). Round 0 draws N samples
                  from the fully masked canvas; each later round takes the best sample so far (argmax
                  over ALL samples so far: the paper does not say; this is the simplest reading),
                  rebuilds its state at a branch step from its final tokens and recorded unmasking order
                  alone (diffusion.rebuild_state: no intermediate tensors are kept), and samples N
                  continuations from there. rl.tree_schedule = "0,8" means a fresh round, then a branch
                  at image step 8 (the paper's fixed schedule); "0,H" branches where the policy was
                  most uncertain (`branch_step`: the step that revealed the parent's highest-entropy
                  slot, as LATR, arXiv 2510.24302, branches at high-entropy tokens; "Ht" / "Hi" look at
                  its plan text / its image slots only), so each group branches at a step of its own.
                  The entropies reach the sampler through its on_reveal hook (`EntropyRecorder`).
  answer-forcing  (METHOD.md §5; the tasks with a ground-truth answer: vqa, ground; `answer_forcing`).
                  After the on-policy samples are scored, a coin with probability rl.af_prob is flipped
                  per group; the forced sample joins the group (N+1 members) where `join_forced` says
                  so: the coin landed and, in af_mode "failed_groups" (reading 1 of the paper's "10%",
                  the default), every on-policy reward is below rl.tau; in "all_groups" (reading 2)
                  wherever the coin landed. Only the joining groups' forced samples are drawn: the
                  canvas "[M] ... [M] <answer> z* </answer>" (the ground-truth answer block fixed at
                  the end of the text region), inpainted by the same sampler, which never changes a
                  fixed token and may not write an answer tag into the masked reasoning (a second
                  <answer> block would make the forced sample unparsable).

The file reads top-down: sample_groups, the groups it returns, the rounds of tree search and their
branch point, answer-forcing, then the policy's sampler and the reward.

Exercise: python -m pytest tests/test_rollout.py -q
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from einops import rearrange

from diffusion import image_step_offset, rebuild_state, sample
from rewards import score_rows
from tokens import RL_TASKS, Batch, answer_ids, collate

FORCING_TASKS = ("vqa", "ground")        # the tasks with a ground-truth answer block


@dataclass
class RolloutContext:
    """What every rollout function needs, in one object."""
    model: torch.nn.Module
    tok: object                    # tokens.Tokenizer
    sets: dict                     # sets[task][split] -> tokens.TaskSet (data.Bundle.sets)
    judge: object                  # how the rewards see pictures (rewards.PictureJudge: decoder, reader, graders)
    cfg: object                    # config.Config: cfg.rl (the rollout settings), cfg.diffusion (the sampler)
    device: str
    autocast: object               # a context manager: bf16 autocast or a no-op
    generator: torch.Generator     # the sampling noise (rl.py draws the update's masks from it too)


# ----------------------------------------------------------------------------------------------
# the groups of one task


@torch.no_grad()
def sample_groups(ro: RolloutContext, task: str, idx: list[int], split: str = "rl") -> Groups:
    """The groups of one task for the prompts `idx` of `split`: on-policy rounds (sample_rounds; tree
    search when `task` is in rl.tree_tasks), then answer-forcing on vqa / ground when rl.af_prob > 0."""
    rc, t0 = ro.cfg.rl, time.time()
    ts = ro.sets[task][split]
    lay, exs = ts.layout, [ts.examples[i] for i in idx]
    base = collate({task: ts}, [(task, i) for i in idx], ro.tok, responses=False).to(ro.device)    # (G, T)
    schedule = parse_tree_schedule(rc.tree_schedule) if task in parse_tree_tasks(rc.tree_tasks, rc.tree_schedule) else [0]
    t_on, r_on, why = sample_rounds(ro, base, exs, schedule, lay)
    member = torch.ones_like(r_on, dtype=torch.bool)
    joins, why_f = torch.zeros(len(idx), dtype=torch.bool), Counter()
    forcing = task in FORCING_TASKS and rc.af_prob > 0
    if forcing:                                       # the forced slot goes last
        joins, t_f, r_f, why_f = answer_forcing(ro, base, exs, r_on, lay)
        t_on, r_on = torch.cat([t_on, t_f[:, None]], 1), torch.cat([r_on, r_f[:, None]], 1)
        member = torch.cat([member, joins[:, None]], 1)
    return Groups(task, exs, lay, base, t_on, r_on, member, joins, len(schedule), forcing, why, why_f, time.time() - t0)


@dataclass
class Groups:
    """The sampled and scored groups of one task in one RL step: G prompts, n slots per group.
    Slots are round-major (N samples of round 0, then N of each tree round), then the forced slot
    last when answer-forcing is on."""
    task: str
    examples: list                 # (G,) the prompts' examples (world.Example)
    layout: object                 # the task's response layout (tokens.Layout)
    base: Batch                    # (G, T) the prompts, response all [M]
    tokens: torch.Tensor           # (G, n, T) every slot's prompt + response
    rewards: torch.Tensor          # (G, n) rewards in [0, 1]
    member: torch.Tensor           # (G, n) bool: the slot is in the group (an unjoined forced slot is not)
    forced: torch.Tensor           # (G,) bool: an answer-forced sample joined the group
    rounds: int = 1                # sampling rounds of N samples each (tree search: > 1)
    forcing: bool = False          # the last slot is the answer-forced one
    parse_fail: Counter = field(default_factory=Counter)          # on-policy answers that did not parse
    forced_parse_fail: Counter = field(default_factory=Counter)   # forced answers that did not parse
    seconds: float = 0.0

    @property
    def n_on(self) -> int:
        """On-policy slots per group: N * rounds."""
        return self.tokens.shape[1] - int(self.forcing)

    def as_batch(self) -> Batch:
        """All G * n slots as one batch, prompt-major (row g * n + j is slot j of prompt g)."""
        n = self.tokens.shape[1]
        return self.base.repeat(n).with_tokens(rearrange(self.tokens, "g n t -> (g n) t"))


# ----------------------------------------------------------------------------------------------
# tree search (METHOD.md §6)


UNCERTAIN_BRANCHES = ("H", "Ht", "Hi")   # branch at the most uncertain slot of all / text / image


def parse_tree_schedule(text: str) -> list:
    """'0,2,H' -> [0, 2, 'H']: rl.tree_schedule's rounds. The first is 0 (fresh samples); each later
    one is an image step (int) or one of UNCERTAIN_BRANCHES. ValueError (one line) otherwise;
    config.validate turns it into a config error before any work."""
    out = []
    for x in (p.strip() for p in text.strip("[]").split(",") if p.strip()):
        if x in UNCERTAIN_BRANCHES:
            out.append(x)
            continue
        try:
            out.append(int(x))
        except ValueError:
            raise ValueError(f"--rl.tree_schedule={text!r}: {x!r} is neither an image step nor one of "
                             f"{', '.join(UNCERTAIN_BRANCHES)}; e.g. 0,2 or 0,H") from None
    if not out or out[0] != 0 or 0 in out[1:]:
        raise ValueError(f"--rl.tree_schedule={text!r}: the first round is 0 (fresh samples) and only the first, "
                         f"e.g. 0,2 or 0,H")
    return out


def parse_tree_tasks(tasks: str, schedule: str) -> tuple[str, ...]:
    """rl.tree_tasks -> the tasks that use tree search (spaces allowed: "edit, vqa"). ValueError (one
    line; config.validate makes it a config error) for a name outside RL_TASKS, or for a text-only task
    (vqa, ground) with an image-step or "Hi" round in `schedule`: with no image in the response, such a
    branch point lies past the whole plan, so the round would be N copies of its parent. Text-only
    tasks branch with "H" / "Ht" only."""
    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    bad = sorted(set(names) - set(RL_TASKS))
    if bad:
        raise ValueError(f"--rl.tree_tasks={tasks!r}: {', '.join(bad)} is not an RL task; expected a comma "
                         f"list of {', '.join(RL_TASKS)} (or empty: no tree search)")
    image_rounds = [s for s in parse_tree_schedule(schedule)[1:] if s == "Hi" or isinstance(s, int)]
    text_only = [t for t in names if t in FORCING_TASKS]
    if text_only and image_rounds:
        raise ValueError(f"--rl.tree_tasks={tasks!r} with --rl.tree_schedule={schedule!r}: {', '.join(text_only)} "
                         f"{'has' if len(text_only) == 1 else 'have'} no image to branch in (rounds "
                         f"{', '.join(map(str, image_rounds))}); branch text-only tasks with H or Ht, e.g. "
                         f"--rl.tree_schedule=0,H, or drop them from --rl.tree_tasks")
    return names


def sample_rounds(ro: RolloutContext, base: Batch, exs: list, schedule: list, lay) -> tuple[torch.Tensor, torch.Tensor, Counter]:
    """The on-policy samples of G prompts: round 0 draws N = rl.group_size from the fully masked
    canvas; each later round s of `schedule` (tree search) branches N continuations from the best
    sample so far, rebuilt at image step s (an int) or at its most uncertain step (s in H / Ht / Hi:
    branch_step over all / text / image slots). Returns (tokens (G, N * rounds, T), rewards
    (G, N * rounds), parse failures)."""
    N, G = ro.cfg.rl.group_size, len(exs)
    offset = image_step_offset(base, rollout_diffusion(ro.cfg))
    rep = [e for e in exs for _ in range(N)]                               # row g * N + i answers prompt g
    uncertain = any(isinstance(s, str) for s in schedule)                 # entropy is kept only to branch on it
    toks, orders, ents, rews, why = [], [], [], [], Counter()
    for s in schedule:
        if not toks:                                                       # round 0: fresh samples
            canvas, order, start = base.repeat(N), None, 0
            ent = torch.zeros(G * N, base.tokens.shape[1] - base.P, device=base.tokens.device) if uncertain else None
        else:                                                              # branch from the best so far
            best = torch.cat(rews, 1).argmax(1)                            # (G,)
            pick = lambda xs: torch.cat(xs, 1)[torch.arange(G), best.to(xs[0].device)]
            p_order, p_ent = pick(orders), (pick(ents) if uncertain else None)     # (G, R) the parents'
            step = branch_step(p_order, p_ent, *uncertainty_span(s, base, offset)) if isinstance(s, str) else \
                torch.full((G,), offset + s, device=p_order.device)
            state, st_order = rebuild_state(pick(toks), p_order, step, base, ro.tok)
            canvas, order, start = base.with_tokens(state).repeat(N), st_order.repeat_interleave(N, 0), int(step.min())
            ent = p_ent.repeat_interleave(N, 0) if uncertain else None     # kept slots keep their entropy
        tokens, order = policy_sample(ro, canvas, order=order, start=start,
                                      on_reveal=None if ent is None else EntropyRecorder(ent))
        r, w = score(ro, tokens, base.P, rep, lay)
        toks.append(rearrange(tokens, "(g n) t -> g n t", g=G))
        orders.append(rearrange(order, "(g n) r -> g n r", g=G))
        if uncertain:
            ents.append(rearrange(ent, "(g n) r -> g n r", g=G))
        rews.append(r.view(G, N))
        why += w
    return torch.cat(toks, 1), torch.cat(rews, 1), why


def uncertainty_span(letter: str, base: Batch, offset: int) -> tuple[torch.Tensor, int]:
    """(the response slots (R,) bool that uncertainty branch `letter` looks at, the step a row with no
    revealed slot there branches at): H all of them, Ht the plan text, Hi the image (from its first
    step, `offset`)."""
    is_img, resp = base.is_image[0, base.P:], base.is_resp[0, base.P:]
    return {"H": (resp, 0), "Ht": (resp & ~is_img, 0), "Hi": (is_img, offset)}[letter]


def branch_step(order: torch.Tensor, entropy: torch.Tensor, span: torch.Tensor, fallback: int = 0) -> torch.Tensor:
    """Uncertainty branching: the step at which each row's highest-entropy slot was revealed.
    order (B, R) the global step that revealed each slot (-1: given), entropy (B, R) nats, span (R,)
    bool: the slots to look at (plan text, image or all). Returns (B,) long; a row with no revealed
    slot in the span gets `fallback` (the span's first step: 0, or the first image step for images)."""
    score = entropy.masked_fill(~(span[None] & (order >= 0)), float("-inf"))     # (B, R)
    slot = score.argmax(1)                                                       # (B,)
    step = order.gather(1, slot[:, None]).squeeze(1)
    return torch.where(torch.isinf(score.amax(1)), torch.full_like(step, fallback), step)


class EntropyRecorder:
    """diffusion.sample's on_reveal hook for uncertainty branching: writes into `entropy` (B, R) the
    entropy H = -sum p log p (nats) of the distribution each revealed slot was sampled from (0 when
    greedy); slots never revealed keep what they had."""

    def __init__(self, entropy: torch.Tensor):
        self.entropy = entropy

    def __call__(self, blk: slice, reveal: torch.Tensor, logits: torch.Tensor, temp: float):
        logp = (logits / temp).log_softmax(-1) if temp > 0 else None
        h = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1) if logp is not None else \
            torch.zeros(reveal.shape, device=reveal.device)
        self.entropy[:, blk] = torch.where(reveal, h.to(self.entropy.dtype), self.entropy[:, blk])


# ----------------------------------------------------------------------------------------------
# answer-forcing (METHOD.md §5)


def answer_forcing(ro: RolloutContext, base: Batch, exs: list, r_on: torch.Tensor, lay):
    """Answer-forcing for one task's groups, whole: the coin (one per group, probability rl.af_prob),
    the join rule (join_forced), and the forced samples of the joining groups only, inpainted on
    force_answer's canvas and scored. base (G, T) prompts, r_on (G, n) on-policy rewards.
    Returns (joins (G,) bool, tokens (G, T) the forced sample where it joins, else base's canvas,
    rewards (G,) 0 where it does not join, parse failures of the forced samples)."""
    rc, G, gen = ro.cfg.rl, len(exs), ro.generator
    coin = torch.rand(G, generator=gen, device=gen.device).cpu() < rc.af_prob                # the coin
    joins = join_forced(r_on, coin, rc.tau, rc.af_mode)                                       # the rule
    t_f, r_f, why = base.tokens.clone(), torch.zeros(G), Counter()    # placeholders: never members
    idx = joins.nonzero().squeeze(1)
    if len(idx):
        canvas, forbid = force_answer(base.rows(idx.to(base.tokens.device)), [exs[g] for g in idx.tolist()], ro.tok, lay)
        tokens, _ = policy_sample(ro, canvas, forbid=forbid)
        r_f[idx], why = score(ro, tokens, base.P, [exs[g] for g in idx.tolist()], lay)
        t_f[idx.to(t_f.device)] = tokens
    return joins, t_f, r_f, why


def join_forced(r: torch.Tensor, coin: torch.Tensor, tau: float, mode: str) -> torch.Tensor:
    """Answer-forcing's join rule (METHOD.md §5): r (G, n) on-policy rewards, coin (G,) bool ->
    (G,) bool, the forced sample joins the group. "failed_groups": the coin landed and every
    on-policy reward is below tau; "all_groups": the coin landed."""
    return coin & (r < tau).all(1) if mode == "failed_groups" else coin


def force_answer(batch: Batch, examples, tok, layout) -> tuple[Batch, torch.Tensor]:
    """Answer-forcing's canvas: the text region all [MASK] except '<answer> z* </answer>' at its end.
    Returns (canvas (B, T), forbid (B, V) bool: the answer tags, banned from the masked slots)."""
    t = batch.tokens.clone()
    end = batch.P + layout.R_text
    for b, ex in enumerate(examples):
        ans = answer_ids(ex, tok)
        t[b, end - len(ans):end] = torch.tensor(ans)
    forbid = torch.zeros(len(examples), tok.vocab_size, dtype=torch.bool, device=t.device)
    forbid[:, [tok.ANS, tok.EANS]] = True
    return batch.with_tokens(t), forbid


# ----------------------------------------------------------------------------------------------
# the policy's sampler and the reward


def policy_sample(ro: RolloutContext, canvas: Batch, order=None, start: int = 0, forbid=None, on_reveal=None):
    """pi_theta: fill `canvas` (B, T) with the rollout sampler (temperature rl.temperature on text and
    image slots, rollout_diffusion's schedule). order / start continue a rebuilt state (tree search);
    forbid (B, V) bans ids from the masked slots; on_reveal: diffusion.sample's hook (EntropyRecorder).
    Returns (tokens (B, T), order (B, R))."""
    with ro.autocast:
        return sample(ro.model, canvas, ro.tok, rollout_diffusion(ro.cfg), temperature=ro.cfg.rl.temperature,
                      image_temperature=ro.cfg.rl.temperature, generator=ro.generator, order=order,
                      start_step=start, forbid=forbid, on_reveal=on_reveal)


def rollout_diffusion(cfg):
    """The sampler settings of the RL policy: cfg.diffusion with rl.tokens_per_step text tokens per
    step when that is set (> 0), and never classifier-free guidance: the rollouts must come from
    pi_theta itself, the model that log pi (likelihood.py) scores, or the update of Eq. U would be
    off-policy with no correction. diffusion.cfg_scale guides evaluation only. The rollouts and pass@k
    (metrics.pass_at_k_metrics: what RL could reach by sharpening this policy) sample with it."""
    rc, dcfg = cfg.rl, cfg.diffusion
    return replace(dcfg, tokens_per_step=rc.tokens_per_step if rc.tokens_per_step > 0 else dcfg.tokens_per_step,
                   cfg_scale=0.0)


def score(ro: RolloutContext, tokens: torch.Tensor, P: int, exs: list, lay) -> tuple[torch.Tensor, Counter]:
    """Rewards (B,) of sampled rows `tokens` (B, T) whose response starts at P, row b answering
    exs[b], and the count of the reasons a text did not parse (rewards.score_rows; "ok" not counted)."""
    r, why, _, _ = score_rows(exs[0].task, exs, tokens[:, P:P + lay.R].cpu(), lay, ro.tok, ro.judge)
    return torch.tensor(r, dtype=torch.float32), Counter(w for w in why if w != "ok")
