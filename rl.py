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

Readings of the paper's unknowns (METHOD.md §9), all config fields:
  * on-policy, one gradient step per batch of fresh rollouts: no importance ratio, no clipping
    (rl.ppo_epochs = 1); rl.ppo_epochs > 1 takes more steps per batch with the PPO-clipped ratio
    on the same masks (Eq. PPO, rl.clip_eps)
  * N in Eq. U counts every triplet of the step (SFT rows + all group members), so zero-advantage
    rows dilute the step exactly as the formula says; they are not run through the model
  * SFT rows per step (rl.sft_rows) and the task mix (rl.task_mix) are ours to choose
  * sum over tokens for log pi (rl.logp_norm = sum | mean); one t1 per sample (rl.shared_t)

The file reads top to bottom: unified_loss (-J of Eq. U on a batch of triplets), rl_step (ONE update:
rollouts -> advantages -> the J loss -> optimizer step) and run_rl (the stage: resume, loop, log,
checkpoint, quick evals).

Run it: python train.py --preset=toy --stage=rl   (starts from out_dir/ckpt_sft.pt)
"""
from __future__ import annotations

import copy
import math
import os
import time

import torch
from tqdm import tqdm

import config as C
import data as D
import likelihood as LK
import metrics
from common import (STOP, TaskSampler, best_score, check_model_config, check_vq, from_rank0, gather_rank_states,
                    load_checkpoint, make_optimizer, model_from_checkpoint, peak_memory_mb, restore_rank_state, save_checkpoint,
                    stop_together, sync_grads, write_json)
from rollout import Rollouts, rollout_task


def token_logp(model, batch: D.Batch, tok, rc, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token terms of log pi^(y|x) (rl.likelihood's estimator, METHOD.md §7): (M, R) floats and
    the (M, R) bool mask of the scored tokens. The masks come from `seed` alone, so two calls with the
    same seed (old and new policy, or the policy and a reference) score the same masked slots."""
    g = torch.Generator(device=batch.tokens.device).manual_seed(seed)
    return LK.estimate(rc.likelihood, model, batch, tok, n=rc.n_mc, generator=g, norm=rc.logp_norm,
                       shared_t=rc.shared_t)


def clipped_objective(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, scored: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """The PPO-clipped surrogate of A_i log pi, per token as d1's diffu-GRPO does:
        sum_i sum_k min(rho_ik A_i, clip(rho_ik, 1 - eps, 1 + eps) A_i),   rho_ik = exp(logp_ik - logp_old_ik)
    over the scored tokens (logp, logp_old, scored: (M, R); adv: (M,)). At rho = 1 its gradient is
    sum_i A_i grad log pi_i, the gradient of Eq. (U)'s numerator."""
    rho = torch.exp(logp - logp_old)
    a = adv[:, None]
    return (torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a) * scored).sum()


KIND_SUMS = ("_n", "_sum", "_sq")      # the keys kind_sums adds up over micro-batches


def kind_sums(name: str, values: torch.Tensor, kinds: dict[str, torch.Tensor]) -> dict:
    """Sums of one per-token quantity over the tokens of each kind, to be added up over
    micro-batches and turned into a mean and a variance once per step (finish_kind_stats):
    values (M, R); kinds {kind: (M, R) bool}. Keys "<name>_<kind>_{n,sum,sq}"."""
    out = {}
    for kind, sel in kinds.items():
        v = values[sel].double()
        out.update({f"{name}_{kind}_n": float(v.numel()), f"{name}_{kind}_sum": v.sum().item(),
                    f"{name}_{kind}_sq": (v * v).sum().item()})
    return out


def finish_kind_stats(terms: dict) -> dict:
    """Replace the summed "<q>_n/_sum/_sq" entries of kind_sums by "<q>_mean" and "<q>_var" (the
    population variance over every token of the step); a kind with no token gets neither."""
    out = {k: v for k, v in terms.items() if not k.endswith(KIND_SUMS)}
    for k in [k[:-2] for k in terms if k.endswith("_n")]:
        n = terms[f"{k}_n"]
        if n > 0:
            mean = terms[f"{k}_sum"] / n
            out[f"{k}_mean"], out[f"{k}_var"] = mean, max(0.0, terms[f"{k}_sq"] / n - mean * mean)
    return out


def unified_loss(model, batch: D.Batch, adv: torch.Tensor, tok, rc, n_total: int, generator=None,
                 ref_model=None, *, seed: int | None = None, logp_old: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict]:
    """-J of Eq. (U) on the rows of `batch`: -(1/N) sum_i A_i log pi^(y_i|x_i), A: (M,), N = n_total.
    The estimator's masks come from `seed` (default: one draw from `generator`).
    logp_old (M, R), the old policy's token terms on the same masks (rl.ppo_epochs > 1): the
    clipped surrogate (clipped_objective) replaces A_i log pi.
    With ref_model, + kl_coef * the k3 KL(pi || pi_ref) per scored token / N, on the same masks."""
    if seed is None:
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device)) if generator is not None else 0
    logp, scored = token_logp(model, batch, tok, rc, seed)                          # (M, R)
    seq = logp.sum(1)                                                               # log pi^(y_i|x_i)
    if logp_old is None:
        J = (adv * seq).sum() / n_total                                             # Eq. U
    else:
        J = clipped_objective(logp, logp_old, adv, scored, rc.clip_eps) / n_total
    loss = -J
    stats = {"logp_per_tok": (seq.sum() / scored.sum().clamp(min=1)).item()}
    # per token kind: how uncertain the policy is on text and on image tokens (the paper's reason to
    # drop the KL term is image NLL > 6 against text < 2). -logp per token is a per-token NLL for
    # complementary and one_step with logp_norm = "sum" (the objective study's setting).
    img = batch.is_image[:, batch.P:batch.P + logp.shape[1]]
    kinds = {"text": scored & ~img, "image": scored & img}
    stats.update(kind_sums("nll", -logp.detach(), kinds))
    if ref_model is not None:
        with torch.no_grad():
            ref, _ = token_logp(ref_model, batch, tok, rc, seed)                    # the same masks
        d = (ref - logp) * scored                                                   # log pi_ref - log pi
        kl = (torch.exp(d) - d - 1) * scored                                        # k3 estimator, >= 0
        loss = loss + rc.kl_coef * kl.sum() / n_total
        stats["kl"] = (kl.sum() / scored.sum().clamp(min=1)).item()
        # the ablation's question: is the KL term noisier on image tokens than on text tokens?
        stats.update(kind_sums("kl", kl.detach(), kinds))
    return loss, stats


def triplets(rolls: list[Rollouts], cfg, bundle, sft: TaskSampler, device) -> tuple[D.Batch | None, torch.Tensor, int]:
    """The step's (x, y, A) triplets of Eq. (U): rl.sft_rows SFT rows with A = 1, then every rollout
    row with A != 0. Returns (batch or None when there is no row, A (M,), N): N counts every
    triplet of the step, zero-advantage group members included (they add nothing to J, so they are
    never run through the model)."""
    rc = cfg.rl
    parts, advs = [], []
    if rc.sft_rows:
        parts.append(D.collate({k: v["sft"] for k, v in bundle.sets.items()}, sft.draw(rc.sft_rows),
                               bundle.tok).to(device))
        advs.append(torch.ones(rc.sft_rows, device=device))
    for r in rolls:
        if len(r.adv):
            parts.append(r.batch)
            advs.append(r.adv.to(device))
    n_total = rc.sft_rows + sum(int(r.stats["members"]) for r in rolls)
    if not parts:     # no SFT rows and every advantage 0 (all groups failed): J = 0, no gradient
        return None, torch.zeros(0, device=device), n_total
    return D.cat_batches(parts, bundle.tok), torch.cat(advs), n_total


def rl_step(model, opt, cfg, ctx, bundle, vq, draws: dict, sft: TaskSampler, pick: torch.Generator,
            gen: torch.Generator, ref=None) -> dict:
    """One RL step: rollouts -> advantages -> the J loss (Eq. U) -> rl.ppo_epochs optimizer steps
    (1, the paper's on-policy update, by default).

    draws: prompts per task this step ({task: k}); sft: the sampler of the SFT rows (A = 1); pick:
    the prompt picker's generator; gen: the sampling and mask generator. Returns the step's record
    (rewards, GRPO signal, timings, and the loss terms and gradient norm of the last epoch). When
    the gradient is non-finite the update is skipped (and the step's later epochs with it) and the
    record's "nonfinite" names the loss term that caused it (or "gradient norm")."""
    rc, t, dev = cfg.rl, cfg.train, ctx.device
    t0 = time.time()
    model.eval()                     # sampling: no dropout
    rolls: list[Rollouts] = []
    for task, k in draws.items():
        idx = torch.randperm(len(bundle.sets[task]["rl"]), generator=pick)[:k].tolist()
        rolls.append(rollout_task(model, bundle, task, idx, cfg, dev, ctx.autocast, vq, gen))
    t_roll = time.time() - t0
    model.train()
    batch, adv, n_total = triplets(rolls, cfg, bundle, sft, dev)
    # micro-batches, each with its own mask seed, kept for every epoch: old and new policy are
    # compared on the same masks (d1's diffu-GRPO form of the importance ratio)
    chunks = [(torch.arange(lo, min(lo + t.micro_batch, len(adv)), device=dev),
               int(torch.randint(2**62, (1,), generator=gen, device=gen.device)))
              for lo in range(0, len(adv), t.micro_batch)]
    olds = [None] * len(chunks)
    if rc.ppo_epochs > 1:
        with torch.no_grad(), ctx.autocast:
            olds = [token_logp(model, batch.rows(rows), bundle.tok, rc, seed)[0] for rows, seed in chunks]
    for epoch in range(rc.ppo_epochs):
        terms = {}
        for (rows, seed), old in zip(chunks, olds):
            with ctx.autocast:
                loss, lstats = unified_loss(model, batch.rows(rows), adv[rows], bundle.tok, rc, n_total,
                                            ref_model=ref, seed=seed, logp_old=old)
            loss.backward()
            terms["loss"] = terms.get("loss", 0.0) + loss.item()      # each part is already / N: they add up to -J
            for k, v in lstats.items():      # per-token means: weighted by rows; kind sums: added
                terms[k] = terms.get(k, 0.0) + (v if k.endswith(KIND_SUMS) else v * len(rows) / len(adv))
        sync_grads(model, ctx)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
        # skip or step on the gradient norm: after sync_grads it is the same on every rank (a NaN
        # on one rank has spread to all), so every rank takes the same decision; the log names the
        # first non-finite loss term of this rank, if any
        bad = None
        if not math.isfinite(gnorm):
            bad = next((k for k, v in terms.items() if not math.isfinite(v)), "gradient norm")
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if bad is not None:
            break
    rec = {"rollout_s": round(t_roll, 2), "update_s": round(time.time() - t0 - t_roll, 2),
           "grad": round(gnorm, 3), **finish_kind_stats(terms), "nonfinite": bad, "peak_mem_mb": round(peak_memory_mb(dev), 1)}
    for r in rolls:
        rec[r.task] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.stats.items()
                       if k != "members"}
    return rec


def log_line(rec: dict, tasks: list[str]) -> str:
    """One RL step of rl_log.json in one line: per task the mean reward, the share of groups with any
    nonzero advantage and with a GRPO signal, and answer-forcing's count."""
    parts = [f"{k} r={rec[k]['reward']:.3f} nz={rec[k]['nonzero_adv_frac']:.2f} grpo={rec[k]['grpo_nonzero_frac']:.2f}"
             + (f" af={rec[k]['af_fired']}" if k in ("vqa", "ground") else "") for k in tasks]
    return (f"rl step {rec['step']} | {' | '.join(parts)} | rollout {rec['rollout_s']:.1f}s "
            f"update {rec['update_s']:.1f}s | {rec['seconds']:.0f}s")


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


def rl_start(cfg, ctx, bundle, model, ckpt_path: str):
    """(model, the checkpoint blob when resuming else None): --resume continues ckpt_path; else the
    SFT stage's model in memory, else --train.init_from or out_dir/ckpt_sft.pt."""
    t = cfg.train
    if t.resume and os.path.exists(ckpt_path):
        blob = load_checkpoint(ckpt_path, bundle.tok.vocab_size)
        check_model_config(blob, cfg, ckpt_path)
        check_vq(blob, cfg, ckpt_path)
        ctx.log(f"resumed RL from {ckpt_path} at step {blob['step']}")
        return model_from_checkpoint(blob, ctx.device), blob
    if model is None:
        src = t.init_from or os.path.join(t.out_dir, "ckpt_sft.pt")
        start = load_checkpoint(src, bundle.tok.vocab_size)
        check_model_config(start, cfg, src)
        check_vq(start, cfg, src)
        ctx.log(f"RL starts from {src}")
        model = model_from_checkpoint(start, ctx.device)
    return model, None


def run_rl(cfg, ctx, bundle, vq, model=None):
    """The RL stage: from `model` (the SFT stage's, in memory), else out_dir/ckpt_sft.pt or
    --train.init_from; --resume continues out_dir/ckpt_rl.pt. Runs for rl.max_steps (or until the
    optional cap rl.time_budget_s of training seconds, quick evals not counted). Writes ckpt_rl.pt,
    rl_log.json and, with rl.eval_interval, ckpt_rl_best.pt (the best quick-eval score on
    eval.curve_split)."""
    rc, t, dev = cfg.rl, cfg.train, ctx.device
    ckpt_path = os.path.join(t.out_dir, "ckpt_rl.pt")
    model, blob = rl_start(cfg, ctx, bundle, model, ckpt_path)
    step, elapsed, history = (0, 0.0, []) if blob is None else (blob["step"], blob.get("elapsed", 0.0),
                                                               blob.get("history", []))
    best_path = os.path.join(t.out_dir, "ckpt_rl_best.pt")
    best = best_score(best_path) if t.resume else -math.inf       # a fresh run replaces an old best
    opt = make_optimizer(model, rc.lr, t.weight_decay, dev)
    if blob is not None:
        opt.load_state_dict(blob["optim"])
    ref = None
    if rc.kl_coef > 0:      # ablation only: the paper drops the KL term and the reference model
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    draws = prompt_draws(rc)
    # three random streams per rank: SFT rows, sampling noise and masks, the prompt picker
    sft = TaskSampler(bundle.sets, "sft", C.parse_mix(t.task_mix), t.seed * 1000 + 7 + ctx.rank)
    gen = torch.Generator(device=dev).manual_seed(t.seed * 1000 + 11 + ctx.rank)
    pick = torch.Generator().manual_seed(t.seed * 1000 + 13 + ctx.rank)
    ctx.log(f"RL: prompts/step {draws} x group {rc.group_size} | sft rows {rc.sft_rows} | likelihood "
            f"{rc.likelihood} | gamma {rc.gamma} | answer-forcing p={rc.af_prob} ({rc.af_mode}) | tree "
            f"{rc.tree_schedule} on {rc.tree_tasks} | kl {rc.kl_coef} | lr {rc.lr} | "
            f"{rc.max_steps} steps" + (f" (cap {rc.time_budget_s:.0f}s)" if rc.time_budget_s > 0 else ""))
    if blob is not None:          # continue every random stream where the checkpoint left it
        restore_rank_state(blob, ctx, sft, gen=gen, pick=pick)
    t_start, bad_steps, saved = time.time() - elapsed, 0, step
    bar = tqdm(total=rc.max_steps, initial=step, disable=not ctx.master, desc="rl", dynamic_ncols=True, mininterval=5)
    while step < rc.max_steps:
        rec = rl_step(model, opt, cfg, ctx, bundle, vq, draws, sft, pick, gen, ref)
        elapsed = from_rank0(time.time() - t_start, ctx)
        if rec["nonfinite"]:
            # never step on a NaN (rl_step skipped the update); several in a row means the run is broken
            bad_steps += 1
            ctx.log(f"rl step {step}: non-finite {rec['nonfinite']}; update skipped ({bad_steps} in a row)")
            if bad_steps >= 5:
                raise SystemExit(f"training error: 5 non-finite RL updates in a row at step {step} (last: "
                                 f"{rec['nonfinite']}); lower --rl.lr (now {rc.lr}) and resume from {ckpt_path}")
            history.append({"step": step, "seconds": round(elapsed, 1), **rec})
            if not stop_together(0 < rc.time_budget_s < elapsed or STOP.asked, ctx):
                continue             # nothing changed: no log line, eval or checkpoint for this step
            break
        bad_steps, step = 0, step + 1
        bar.update(1)
        rec = {"step": step, "seconds": round(elapsed, 1), **rec}
        bar.set_postfix({k: f"{rec[k]['reward']:.2f}" for k in draws})
        if step % max(1, t.log_interval // 10) == 0 or step == 1:
            ctx.log(log_line(rec, list(draws)))
        done = step >= rc.max_steps or stop_together(0 < rc.time_budget_s < elapsed or STOP.asked, ctx)
        if rc.eval_interval and (step % rc.eval_interval == 0 or done) and ctx.master:
            rec["eval"] = m = metrics.quick_eval(model, bundle, vq, cfg, dev, ctx.autocast, tasks=list(draws))
            t_start += m["eval_seconds"]            # the time budget counts training only
            ctx.log(f"rl eval @ {step} ({elapsed:.0f}s, {cfg.eval.curve_split}): {metrics.headline(m)}")
            if m["score"] > best:                   # the best checkpoint by the quick evals (not the held-out set)
                best = m["score"]
                save_checkpoint(best_path, model, None, step, cfg, bundle, {"score": best, "elapsed": elapsed})
        history.append(rec)
        if step % t.ckpt_interval == 0 or done:
            save_rl(ckpt_path, model, opt, step, cfg, bundle, ctx, elapsed, history, sft, gen, pick)
            saved = step
        if done:
            break
    bar.close()
    if saved != step:       # stopped on a skipped step: the last update is not saved yet
        save_rl(ckpt_path, model, opt, step, cfg, bundle, ctx, elapsed, history, sft, gen, pick)
    ctx.log(f"RL done: {step} steps in {elapsed:.0f}s -> {ckpt_path}")
    if ctx.master:
        write_json(os.path.join(t.out_dir, "rl_log.json"), history)
    return model
