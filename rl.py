"""
Stage 2: the unified SFT-regularised multi-task RL loop of LaViDa-R1 (arXiv 2602.14147, METHOD.md §4).

Every training signal is one weighted log-likelihood,

    J(theta) = (1/N) sum_i A_i * log pi_theta(y_i | x_i)                                    (Eq. U)

and each step concatenates (x, y, A) triplets from
  (i)  an SFT batch of the traced pool, A = 1                        (the regulariser)
  (ii) on-policy rollouts of several tasks, A = gamma * A_distill + (1 - gamma) * A_GRPO   (Eq. A)
       with answer-forcing on vqa/ground and tree search on edit (rollout.py).
log pi is the complementary-masking estimate (METHOD.md §7, likelihood.py; rl.likelihood switches it for
the ablations). The loss minimised is -J. No KL term and no reference model: `--rl.kl_coef > 0`
loads a frozen copy and adds the k3 KL on the same masks, for the ablation only.

Readings of the paper's unknowns (METHOD.md §9), config fields or fixed choices:
  * on-policy, one gradient step per batch of fresh rollouts: no importance ratio, no clipping
    (--rl.ppo_epochs=1); --rl.ppo_epochs > 1 takes more steps per batch with the PPO-clipped ratio
    on the same masks (Eq. PPO, --rl.clip_eps), formed on the raw per-token log-probs
  * N in Eq. U counts every triplet of the step (SFT rows + all group members) on every rank, so
    zero-advantage rows dilute the step exactly as the formula says; they are not run through the model
  * SFT rows per step (--rl.sft_rows) and the task mix (--rl.task_mix) are ours to choose
  * sum over tokens for log pi (--rl.logp_norm=sum | mean); one t1 per sample (--rl.shared_t)

The file reads top to bottom: the advantages (Eq. G, D, A), the objective (triplets with their N,
unified_loss = -J of Eq. U, the clipped form and the KL), policy_update (-J -> optimizer steps),
rl_step (ONE step, whole: prompts -> groups -> advantages -> triplets -> update), step_record (what
the log reports, computed once after the step) and run_rl (the stage: resume, loop, log,
checkpoint, quick evals).

Run it: python train.py --preset=toy --stage=rl   (starts from out_dir/ckpt_sft.pt)
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import config as C
import data as D
import likelihood as LK
import metrics
from common import (STOP, resume_hint, all_reduce_mean, mean_over_all, TaskSampler, best_score, check_model_config, check_vq, from_rank0, gather_rank_states,
                    load_checkpoint, make_optimizer, model_from_checkpoint, peak_memory_mb, restore_rank_state, save_checkpoint,
                    stop_together, write_json)
from rewards import normalise, trace_answer
from rollout import Groups, sample_groups


# ----------------------------------------------------------------------------------------------
# advantages (Eq. G, D, A): one number per group member, from the group's rewards alone


def rewards_differ(r: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """(G, n) rewards, (G, n) membership -> (G,) bool: the group's members do not all score the same,
    i.e. GRPO has a signal there (the paper's "vanishing advantage" is the False case)."""
    return r.masked_fill(~member, float("-inf")).amax(1) > r.masked_fill(~member, float("inf")).amin(1)


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


def rft_advantages(r: torch.Tensor, member: torch.Tensor, accept: float) -> torch.Tensor:
    """Rejection-sampling fine-tuning, the baseline arm (rl.advantage = "rft"): A = 1 for every group
    member whose reward reaches `accept`, 0 for the rest, so the update is SFT on the accepted samples
    (no baseline subtracted, no push away from the rejected ones). r, member: (G, n) -> A (G, n)."""
    return ((r >= accept) & member).float()


def group_advantages(g: Groups, rc) -> torch.Tensor:
    """A (G, n) of one task's groups by rl.advantage: Eq. A, or RFT's 0/1 at rl.rft_accept."""
    if rc.advantage == "rft":
        return rft_advantages(g.rewards, g.member, C.parse_task_values(rc.rft_accept, "rl.rft_accept")[g.task])
    return advantages(g.rewards, g.member, rc.gamma, rc.adv_std)


# ----------------------------------------------------------------------------------------------
# the objective: (x, y, A) triplets, -J of Eq. U, its PPO-clipped form and the k3 KL


@dataclass
class Triplets:
    """The step's (x, y, A) triplets of Eq. (U) on this rank. Only rows with A != 0 are kept (the
    others add nothing to J and are never run through the model), but N counts them all."""
    batch: D.Batch | None          # (M, T) the kept rows: SFT rows first, then rollout rows; None if M = 0
    adv: torch.Tensor              # (M,) their advantages (1 for SFT rows)
    n: int                         # N of Eq. U on this rank: SFT rows + every group member of the step


def triplets(groups: list[Groups], advs: list[torch.Tensor], cfg, bundle, sft: TaskSampler, device) -> Triplets:
    """rl.sft_rows SFT rows with A = 1, then every group member with A != 0 (advs[i]: (G, n) of
    groups[i]). N counts every triplet of the step, zero-advantage group members included."""
    rc, parts, kept = cfg.rl, [], []
    if rc.sft_rows:
        parts.append(D.collate({k: v["sft"] for k, v in bundle.sets.items()}, sft.draw(rc.sft_rows),
                               bundle.tok).to(device))
        kept.append(torch.ones(rc.sft_rows, device=device))
    for g, a in zip(groups, advs):
        keep = (a.reshape(-1) != 0).nonzero().squeeze(1)                   # prompt-major slots with A != 0
        if len(keep):
            parts.append(g.rows().rows(keep.to(device)))
            kept.append(a.reshape(-1)[keep].to(device))
    n = rc.sft_rows + sum(int(g.member.sum()) for g in groups)
    if not parts:
        return Triplets(None, torch.zeros(0, device=device), n)
    return Triplets(D.cat_batches(parts, bundle.tok), torch.cat(kept), n)


def token_terms(model, batch: D.Batch, tok, rc, seed: int) -> LK.Terms:
    """log pi^(y|x) of every row as rl.likelihood's per-token terms (METHOD.md §7). The masks come
    from `seed` alone, so two calls with the same seed (old and new policy, or the policy and a
    reference) score the same masked slots."""
    g = torch.Generator(device=batch.tokens.device).manual_seed(seed)
    return LK.estimate(rc.likelihood, model, batch, tok, n=rc.n_mc, generator=g, norm=rc.logp_norm,
                       shared_t=rc.shared_t, p_prompt=rc.p_prompt)


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


def unified_loss(model, batch: D.Batch, adv: torch.Tensor, tok, rc, seed: int, logp_old: torch.Tensor | None = None,
                 ref_model=None) -> tuple[torch.Tensor, LK.Terms, torch.Tensor | None, torch.Tensor | None]:
    """-(sum_i A_i log pi^(y_i|x_i)) on the rows of `batch` (A: (M,)), the numerator of -J (Eq. U):
    policy_update divides by N once, over every micro-batch and rank. With logp_old (D, M, R), the
    old policy's raw terms on the same masks (rl.ppo_epochs > 1), the clipped surrogate replaces
    A_i log pi_i. With ref_model, + rl.kl_coef * sum_i KL_i (k3 per term, weighted like log pi).
    Returns (loss, the policy's terms, the k3 terms or None, the active-clip mask or None)."""
    terms = token_terms(model, batch, tok, rc, seed)                                # (D, M, R)
    if logp_old is None:
        J, clipped = (adv * terms.seq()).sum(), None                                # Eq. U, numerator
    else:
        J, clipped = clipped_objective(terms, logp_old, adv, rc.clip_eps)           # Eq. PPO
    loss, kl = -J, None
    if ref_model is not None:
        with torch.no_grad():
            ref = token_terms(ref_model, batch, tok, rc, seed)                      # the same masks
        kl = k3_kl(terms, ref)
        loss = loss + rc.kl_coef * (terms.weight * kl).sum()
    return loss, terms, kl, clipped


@dataclass
class Update:
    """What policy_update did: -J summed over the step (the last epoch), the gradient norm, why it
    skipped the update (None: it stepped), and per micro-batch the detached per-term quantities the
    log reports (step_record)."""
    loss: float = 0.0
    grad: float = 0.0
    skipped: str | None = None     # "no rows" | "non-finite <term>" | None
    chunks: list = field(default_factory=list)     # (terms, kl or None, clipped or None, is_image (M, R))


def policy_update(model, opt, trip: Triplets, cfg, ctx, tok, gen: torch.Generator, ref=None) -> Update:
    """rl.ppo_epochs optimizer steps on the triplets (1 = the paper's on-policy update). Each epoch
    runs backward on -sum_i A_i log pi_i per micro-batch, then common.mean_over_all turns the summed
    gradients into those of -J = -(1/N) sum: N summed over micro-batches AND ranks, as SFT does.
    The masks of each micro-batch are drawn once and kept for every epoch, so old and new policy are
    compared on the same masks (d1's diffu-GRPO). A step without a single row on any rank makes no
    update (no AdamW momentum or weight-decay step), on one process and under DDP alike; a
    non-finite gradient norm skips the update and the remaining epochs."""
    rc, t, dev = cfg.rl, cfg.train, ctx.device
    if all_reduce_mean(float(len(trip.adv)), ctx) == 0:
        return Update(skipped="no rows")
    n_all = all_reduce_mean(float(trip.n), ctx) * ctx.world                # N of Eq. U, every rank's
    chunks = [(torch.arange(lo, min(lo + t.micro_batch, len(trip.adv)), device=dev),
               int(torch.randint(2**62, (1,), generator=gen, device=gen.device)))
              for lo in range(0, len(trip.adv), t.micro_batch)]
    olds = [None] * len(chunks)
    if rc.ppo_epochs > 1:
        with torch.no_grad(), ctx.autocast:
            olds = [token_terms(model, trip.batch.rows(rows), tok, rc, seed).logp for rows, seed in chunks]
    for _ in range(rc.ppo_epochs):
        out = Update()
        for (rows, seed), old in zip(chunks, olds):
            mb = trip.batch.rows(rows)
            with ctx.autocast:
                loss, terms, kl, clipped = unified_loss(model, mb, trip.adv[rows], tok, rc, seed, old, ref)
            loss.backward()
            out.loss += loss.item()
            out.chunks.append((terms.detach(), None if kl is None else kl.detach(), clipped,
                               mb.is_image[:, mb.P:mb.P + terms.logp.shape[2]]))
        mean_over_all(model, trip.n, ctx)                                   # gradients of -J, 1/N
        out.loss = all_reduce_mean(out.loss, ctx) * ctx.world / max(n_all, 1.0)
        out.grad = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
        # after the all-reduce the norm is the same on every rank, so every rank decides alike
        if not math.isfinite(out.grad):
            out.skipped = "non-finite " + ("loss" if not math.isfinite(out.loss) else "gradient norm")
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if out.skipped:
            break
    return out


# ----------------------------------------------------------------------------------------------
# one RL step


@dataclass
class Step:
    """One RL step's parts, for the log (step_record), the studies and the benchmarks."""
    groups: list[Groups]
    advs: list[torch.Tensor]       # (G, n) per task
    trip: Triplets
    update: Update
    rollout_s: float
    update_s: float


def rl_step(model, opt, cfg, ctx, bundle, vq, draws: dict, sft: TaskSampler, pick: torch.Generator,
            gen: torch.Generator, ref=None) -> Step:
    """One RL step of METHOD.md §4, whole. draws: prompts per task ({task: k}); sft: the sampler of
    the SFT rows (A = 1); pick: the prompt picker's generator; gen: the sampling and mask generator;
    ref: the frozen reference of the KL ablation (None: the paper's objective)."""
    t0 = time.time()
    model.eval()                                                         # sampling: no dropout
    groups = []
    for task, k in draws.items():
        idx = torch.randperm(len(bundle.sets[task]["rl"]), generator=pick)[:k].tolist()      # prompts
        # -> groups: N samples per prompt (tree search on rl.tree_tasks), answer-forcing, rewards
        groups.append(sample_groups(model, bundle, task, idx, cfg, ctx.device, ctx.autocast, vq, gen))
    advs = [group_advantages(g, cfg.rl) for g in groups]                 # Eq. G, D, A
    trip = triplets(groups, advs, cfg, bundle, sft, ctx.device)          # (x, y, A) and N of Eq. U
    t_roll = time.time() - t0
    model.train()
    upd = policy_update(model, opt, trip, cfg, ctx, bundle.tok, gen, ref)    # -J -> mu optimizer steps
    return Step(groups, advs, trip, upd, t_roll, time.time() - t0 - t_roll)


# ----------------------------------------------------------------------------------------------
# what the log reports of a step (computed once, after it)


def group_stats(g: Groups, adv: torch.Tensor, tau: float, tok) -> dict:
    """One task's groups in the RL log: the on-policy mean reward, the share of groups with any
    nonzero advantage and with a GRPO signal, the all-failed share, the parse-failure rate of the
    on-policy answers, and answer-forcing's count, reward, parse failures and (vqa) how often the
    inpainted reasoning implies the answer it was forced to end in (rewards.trace_answer)."""
    on = g.rewards[:, :g.n_on]
    fails, n_on = sum(g.parse_fail.values()), on.numel()
    out = {"reward": on.mean().item(),
           # nonzero_adv_frac is ~1 whenever anything succeeds, since A_distill marks a best sample
           "nonzero_adv_frac": (adv.abs().sum(1) > 0).float().mean().item(),
           "grpo_nonzero_frac": rewards_differ(g.rewards, g.member).float().mean().item(),
           "all_failed_frac": (on < tau).all(1).float().mean().item(),
           "unparsable_frac": fails / max(1, n_on), "parse_fail": dict(g.parse_fail),
           "af_fired": int(g.forced.sum()), "forced_rows": int(g.forced.sum()), "rollout_s": g.seconds}
    if g.forced.any():
        f = g.forced.nonzero().squeeze(1).tolist()
        out["forced_reward"] = g.rewards[f, -1].mean().item()
        out["forced_unparsable"] = sum(g.forced_parse_fail.values())
        if g.task == "vqa":
            P, exs = g.base.P, [g.examples[i] for i in f]
            texts = [tok.decode(g.tokens[i, -1, P:P + g.layout.R_text].cpu()) for i in f]
            out["forced_consistent"] = sum(trace_answer(x, e.qtype) == normalise(e.answer)
                                           for x, e in zip(texts, exs)) / len(f)
    return out


def kind_stats(chunks: list) -> dict:
    """Per token kind (text, image), the mean and population variance over every scored term of the
    step of the policy's NLL (-log p of the raw term: how uncertain the policy is; the paper drops
    the KL term because image NLL > 6 against < 2 for text) and, with a reference, of the k3 KL:
    "nll_text_mean", "nll_image_var", "kl_text_mean", ...; a kind with no term gets neither."""
    acc = {}
    for terms, kl, _, img in chunks:
        kinds = {"text": terms.scored & ~img[None], "image": terms.scored & img[None]}
        for name, vals in (("nll", -terms.logp), ("kl", kl)):
            if vals is None:
                continue
            for kind, sel in kinds.items():
                v = vals[sel].double()
                for key, x in (("n", v.numel()), ("sum", v.sum().item()), ("sq", (v * v).sum().item())):
                    acc[(name, kind, key)] = acc.get((name, kind, key), 0.0) + x
    out = {}
    for (name, kind, key), n in acc.items():
        if key == "n" and n > 0:
            mean = acc[(name, kind, "sum")] / n
            out[f"{name}_{kind}_mean"] = mean
            out[f"{name}_{kind}_var"] = max(0.0, acc[(name, kind, "sq")] / n - mean * mean)
    return out


def step_record(st: Step, tok, tau: float, device) -> dict:
    """The RL log's record of one step (rl_log.json): timings, -J, the gradient norm, whether the
    update was skipped, N, the clip share, the per-kind statistics, and per task group_stats."""
    u = st.update
    clipped = [c for *_, c, _ in u.chunks if c is not None]
    n_scored = sum(int(t.scored.sum()) for t, *_ in u.chunks)
    rec = {"rollout_s": round(st.rollout_s, 2), "update_s": round(st.update_s, 2), "loss": u.loss,
           "grad": round(u.grad, 3),
           "nonfinite": u.skipped.removeprefix("non-finite ") if u.skipped and u.skipped != "no rows" else None,
           "skipped": u.skipped, "n_triplets": st.trip.n, "rows": len(st.trip.adv),
           "logp_per_tok": (sum(float((t.weight * t.logp).sum()) for t, *_ in u.chunks) / max(1, n_scored)),
           **kind_stats(u.chunks), "peak_mem_mb": round(peak_memory_mb(device), 1)}
    if clipped:
        rec["clip_frac"] = sum(int(c.sum()) for c in clipped) / max(1, n_scored)
    if any(kl is not None for _, kl, *_ in u.chunks):
        rec["kl"] = sum(float(kl.sum()) for _, kl, *_ in u.chunks if kl is not None) / max(1, n_scored)
    for g, a in zip(st.groups, st.advs):
        rec[g.task] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in group_stats(g, a, tau, tok).items()}
    return rec


def log_line(rec: dict, tasks: list[str]) -> str:
    """One RL step of rl_log.json in one line: per task the mean reward, the share of groups with any
    nonzero advantage and with a GRPO signal, and answer-forcing's count."""
    parts = [f"{k} r={rec[k]['reward']:.3f} nz={rec[k]['nonzero_adv_frac']:.2f} grpo={rec[k]['grpo_nonzero_frac']:.2f}"
             + (f" af={rec[k]['af_fired']}" if k in ("vqa", "ground") else "") for k in tasks]
    return (f"rl step {rec['step']} | {' | '.join(parts)} | rollout {rec['rollout_s']:.1f}s "
            f"update {rec['update_s']:.1f}s | {rec['seconds']:.0f}s")


def describe(rc, draws: dict) -> str:
    """The RL stage's settings in one log line."""
    return (f"RL: prompts/step {draws} x group {rc.group_size} | sft rows {rc.sft_rows} | likelihood "
            f"{rc.likelihood} | gamma {rc.gamma} | answer-forcing p={rc.af_prob} ({rc.af_mode}) | tree "
            f"{rc.tree_schedule} on {rc.tree_tasks} | kl {rc.kl_coef} | lr {rc.lr} | "
            f"{rc.max_steps} steps" + (f" (cap {rc.time_budget_s:.0f}s)" if rc.time_budget_s > 0 else ""))


def prompt_draws(rc) -> dict[str, int]:
    """Prompts per task in one RL step: rl.prompts_per_step per task on average, split by rl.task_mix."""
    mix = C.parse_mix(rc.task_mix, "rl.task_mix")
    return {k: max(1, round(rc.prompts_per_step * len(mix) * w)) for k, w in mix.items()}


def save_rl(path: str, model, opt, step: int, cfg, bundle, ctx, elapsed: float, history: list, sft, gen, pick):
    """The RL checkpoint: weights, optimizer, log, and every rank's random streams (SFT rows,
    sampling noise and masks, prompt picker), so that --resume draws what an unbroken run would.
    Collective (gather_rank_states): every rank calls it; rank 0 writes."""
    states = gather_rank_states(ctx, sft, gen=gen, pick=pick)
    if ctx.master:
        save_checkpoint(path, model, opt, step, cfg, bundle, {"elapsed": elapsed, "history": history,
                                                               "rank_states": states})


@dataclass
class RLRun:
    """What the RL stage carries from step to step: the policy, its optimizer, the KL ablation's
    frozen reference (None: the paper's objective), the three random streams of this rank (SFT rows,
    sampling noise and masks, the prompt picker), and the progress so far."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ref: torch.nn.Module | None
    sft: TaskSampler
    gen: torch.Generator
    pick: torch.Generator
    step: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list)
    best: float = -math.inf        # the best quick-eval score so far (ckpt_rl_best.pt)


def rl_start(cfg, ctx, bundle, model, ckpt_path: str) -> RLRun:
    """The RL stage's state: --resume continues ckpt_path (weights, optimizer, log and every random
    stream); else the SFT stage's model in memory, else --train.init_from or out_dir/ckpt_sft.pt."""
    rc, t, dev = cfg.rl, cfg.train, ctx.device
    blob = None
    if t.resume and os.path.exists(ckpt_path):
        blob = load_checkpoint(ckpt_path, bundle.tok.vocab_size)
        check_model_config(blob, cfg, ckpt_path)
        check_vq(blob, cfg, ckpt_path)
        ctx.log(f"resumed RL from {ckpt_path} at step {blob['step']}")
        model = model_from_checkpoint(blob, dev)
    elif t.resume:
        ctx.log(f"note: --resume, but there is no {ckpt_path} yet: RL starts from step 0")
    if blob is None and model is None:
        src = t.init_from or os.path.join(t.out_dir, "ckpt_sft.pt")
        start = load_checkpoint(src, bundle.tok.vocab_size)
        check_model_config(start, cfg, src)
        check_vq(start, cfg, src)
        ctx.log(f"RL starts from {src}")
        model = model_from_checkpoint(start, dev)
    opt = make_optimizer(model, rc.lr, t.weight_decay, dev)
    # ablation only (--rl.kl_coef > 0): the paper drops the KL term and the reference model
    ref = copy.deepcopy(model).eval().requires_grad_(False) if rc.kl_coef > 0 else None
    run = RLRun(model, opt, ref, TaskSampler(bundle.sets, "sft", C.parse_mix(t.task_mix), t.seed * 1000 + 7 + ctx.rank),
                torch.Generator(device=dev).manual_seed(t.seed * 1000 + 11 + ctx.rank),
                torch.Generator().manual_seed(t.seed * 1000 + 13 + ctx.rank))
    best_path = os.path.join(t.out_dir, "ckpt_rl_best.pt")
    run.best = best_score(best_path) if t.resume else -math.inf      # a fresh run replaces an old best
    if blob is not None:          # continue every random stream where the checkpoint left it
        opt.load_state_dict(blob["optim"])
        run.step, run.elapsed, run.history = blob["step"], blob.get("elapsed", 0.0), blob.get("history", [])
        restore_rank_state(blob, ctx, run.sft, gen=run.gen, pick=run.pick)
    return run


def run_rl(cfg, ctx, bundle, vq, model=None):
    """The RL stage: from `model` (the SFT stage's, in memory), else out_dir/ckpt_sft.pt or
    --train.init_from; --resume continues out_dir/ckpt_rl.pt. Runs for rl.max_steps (or until the
    optional cap rl.time_budget_s of training seconds, quick evals not counted). Writes ckpt_rl.pt,
    rl_log.json and, with rl.eval_interval, ckpt_rl_best.pt (the best quick-eval score on
    eval.curve_split)."""
    rc, t, dev = cfg.rl, cfg.train, ctx.device
    ckpt_path, best_path = os.path.join(t.out_dir, "ckpt_rl.pt"), os.path.join(t.out_dir, "ckpt_rl_best.pt")
    run, draws = rl_start(cfg, ctx, bundle, model, ckpt_path), prompt_draws(rc)
    save = lambda: save_rl(ckpt_path, run.model, run.opt, run.step, cfg, bundle, ctx, run.elapsed, run.history,
                           run.sft, run.gen, run.pick)
    ctx.log(describe(rc, draws))
    t_start, bad_steps, saved = time.time() - run.elapsed, 0, run.step
    bar = tqdm(total=rc.max_steps, initial=run.step, disable=not ctx.master, desc="rl", dynamic_ncols=True, mininterval=5)
    while run.step < rc.max_steps:
        st = rl_step(run.model, run.opt, cfg, ctx, bundle, vq, draws, run.sft, run.pick, run.gen, run.ref)
        rec = step_record(st, bundle.tok, rc.tau, dev)
        run.elapsed = from_rank0(time.time() - t_start, ctx)
        stop = lambda: stop_together(0 < rc.time_budget_s < run.elapsed or STOP.asked, ctx)
        if rec["nonfinite"]:
            # never step on a NaN (policy_update skipped it); several in a row means the run is broken
            bad_steps += 1
            ctx.log(f"rl step {run.step}: non-finite {rec['nonfinite']}; update skipped ({bad_steps} in a row)")
            if bad_steps >= 5:
                raise SystemExit(f"training error: 5 non-finite RL updates in a row at step {run.step} (last: "
                                 f"{rec['nonfinite']}); lower --rl.lr (now {rc.lr}) and {resume_hint(ckpt_path)}")
            run.history.append({"step": run.step, "seconds": round(run.elapsed, 1), **rec})
            if stop():
                break
            continue                 # nothing changed: no log line, eval or checkpoint for this step
        bad_steps, run.step = 0, run.step + 1
        bar.update(1)
        rec = {"step": run.step, "seconds": round(run.elapsed, 1), **rec}
        bar.set_postfix({k: f"{rec[k]['reward']:.2f}" for k in draws})
        if run.step % max(1, t.log_interval // 10) == 0 or run.step == 1:
            ctx.log(log_line(rec, list(draws)))
        done = run.step >= rc.max_steps or stop()
        run.history.append(rec)
        if done:             # the last update is on disk before the final quick eval (minutes on larger presets)
            save()
            saved = run.step
        evaluated = False
        if rc.eval_interval and (run.step % rc.eval_interval == 0 or done):
            m, run.best, secs = metrics.eval_and_keep_best(run.model, bundle, vq, cfg, ctx, "rl", run.step, run.elapsed,
                                                           run.best, best_path, tasks=list(draws))
            rec.update({"eval": m} if m is not None else {})    # None on the other ranks, or cut short by a stop
            evaluated, t_start = secs is not None, t_start + (secs or 0.0)   # the time budget counts training only
            done = done or stop_together(STOP.asked, ctx)     # a stop during the eval: checkpoint now
        if (run.step % t.ckpt_interval == 0 or done) and (saved != run.step or evaluated):
            save()          # again after the final eval: the checkpoint's log then holds it
            saved = run.step
        if done:
            break
    bar.close()
    if saved != run.step:   # stopped on a skipped step: the last update is not saved yet
        save()
    ctx.log(f"RL done: {run.step} steps in {run.elapsed:.0f}s -> {ckpt_path}")
    if ctx.master:
        write_json(os.path.join(t.out_dir, "rl_log.json"), run.history)
    return run.model
