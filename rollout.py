"""
Rollouts for the unified RL step: groups of on-policy samples, answer-forcing, tree search, and
the advantages of Eq. (A). The rollout side of LaViDa-R1 (arXiv 2602.14147), METHOD.md §4-§6:

  groups          N samples per prompt. Every prompt and sample of a task is pushed through the
                  sampler in ONE batched call (rows = prompts x samples), never a Python loop over
                  samples.
  answer-forcing  (METHOD.md §5; the tasks with a ground-truth answer: vqa, ground). A coin with
                  probability af_prob is flipped per group first; where it lands, sample N+1 is
                  drawn from the canvas "[M] ... [M] <answer> z* </answer>": the ground-truth answer
                  block fixed at the end of the text region and the reasoning inpainted by the same
                  sampler (it never changes a fixed token). It joins the group (N+1 members) when
                  every one of the N on-policy samples scores below tau. The paper's "10%" has two readings (METHOD.md §9):
                  af_mode="failed_groups" (default, reading 1: p applies to all-failed groups) or
                  "all_groups" (reading 2: a fraction p of all groups).
  tree search     (METHOD.md §6; real-valued rewards: edit). Round 0 draws N samples from the fully
                  masked canvas; each later round takes the best sample so far (argmax over ALL
                  samples so far: the paper does not say; this is the simplest reading), rebuilds
                  its state at image step s from its final tokens and recorded unmasking order alone
                  (diffusion.rebuild_state: no intermediate tensors are kept), and samples N
                  continuations from there. rl.tree_schedule = "0,8" means rounds at steps [0, 8].
  advantages      A = gamma * A_distill + (1 - gamma) * A_GRPO (Eq. A), over each whole group:
                  A_GRPO = (r - mean) / (std + 1e-4) (std division is standard GRPO; the paper does
                  not say, so rl.adv_std=False gives the mean-only Dr.-GRPO form), A_distill = 1 for
                  the best sample. Reading taken: no distillation target when the best reward is 0
                  (imitating a failed sample cannot be what self-distillation means).

Each task's stats (the RL log) also carry what the ablation studies (study.py) read: the
on-policy unparsable-answer rate, whether each forced vqa sample's inpainted reasoning implies the
answer it was forced to end in (rewards.trace_answer), and for tree search the best reward of each
round and the diversity of its samples (pairwise_hamming).

Exercise: python -m pytest tests/test_rollout.py -q
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from einops import rearrange

from config import parse_int_list, parse_task_values
from data import Batch, answer_ids, cat_batches, collate
from diffusion import image_step_offset, rebuild_state, sample
from rewards import normalise, score_rows, trace_answer


@dataclass
class Rollouts:
    """All samples of one task in one RL step, flattened to rows, ready for the update."""
    task: str
    batch: Batch                   # (M, T) rows: prompt + sampled response, in the shared layout
    adv: torch.Tensor              # (M,) advantage of each row (0 = no gradient)
    rewards: torch.Tensor          # (G, n_members) rewards per group member (forced member last)
    stats: dict = field(default_factory=dict)


def rewards_differ(r: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """(G, n) rewards, (G, n) membership -> (G,) bool: the group's members do not all score the same,
    i.e. GRPO has a signal there (the paper's "vanishing advantage" is the False case)."""
    return r.masked_fill(~member, float("-inf")).amax(1) > r.masked_fill(~member, float("inf")).amin(1)


def pairwise_hamming(t: torch.Tensor) -> float:
    """Diversity of the samples of each group: t (G, N, L) token ids -> the mean over groups and
    over pairs i != j of the share of the L positions where samples i and j differ (0 = N copies)."""
    G, N, _ = t.shape
    if N < 2:
        return 0.0
    diff = (t[:, :, None, :] != t[:, None, :, :]).float().mean(-1)               # (G, N, N), 0 on the diagonal
    return (diff.sum() / (G * N * (N - 1))).item()


def advantages(r: torch.Tensor, member: torch.Tensor, gamma: float, use_std: bool = True) -> torch.Tensor:
    """Eq. A on groups. r: (G, n) rewards; member: (G, n) bool, False = not in the group (an unused
    answer-forcing slot). Returns A (G, n), zero outside the group."""
    cnt = member.sum(1, keepdim=True).clamp(min=1)
    mean = (r * member).sum(1, keepdim=True) / cnt
    var = (((r - mean) ** 2) * member).sum(1, keepdim=True) / cnt
    a_grpo = r - mean
    if use_std:
        a_grpo = a_grpo / (var.sqrt() + 1e-4)
    masked_r = r.masked_fill(~member, float("-inf"))
    # equal rewards carry no GRPO signal: exactly 0 (the float mean of e.g. seven 0.3s is an ulp off,
    # and / (std + 1e-4) would blow that residue up to ~3e-4 and keep the rows as "nonzero")
    a_grpo = a_grpo * rewards_differ(r, member)[:, None]
    best = masked_r.argmax(1)                                          # first argmax of each group
    a_dist = torch.zeros_like(r)
    has_win = masked_r.max(1).values > 0                               # no target in all-failed groups
    a_dist[torch.arange(len(r)), best] = has_win.float()
    return (gamma * a_dist + (1 - gamma) * a_grpo) * member


def rollout_diffusion(cfg):
    """The sampler settings of the RL policy: cfg.diffusion with rl.tokens_per_step text tokens per
    step when that is set (> 0). The rollouts and pass@k (metrics.pass_at_k_metrics) sample with it."""
    rc = cfg.rl
    return cfg.diffusion if rc.tokens_per_step <= 0 else replace(cfg.diffusion, tokens_per_step=rc.tokens_per_step)


def rft_advantages(r: torch.Tensor, member: torch.Tensor, accept: float) -> torch.Tensor:
    """Rejection-sampling fine-tuning, the baseline arm (rl.advantage = "rft"): A = 1 for every group
    member whose reward reaches `accept`, 0 for the rest, so the update is SFT on the accepted samples
    (no baseline subtracted, no push away from the rejected ones). r, member: (G, n) -> A (G, n)."""
    return ((r >= accept) & member).float()


def join_forced(r: torch.Tensor, t: torch.Tensor, r_f: torch.Tensor, t_f: torch.Tensor, coin: torch.Tensor,
                tau: float, mode: str):
    """Answer-forcing's membership rule (METHOD.md §5). Appends the forced sample as the last slot of
    every group; it is a member where the coin landed and, in mode "failed_groups", every on-policy
    reward is below tau ("all_groups": wherever the coin landed). r: (G, n) rewards, t: (G, n, T)
    tokens, r_f: (G,), t_f: (G, T) the forced samples, coin: (G,) bool. Returns (r (G, n+1),
    t (G, n+1, T), member (G, n+1) bool, fired (G,) bool). A group without a forced sample holds a
    placeholder there that is never a member, so its advantage is 0 and it never reaches the update."""
    fired = coin & (r < tau).all(1) if mode == "failed_groups" else coin
    member = torch.cat([torch.ones_like(r, dtype=torch.bool), fired[:, None]], 1)
    return torch.cat([r, r_f[:, None]], 1), torch.cat([t, t_f[:, None]], 1), member, fired


def group_stats(r: torch.Tensor, member: torch.Tensor, adv: torch.Tensor, fired: torch.Tensor,
                forcing: bool, tau: float) -> dict:
    """What the RL log reports about one task's groups. r, member, adv: (G, n) with the forced slot
    last when `forcing`; fired: (G,) bool, the forced sample joined the group."""
    on = r[:, :r.shape[1] - int(forcing)]                                 # the on-policy samples
    return {
        "reward": on.mean().item(),
        "nonzero_adv_frac": (adv.abs().sum(1) > 0).float().mean().item(),
        # groups with a GRPO signal; nonzero_adv_frac is ~1 whenever anything succeeds, since
        # A_distill marks a best sample
        "grpo_nonzero_frac": rewards_differ(r, member).float().mean().item(),
        "all_failed_frac": (on < tau).all(1).float().mean().item(),
        "af_fired": int(fired.sum()),
        "members": int(member.sum()),
    }


def force_answer(batch: Batch, examples, tok, layout) -> Batch:
    """Answer-forcing canvas: the text region all [MASK] except '<answer> z* </answer>' at its end."""
    t = batch.tokens.clone()
    P = batch.P
    for b, ex in enumerate(examples):
        ans = answer_ids(ex, tok)
        end = P + layout.R_text
        t[b, end - len(ans):end] = torch.tensor(ans)
    return batch.with_tokens(t)


@torch.no_grad()
def rollout_task(model, bundle, task: str, idx: list[int], cfg, device, autocast, vq,
                 generator: torch.Generator, split: str = "rl") -> Rollouts:
    """Sample, score and weight the groups of one task for the prompts `idx` of `split`."""
    rc, tok = cfg.rl, bundle.tok
    ts = bundle.sets[task][split]
    lay, N, G = ts.layout, rc.group_size, len(idx)
    exs = [ts.examples[i] for i in idx]
    base = collate({task: ts}, [(task, i) for i in idx], tok, responses=False).to(device)   # (G, T)
    P = base.P
    forcing = task in ("vqa", "ground") and rc.af_prob > 0
    tree = task in rc.tree_tasks.split(",")
    schedule = parse_int_list(rc.tree_schedule, "rl.tree_schedule") if tree else [0]
    t0, reasons, dcfg = time.time(), Counter(), rollout_diffusion(cfg)

    def run(canvas: Batch, order=None, start=0):
        with autocast:
            return sample(model, canvas, tok, dcfg, temperature=rc.temperature,
                          image_temperature=rc.temperature, generator=generator, order=order, start_step=start)

    def score(tokens, row_exs: list, on_policy: bool = True) -> torch.Tensor:
        """Rewards (len(row_exs),) of sampled rows, row b answering row_exs[b]; the parse failures
        of on-policy rows are counted in `reasons` (forced rows carry a fixed, parsable answer)."""
        r, why, _, _ = score_rows(task, row_exs, tokens[:, P:P + lay.R].cpu(), lay, tok, vq.decode, cfg.data.grid)
        if on_policy:
            reasons.update(why)
        return torch.tensor(r, dtype=torch.float32)

    # answer-forcing's coin comes first: the forced sample can join only where it lands (both
    # af_modes), so only those groups' forced rows are sampled, not all G of them
    coin = (torch.rand(G, generator=generator, device=generator.device).cpu() < rc.af_prob if forcing
            else torch.zeros(G, dtype=torch.bool))
    f_idx = coin.nonzero().squeeze(1)                                              # (F,) groups with a forced row

    # round 0: G*N on-policy rows, plus the F answer-forced rows in the same sampler call
    canvas = base.repeat(N)                                                        # (G*N, T)
    if len(f_idx):
        forced = force_answer(base.rows(f_idx), [exs[g] for g in f_idx.tolist()], tok, lay)
        canvas = cat_batches([canvas, forced], tok)                                # (G*N + F, T)
    tokens, order = run(canvas)
    # rows are prompt-major: row g*N + i is sample i of prompt g
    toks = [rearrange(tokens[:G * N], "(g n) t -> g n t", g=G)]
    orders = [rearrange(order[:G * N], "(g n) r -> g n r", g=G)]
    rews = [score(tokens[:G * N], [e for e in exs for _ in range(N)]).view(G, N)]
    round_means = [rews[0].mean().item()]

    # tree search: each later round branches N continuations from the best sample so far
    offset = image_step_offset(base, dcfg)
    for s in schedule[1:]:
        all_r, all_t, all_o = torch.cat(rews, 1), torch.cat(toks, 1), torch.cat(orders, 1)
        best = all_r.argmax(1)                                                     # (G,)
        ar = torch.arange(G)
        state, st_order = rebuild_state(all_t[ar, best], all_o[ar, best], offset + s, base, tok)
        branch = base.with_tokens(state).repeat(N)                                 # (G*N, T)
        tokens_s, order_s = run(branch, st_order.repeat_interleave(N, 0), offset + s)
        toks.append(rearrange(tokens_s, "(g n) t -> g n t", g=G))
        orders.append(rearrange(order_s, "(g n) r -> g n r", g=G))
        rews.append(score(tokens_s, [e for e in exs for _ in range(N)]).view(G, N))
        round_means.append(rews[-1].mean().item())

    r_on = torch.cat(rews, 1)                                                      # (G, N*k)
    t_on = torch.cat(toks, 1)                                                      # (G, N*k, T)
    member, fired = torch.ones_like(r_on, dtype=torch.bool), torch.zeros(G, dtype=torch.bool)
    if forcing:
        r_f, t_f = torch.zeros(G), base.tokens.clone()         # placeholders where no forced row was drawn
        r_f[f_idx] = score(tokens[G * N:], [exs[g] for g in f_idx.tolist()], on_policy=False)
        t_f[f_idx] = tokens[G * N:]
        r_on, t_on, member, fired = join_forced(r_on, t_on, r_f, t_f, coin, rc.tau, rc.af_mode)
    if rc.advantage == "rft":
        adv = rft_advantages(r_on, member, parse_task_values(rc.rft_accept, "rl.rft_accept")[task])
    else:
        adv = advantages(r_on, member, rc.gamma, rc.adv_std)                       # (G, n), Eq. A
    n = r_on.shape[1]
    flat_adv = adv.reshape(-1)
    rows = base.repeat(n).with_tokens(rearrange(t_on, "g n t -> (g n) t"))
    keep = flat_adv != 0                                         # zero-advantage rows carry no gradient
    stats = group_stats(r_on, member, adv, fired, forcing, rc.tau)
    n_fail = sum(v for k, v in reasons.items() if k != "ok")
    stats.update(rollout_s=time.time() - t0, parse_fail={k: v for k, v in reasons.items() if k != "ok"},
                 unparsable_frac=n_fail / max(1, sum(reasons.values())))
    if len(f_idx):
        stats["forced_reward"] = r_f[f_idx].mean().item()
        if task == "vqa":     # does the inpainted reasoning imply the answer it was forced to end in?
            texts = [tok.decode(row[P:P + lay.R_text]) for row in tokens[G * N:].cpu()]
            stats["forced_consistent"] = sum(
                trace_answer(x, exs[g].qtype) == normalise(exs[g].answer) for x, g in zip(texts, f_idx.tolist())
            ) / len(f_idx)
    stats["forced_rows"] = len(f_idx)
    # tree search's rounds (the tree study): round_reward / round_max are k floats, the mean over the
    # G prompts of the round's mean / best reward; round_hamming the mean over prompts of the pairwise
    # Hamming distance (share of differing positions) between the round's N samples
    if tree:
        stats.update(round_reward=round_means, round_max=[r.amax(1).mean().item() for r in rews],
                     # diversity of the pictures when the task draws one (the plan text is shared by
                     # every child of a branch), else of the text
                     round_hamming=[pairwise_hamming(t[:, :, P + lay.R_text:P + lay.R] if lay.n_img
                                                     else t[:, :, P:P + lay.R_text]) for t in toks])
    return Rollouts(task, rows.rows(keep.nonzero().squeeze(1)), flat_adv[keep], r_on, stats)

