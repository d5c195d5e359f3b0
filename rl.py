"""
The unified SFT-regularised multi-task RL step of LaViDa-R1 (arXiv 2602.14147, METHOD.md §4).

Every training signal is one weighted log-likelihood,

    J(theta) = (1/N) sum_i A_i * log pi_theta(y_i | x_i)                                    (Eq. U)

and each step concatenates (x, y, A) triplets from
  (i)  an SFT batch of the traced pool, A = 1                        (the regulariser)
  (ii) on-policy rollouts of several tasks, A = gamma * A_distill + (1 - gamma) * A_GRPO   (Eq. A)
       with answer-forcing on vqa/ground and tree search on edit (rollout.py).
log pi is the complementary-masking estimate (METHOD.md §7, likelihood.py; rl.likelihood switches it for
the ablations). The loss minimised is -J. No KL term and no reference model: `--rl.kl_coef > 0`
passes a frozen copy and adds the k3 KL on the same masks, for the ablation only.

Readings of the paper's unknowns (METHOD.md §9), config fields or fixed choices:
  * on-policy, one gradient step per batch of fresh rollouts: no importance ratio, no clipping
    (--rl.ppo_epochs=1); --rl.ppo_epochs > 1 takes more steps per batch with the PPO-clipped ratio
    on the same masks (Eq. PPO, --rl.clip_eps), formed on the raw per-token log-probs
  * N in Eq. U counts every triplet of the step (SFT rows + all group members) on every rank, so
    zero-advantage rows dilute the step exactly as the formula says; they are not run through the
    model (except under --rl.kl_coef > 0, whose KL covers every sampled row)
  * SFT rows per step (--rl.sft_rows) and the task mix (--rl.task_mix) are ours to choose
  * sum over tokens for log pi (--rl.logp_norm=sum | mean); one t1 per sample, or one for the whole
    step with --rl.shared_t (every micro-batch and rank)

The file reads top-down: rl_step (ONE step, whole: prompts -> groups -> advantages -> triplets ->
update), the advantages (Eq. G, D, A), the triplets with their N, and policy_update (-J with the 1/N
of Eq. U -> optimizer steps) with unified_loss, its PPO-clipped form and the KL. The stage around it
(resume, the loop, the log, checkpoints, quick evals) is train.run_rl.

Run it: python train.py --preset=toy --stage=rl   (starts from out_dir/ckpt_sft.pt)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

import likelihood as LK
from rollout import Groups, RolloutContext, sample_groups
from tokens import RL_TASKS, Batch, cat_batches, collate, parse_task_values

# ----------------------------------------------------------------------------------------------
# one RL step


def rl_step(ro: RolloutContext, opt, ctx, draws: dict, sft, pick: torch.Generator, ref=None) -> Step:
    """One RL step of METHOD.md §4, whole. ro: the rollout context (the policy ro.model, the data, the
    judge, the configs, the sampling generator); opt: the policy's optimizer; ctx: the run's device
    and ranks (common.Ctx: autocast, all_sum, average_gradients); draws: prompts per task ({task: k});
    sft: the sampler of the SFT rows (A = 1; data.TaskSampler); pick: the prompt picker's generator;
    ref: the frozen reference of the KL ablation (None: the paper's objective)."""
    t0 = time.time()
    ro.model.eval()                              # no dropout, in sampling and in the update alike
    groups = []
    for task, k in draws.items():
        idx = torch.randperm(len(ro.sets[task]["rl"]), generator=pick)[:k].tolist()      # prompts
        # -> groups: N samples per prompt (tree search on rl.tree_tasks), answer-forcing, rewards
        groups.append(sample_groups(ro, task, idx))
    advs = [group_advantages(g, ro.cfg.rl) for g in groups]              # Eq. G, D, A
    trip = triplets(groups, advs, ro, sft)                               # (x, y, A) and N of Eq. U
    t_roll = time.time() - t0
    upd = policy_update(ro, opt, trip, ctx, ref)                         # -J -> mu optimizer steps
    return Step(groups, advs, trip, upd, t_roll, time.time() - t0 - t_roll)


@dataclass
class Step:
    """One RL step's parts, for the log (train.step_record), the studies and the benchmarks."""
    groups: list[Groups]
    advs: list[torch.Tensor]       # (G, n) per task
    trip: Triplets
    update: Update
    rollout_s: float
    update_s: float


# ----------------------------------------------------------------------------------------------
# advantages (Eq. G, D, A): one number per group member, from the group's rewards alone


def group_advantages(g: Groups, rc) -> torch.Tensor:
    """A (G, n) of one task's groups by rl.advantage: Eq. A, or RFT's 0/1 at rl.rft_accept."""
    if rc.advantage == "rft":
        return rft_advantages(g.rewards, g.member, parse_task_values(rc.rft_accept, "rl.rft_accept", RL_TASKS)[g.task])
    return advantages(g.rewards, g.member, rc.gamma, rc.adv_std)


def advantages(r: torch.Tensor, member: torch.Tensor, gamma: float, use_std: bool = True) -> torch.Tensor:
    """Eq. A on groups. r: (G, n) rewards; member: (G, n) bool, False = not in the group (an unjoined
    answer-forcing slot). Returns A (G, n), zero outside the group.
        A_GRPO    = (r - mean) / (std + 1e-4)         (Eq. G; population std over the members; the
                    paper does not say, rl.adv_std = False gives the mean-only Dr.-GRPO form)
        A_distill = 1 for the best member, 0 else     (Eq. D; first argmax; no target when the best
                    reward is 0: imitating a failed sample cannot be what self-distillation means)
        A         = gamma * A_distill + (1 - gamma) * A_GRPO                                  (Eq. A)"""
    cnt = member.sum(1, keepdim=True).clamp(min=1)
    mean = (r * member).sum(1, keepdim=True) / cnt
    var = (((r - mean) ** 2) * member).sum(1, keepdim=True) / cnt
    a_grpo = r - mean
    if use_std:
        a_grpo = a_grpo / (var.sqrt() + 1e-4)
    # equal rewards carry no GRPO signal: exactly 0 (the float mean of e.g. seven 0.3s is an ulp off,
    # and / (std + 1e-4) would blow that residue up to ~3e-4 and keep the rows as "nonzero")
    a_grpo = a_grpo * rewards_differ(r, member)[:, None]
    masked_r = r.masked_fill(~member, float("-inf"))
    a_dist = torch.zeros_like(r)
    has_win = masked_r.max(1).values > 0                               # no target in all-failed groups
    a_dist[torch.arange(len(r)), masked_r.argmax(1)] = has_win.float()
    return (gamma * a_dist + (1 - gamma) * a_grpo) * member


def rewards_differ(r: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """(G, n) rewards, (G, n) membership -> (G,) bool: the group's members do not all score the same,
    i.e. GRPO has a signal there (the paper's "vanishing advantage" is the False case)."""
    return r.masked_fill(~member, float("-inf")).amax(1) > r.masked_fill(~member, float("inf")).amin(1)


def rft_advantages(r: torch.Tensor, member: torch.Tensor, accept: float) -> torch.Tensor:
    """Rejection-sampling fine-tuning, the baseline arm (rl.advantage = "rft"): A = 1 for every group
    member whose reward reaches `accept`, 0 for the rest, so the update is SFT on the accepted samples
    (no baseline subtracted, no push away from the rejected ones). r, member: (G, n) -> A (G, n)."""
    return ((r >= accept) & member).float()


# ----------------------------------------------------------------------------------------------
# the triplets of Eq. U and their N


@dataclass
class Triplets:
    """The step's (x, y, A) triplets of Eq. (U) on this rank. Only rows with A != 0 are kept (the
    others add nothing to J and are not run through the model), but N counts them all. Under the
    KL ablation (rl.kl_coef > 0) every group member is kept: the KL penalises every sampled row,
    whatever its advantage."""
    batch: Batch | None          # (M, T) the kept rows: SFT rows first, then rollout rows; None if M = 0
    adv: torch.Tensor              # (M,) their advantages (1 for SFT rows)
    n: int                         # N of Eq. U on this rank: SFT rows + every group member of the step


def triplets(groups: list[Groups], advs: list[torch.Tensor], ro: RolloutContext, sft) -> Triplets:
    """rl.sft_rows SFT rows with A = 1, then every group member with A != 0 (advs[i]: (G, n) of
    groups[i]), or every group member when rl.kl_coef > 0 (the KL term needs them all). N counts
    every triplet of the step, zero-advantage group members included."""
    rc, tok, dev, parts, kept = ro.cfg.rl, ro.tok, ro.device, [], []
    if rc.sft_rows:
        parts.append(collate({k: v["sft"] for k, v in ro.sets.items()}, sft.draw(rc.sft_rows), tok).to(dev))
        kept.append(torch.ones(rc.sft_rows, device=dev))
    for g, a in zip(groups, advs):
        keep = ((a.reshape(-1) != 0) | (rc.kl_coef > 0) & g.member.reshape(-1).to(a.device)
                ).nonzero().squeeze(1)                                     # prompt-major slots kept
        if len(keep):
            parts.append(g.as_batch().rows(keep.to(dev)))
            kept.append(a.reshape(-1)[keep].to(dev))
    n = rc.sft_rows + sum(int(g.member.sum()) for g in groups)
    if not parts:
        return Triplets(None, torch.zeros(0, device=dev), n)
    return Triplets(cat_batches(parts, tok), torch.cat(kept), n)


# ----------------------------------------------------------------------------------------------
# the update: -J of Eq. U (or its PPO-clipped form, + the KL ablation) -> optimizer steps


def policy_update(ro: RolloutContext, opt, trip: Triplets, ctx, ref=None) -> Update:
    """rl.ppo_epochs optimizer steps on the triplets (1 = the paper's on-policy update). Each epoch
    runs backward on -sum_i A_i log pi_i per micro-batch, then divides the summed gradients by N, so
    that they are those of -J = -(1/N) sum (Eq. U): N summed over micro-batches AND ranks, as SFT does.
    The masks of each micro-batch are drawn once and kept for every epoch, so old and new policy are
    compared on the same masks (d1's diffu-GRPO). A step without a single row on any rank makes no
    update (no AdamW momentum or weight-decay step), on one process and under DDP alike; a
    non-finite gradient norm skips the update and the remaining epochs."""
    model, rc, mb_size, gen = ro.model, ro.cfg.rl, ro.cfg.train.micro_batch, ro.generator
    # the policy is scored as it sampled, in eval mode: with --model.dropout > 0 (an SFT regulariser)
    # a train-mode pass would score another network than the one that drew the rollouts, and the old
    # policy, the new one and the reference would each see other dropout masks (rho != 1, KL != 0)
    model.eval()
    if ctx.all_sum(float(len(trip.adv))) == 0:
        return Update(skipped="no rows")
    N = ctx.all_sum(float(trip.n))                                         # N of Eq. U, every rank's
    t1 = None
    if rc.shared_t:       # one t1 for the whole step: each rank draws one (its stream stays aligned
                          # with the run's), rank 0's is used on every rank
        t1 = ctx.from_rank0(float(torch.rand(1, generator=gen, device=gen.device)))
    micro = [(torch.arange(lo, min(lo + mb_size, len(trip.adv)), device=ro.device),
              int(torch.randint(2**62, (1,), generator=gen, device=gen.device)))     # (rows, mask seed)
             for lo in range(0, len(trip.adv), mb_size)]
    olds = [None] * len(micro)
    if rc.ppo_epochs > 1:
        with torch.no_grad(), ctx.autocast:
            olds = [token_terms(model, trip.batch.rows(rows), ro.tok, rc, seed, t1).logp for rows, seed in micro]
    for _ in range(rc.ppo_epochs):
        out = Update()
        for (rows, seed), old in zip(micro, olds):
            mb = trip.batch.rows(rows)
            with ctx.autocast:
                loss, terms, kl, clipped = unified_loss(model, mb, trip.adv[rows], ro.tok, rc, seed, old, ref, t1)
            loss.backward()                                                 # the numerator of -J
            out.loss += loss.item()
            out.parts.append((terms.detach(), None if kl is None else kl.detach(), clipped,
                              mb.is_image[:, mb.P:mb.P + terms.logp.shape[2]]))
        ctx.average_gradients(model)                                        # the mean over ranks ...
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(ctx.world / max(N, 1.0))                        # ... x world / N: grad of -J (Eq. U)
        out.loss = ctx.all_sum(out.loss) / max(N, 1.0)
        out.grad = torch.nn.utils.clip_grad_norm_(model.parameters(), ro.cfg.train.grad_clip).item()
        # after the all-reduce the norm is the same on every rank, so every rank decides alike
        if not math.isfinite(out.grad):
            out.skipped = "non-finite " + ("loss" if not math.isfinite(out.loss) else "gradient norm")
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if out.skipped:
            break
    return out


@dataclass
class Update:
    """What policy_update did: -J summed over the step (the last epoch), the gradient norm, why it
    skipped the update (None: it stepped), and per micro-batch the detached per-term quantities the
    log reports (train.step_record)."""
    loss: float = 0.0
    grad: float = 0.0
    skipped: str | None = None     # "no rows" | "non-finite <term>" | None
    parts: list = field(default_factory=list)      # per micro-batch: (terms, kl or None, clipped or None,
                                                   # is_image (M, R))


def unified_loss(model, batch: Batch, adv: torch.Tensor, tok, rc, seed: int, logp_old: torch.Tensor | None = None,
                 ref_model=None, t1: float | None = None) -> tuple[torch.Tensor, LK.Terms, torch.Tensor | None, torch.Tensor | None]:
    """-(sum_i A_i log pi^(y_i|x_i)) on the rows of `batch` (A: (M,)), the numerator of -J (Eq. U):
    policy_update divides by N once, over every micro-batch and rank. With logp_old (D, M, R), the
    old policy's raw terms on the same masks (rl.ppo_epochs > 1), the clipped surrogate replaces
    A_i log pi_i. With ref_model, + rl.kl_coef * sum_i KL_i (k3 per term, weighted like log pi).
    t1: the step's shared masking rate (rl.shared_t), else None. Returns (loss, the policy's terms,
    the k3 terms or None, the active-clip mask or None)."""
    terms = token_terms(model, batch, tok, rc, seed, t1)                            # (D, M, R)
    if logp_old is None:
        J, clipped = (adv * terms.seq()).sum(), None                                # Eq. U, numerator
    else:
        J, clipped = clipped_objective(terms, logp_old, adv, rc.clip_eps)           # Eq. PPO
    loss, kl = -J, None
    if ref_model is not None:
        with torch.no_grad():
            ref = token_terms(ref_model, batch, tok, rc, seed, t1)                  # the same masks
        kl = k3_kl(terms, ref)
        loss = loss + rc.kl_coef * (terms.weight * kl).sum()
    return loss, terms, kl, clipped


def token_terms(model, batch: Batch, tok, rc, seed: int, t1: float | None = None) -> LK.Terms:
    """log pi^(y|x) of every row as rl.likelihood's per-token terms (METHOD.md §7). The masks come
    from `seed` (and the step's shared masking rate t1 under rl.shared_t) alone, so two calls with the
    same seed (old and new policy, or the policy and a reference) score the same masked slots."""
    g = torch.Generator(device=batch.tokens.device).manual_seed(seed)
    return LK.estimate(rc.likelihood, model, batch, tok, n=rc.n_mc, generator=g, norm=rc.logp_norm,
                       shared_t=rc.shared_t, p_prompt=rc.p_prompt, t1=t1)


def clipped_objective(terms: LK.Terms, logp_old: torch.Tensor, adv: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The PPO-clipped surrogate of sum_i A_i log pi_i (Eq. PPO), per term of the estimate as d1's
    diffu-GRPO does, with the ratio formed on the policy's RAW per-token log-probs, before the
    estimator's weight w (L/k, 2/n, 1/L) is applied:
        sum_{i,d,k} w_idk * min(rho_idk A_i, clip(rho_idk, 1 - eps, 1 + eps) A_i),
        rho_idk = exp(logp_idk - logp_old_idk)
    so the trust region is the same for every estimator and normalisation. logp_old (D, M, R);
    adv (M,). At rho = 1 its gradient is sum_i A_i grad log pi^_i, the gradient of Eq. U's numerator.
    Returns (the surrogate, a scalar; clipped (D, M, R) bool: the scored terms whose clip is active)."""
    rho = torch.exp(terms.logp - logp_old)
    a = adv[None, :, None]
    unclipped, clipped = rho * a, rho.clamp(1 - eps, 1 + eps) * a
    active = (clipped < unclipped) & terms.scored                       # min() picks the clipped term
    return (terms.weight * torch.minimum(unclipped, clipped)).sum(), active


def k3_kl(terms: LK.Terms, ref: LK.Terms) -> torch.Tensor:
    """The k3 estimate of KL(pi || pi_ref) per term (Schulman's exp(d) - d - 1 >= 0, d = log p_ref -
    log p), on the raw per-token log-probs of the same masks: (D, M, R), 0 where unscored."""
    d = (ref.logp - terms.logp) * terms.scored
    return (torch.exp(d) - d - 1) * terms.scored
