"""
The training script: every stage of the pipeline, one process or many, CPU or GPU.

    python train.py --preset=toy                     # the main toy job: vq (if not cached) -> sft -> rl -> eval
    python train.py --preset=toy --stage=sft         # one stage (vq | sft | rl | eval)
    python train.py --preset=small                   # one GPU, bf16 autocast
    torchrun --standalone --nproc_per_node=4 train.py --preset=base     # several GPUs (DDP)
    python train.py --preset=toy --resume            # continue the latest checkpoint in out_dir

The pipeline of LaViDa-R1 (arXiv 2602.14147; METHOD.md): stage 1 is SFT on traced reasoning data
(+ the text-to-image data), stage 2 the unified post-training (one step of it: rl.rl_step). We train
the small VQ tokenizer first (vq.py) because no pretrained one can be downloaded; the paper starts
from LaViDa-O's pretrained weights instead.

This file holds the two training stages around the method, and the stage dispatcher:
  run_sft()   masked-diffusion SFT (diffusion.sft_loss, METHOD.md §2) on a task mix: global batch
              with derived gradient accumulation, cosine LR, atomic checkpoints that resume exactly
              (every rank's RNG and sampler state; tests/test_distributed.py).
  run_rl()    the RL stage: rl.rl_step in a loop, its log (rl_log.json), checkpoints that resume
              exactly (every random stream of every rank).
  StageLoop   what both loops do after a step: the checkpoint, the quick eval on the validation split
              and the best checkpoint by it, the stop request.
  main()      the stage dispatcher; `all` writes config.json, log.txt, checkpoints, metrics.json and
              the sample grid into out_dir.
Under DDP: rank 0's initial weights are broadcast and gradients averaged by one flat all-reduce
(common.sync_grads), not by the DDP wrapper. The plumbing (device and DDP context, checkpoints) is in
common.py, the data bundle in data.py.

Left out on purpose: FSDP/ZeRO, EMA weights, mixed fp16 (bf16 or fp32 only), wandb.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import config as C
import metrics
import report
import rl
import vq as VQ
from common import (STOP, OutDirLock, Stopped, Ctx, best_score, broadcast_params, build_model, check_model_config,
                    check_vq, from_rank0, gather_rank_states, latest_checkpoint, load_checkpoint, load_weights, lr_at,
                    make_optimizer, mean_over_all, model_from_checkpoint, peak_memory_mb, restore_rank_state,
                    resume_hint, run_main, save_checkpoint, setup, stop_together, unwrap, write_json)
from data import Bundle, TaskSampler, get_bundle, load_latest, picture_judge
from diffusion import sft_loss
from model import Transformer
from rewards import normalise, trace_answer
from rollout import Groups, RolloutContext
from tokens import RL_TASKS, collate, parse_mix
from world import parse_levels

# ----------------------------------------------------------------------------------------------
# SFT


def run_sft(cfg, ctx: Ctx, bundle: Bundle, vq) -> Transformer:
    """The SFT stage: train for train.max_steps (or until the optional cap train.time_budget_s of
    training seconds, quick evals not counted); writes ckpt_sft.pt (every ckpt_interval steps and at
    the end), sft_curve.json (the quick evals on eval.curve_split) and ckpt_sft_best.pt (the weights
    with the best quick-eval score, metrics.selection_score)."""
    tc, dev = cfg.train, ctx.device
    accum = tc.batch_size // (tc.micro_batch * ctx.world)
    if accum < 1 or tc.batch_size % (tc.micro_batch * ctx.world):
        raise SystemExit(f"config error: train.batch_size={tc.batch_size} must be a multiple of "
                         f"micro_batch*world = {tc.micro_batch}*{ctx.world}")
    ckpt_path = os.path.join(tc.out_dir, "ckpt_sft.pt")
    model, opt, sampler, run = sft_start(cfg, ctx, bundle, ckpt_path)
    step, elapsed, history, ema = run["step"], run["elapsed"], run["history"], run["loss_ema"]
    ctx.log(f"SFT: {model.num_params(False) / 1e6:.2f}M params | {ctx.dtype_reason} | device {dev} | "
            f"world {ctx.world} | global batch {tc.batch_size} = micro {tc.micro_batch} x accum {accum} x world "
            f"{ctx.world} | {tc.max_steps} steps" + (f" (cap {tc.time_budget_s:.0f}s)" if tc.time_budget_s > 0 else ""))
    if tc.compile:
        model = torch.compile(model)
    model.train()
    bad_losses, loss = 0, None

    def save():     # collective (gather_rank_states): every rank calls it
        states = gather_rank_states(ctx, sampler)
        if ctx.master:   # loss = this step's loss (the resume test compares it), loss_ema = the log's
            save_checkpoint(ckpt_path, model, opt, step, cfg, bundle,
                            {"elapsed": elapsed, "history": history, "sampler": sampler.state(),
                             "rank_states": states, "loss": loss, "loss_ema": ema})
        if ctx.ddp:      # nobody runs ahead (or exits) while rank 0 is still writing
            dist.barrier()

    loop = StageLoop(cfg, ctx, bundle, vq, "sft", save, tc.eval_interval, quick_eval_best(cfg, "sft"), time.time() - elapsed)

    bar = tqdm(total=tc.max_steps, initial=step, disable=not ctx.master, desc="sft", dynamic_ncols=True,
               mininterval=5)
    while step < tc.max_steps:
        # a run cut by its time budget still finishes its schedule (see common.lr_at); rank 0's
        # clock for every rank: one learning rate for all
        progress = step / tc.max_steps
        if tc.time_budget_s > 0:
            progress = max(progress, from_rank0(time.time() - loop.t_start, ctx) / tc.time_budget_s)
        lr = lr_at(step, progress, tc.warmup, tc.lr, tc.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        loss, stats, gnorm = sft_step(model, opt, cfg, ctx, bundle, sampler, accum)
        if not math.isfinite(loss):      # the batch was dropped; several in a row means the run is broken
            bad_losses += 1
            ctx.log(f"step {step}: non-finite loss ({loss}); batch skipped ({bad_losses} in a row)")
            if bad_losses >= 5:
                raise SystemExit(f"training error: 5 non-finite losses in a row at step {step}; lower "
                                 f"--train.lr (now {tc.lr}) and {resume_hint(ckpt_path)}")
            continue
        bad_losses, step = 0, step + 1
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        elapsed = time.time() - loop.t_start
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}")
        if step % tc.log_interval == 0:
            ctx.log(f"sft step {step}/{tc.max_steps} | loss {ema:.4f} | masked acc {stats['masked_acc']:.3f} | "
                    f"lr {lr:.2e} | grad {gnorm:.2f} | {1000 * (time.time() - t0):.0f} ms/step | "
                    f"{elapsed:.0f}s elapsed")
        done = step >= tc.max_steps or stop_together(0 < tc.time_budget_s < elapsed or STOP.asked, ctx)
        done = loop.end_step(model, step, elapsed, done,
                             on_eval=lambda m: history.append({**m, "step": step, "seconds": round(elapsed, 1)}))
        if done:
            break
    bar.close()
    ctx.log(f"SFT done: {step} steps in {elapsed:.0f}s -> {ckpt_path}")
    if ctx.master:
        write_json(os.path.join(tc.out_dir, "sft_curve.json"), history)
    return unwrap(model)


def sft_start(cfg, ctx: Ctx, bundle: Bundle, ckpt_path: str):
    """(model, optimizer, task sampler, saved run state) for SFT: fresh, from --train.init_from's
    weights, or resumed from ckpt_path with --resume (weights, optimizer, every rank's random state)."""
    tc = cfg.train
    # the stage's own seed: whatever ran before it in this process (training the VQ, or loading it
    # from the cache instead) must not change the initial weights or the masks
    torch.manual_seed(tc.seed + ctx.rank)
    model = build_model(cfg, bundle.tok, ctx.device)
    opt = make_optimizer(model, tc.lr, tc.weight_decay, ctx.device)
    sampler = TaskSampler(bundle.sets, "sft", parse_mix(tc.task_mix), tc.seed * 1000 + ctx.rank)
    run = {"step": 0, "elapsed": 0.0, "history": [], "loss_ema": None}
    if tc.resume and os.path.exists(ckpt_path):
        blob = load_checkpoint(ckpt_path, bundle.tok.vocab_size)
        check_model_config(blob, cfg, ckpt_path)
        check_vq(blob, cfg, ckpt_path)
        load_weights(model, blob["model"], ckpt_path)
        opt.load_state_dict(blob["optim"])
        run.update(step=blob["step"], elapsed=blob.get("elapsed", 0.0), history=blob.get("history", []),
                   loss_ema=blob.get("loss_ema"))
        restore_rank_state(blob, ctx, sampler)
        ctx.log(f"resumed SFT from {ckpt_path} at step {run['step']}")
    elif tc.resume:
        ctx.log(f"note: --resume, but there is no {ckpt_path} yet: SFT starts from step 0")
    if not (tc.resume and os.path.exists(ckpt_path)) and tc.init_from:
        start = load_checkpoint(tc.init_from, bundle.tok.vocab_size)
        check_model_config(start, cfg, tc.init_from)
        check_vq(start, cfg, tc.init_from)
        load_weights(model, start["model"], tc.init_from)
    broadcast_params(model, ctx)
    return model, opt, sampler, run


def sft_step(model, opt, cfg, ctx: Ctx, bundle: Bundle, sampler: TaskSampler, accum: int) -> tuple[float, dict, float]:
    """One optimizer step of masked-diffusion SFT on `accum` micro-batches of this rank: the mean
    loss over every token the step scores, on all micro-batches and ranks alike (common.mean_over_all).
    Returns (that loss, the last micro-batch's stats, the gradient norm); a non-finite loss takes
    no step (gradient norm nan)."""
    tc = cfg.train
    loss_sum, n_local, stats = 0.0, 0.0, {}
    for _ in range(accum):
        batch = collate({k: v["sft"] for k, v in bundle.sets.items()}, sampler.draw(tc.micro_batch),
                          bundle.tok).to(ctx.device)
        with ctx.autocast:
            loss, stats = sft_loss(model, batch, cfg.diffusion, bundle.tok)
            (loss * stats["n"]).backward()                     # the micro-batch's sum; mean_over_all divides
        loss_sum, n_local = loss_sum + loss.item() * stats["n"], n_local + stats["n"]
    n = mean_over_all(model, n_local, ctx)
    # the same number on every rank, so every rank takes the same skip-or-step decision (a NaN on one
    # rank has already spread to every rank's gradients through the all-reduce)
    loss_sum = ctx.all_sum(loss_sum) / max(n, 1.0)
    gnorm = float("nan")
    if math.isfinite(loss_sum):          # never step on a NaN
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).item()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, stats, gnorm


# ----------------------------------------------------------------------------------------------
# RL: rl.rl_step in a loop


def run_rl(cfg, ctx: Ctx, bundle: Bundle, vq, model=None):
    """The RL stage: from `model` (the SFT stage's, in memory), else out_dir/ckpt_sft.pt or
    --train.init_from; --resume continues out_dir/ckpt_rl.pt. Runs rl.rl_step for rl.max_steps (or until
    the optional cap rl.time_budget_s of training seconds, quick evals not counted). Writes ckpt_rl.pt,
    rl_log.json and, with rl.eval_interval, ckpt_rl_best.pt (the best quick-eval score on
    eval.curve_split)."""
    rc, tc = cfg.rl, cfg.train
    ckpt_path = os.path.join(tc.out_dir, "ckpt_rl.pt")
    run, draws = rl_start(cfg, ctx, bundle, model, ckpt_path), prompt_draws(rc)
    ro = RolloutContext(run.model, bundle.tok, bundle.sets, picture_judge(cfg, vq), cfg, ctx.device, ctx.autocast, run.gen)
    save = lambda: save_rl(ckpt_path, run, cfg, bundle, ctx)
    ctx.log(describe_rl(rc, draws))
    loop = StageLoop(cfg, ctx, bundle, vq, "rl", save, rc.eval_interval, quick_eval_best(cfg, "rl"),
                     time.time() - run.elapsed, run.step)
    bad_steps = 0
    bar = tqdm(total=rc.max_steps, initial=run.step, disable=not ctx.master, desc="rl", dynamic_ncols=True, mininterval=5)
    while run.step < rc.max_steps:
        st = rl.rl_step(ro, run.opt, ctx, draws, run.sft, run.pick, run.ref)
        rec = step_record(st, bundle.tok, rc.tau, ctx.device)
        run.elapsed = from_rank0(time.time() - loop.t_start, ctx)
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
        if run.step % max(1, tc.log_interval // 10) == 0 or run.step == 1:
            ctx.log(log_line(rec, list(draws)))
        done = run.step >= rc.max_steps or stop()
        run.history.append(rec)
        done = loop.end_step(run.model, run.step, run.elapsed, done, on_eval=lambda m: rec.update({"eval": m}),
                             tasks=list(draws))
        if done:
            break
    bar.close()
    if loop.saved_step != run.step:   # stopped on a skipped step: the last update is not saved yet
        save()
    ctx.log(f"RL done: {run.step} steps in {run.elapsed:.0f}s -> {ckpt_path}")
    if ctx.master:
        write_json(os.path.join(tc.out_dir, "rl_log.json"), run.history)
    return run.model


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


def rl_start(cfg, ctx, bundle, model, ckpt_path: str) -> RLRun:
    """The RL stage's state: --resume continues ckpt_path (weights, optimizer, log and every random
    stream); else the SFT stage's model in memory, else --train.init_from or out_dir/ckpt_sft.pt."""
    rc, tc, dev = cfg.rl, cfg.train, ctx.device
    blob = None
    if tc.resume and os.path.exists(ckpt_path):
        blob = load_checkpoint(ckpt_path, bundle.tok.vocab_size)
        check_model_config(blob, cfg, ckpt_path)
        check_vq(blob, cfg, ckpt_path)
        ctx.log(f"resumed RL from {ckpt_path} at step {blob['step']}")
        model = model_from_checkpoint(blob, dev)
    elif tc.resume:
        ctx.log(f"note: --resume, but there is no {ckpt_path} yet: RL starts from step 0")
    if blob is None and model is None:
        src = tc.init_from or os.path.join(tc.out_dir, "ckpt_sft.pt")
        start = load_checkpoint(src, bundle.tok.vocab_size)
        check_model_config(start, cfg, src)
        check_vq(start, cfg, src)
        ctx.log(f"RL starts from {src}")
        model = model_from_checkpoint(start, dev)
    opt = make_optimizer(model, rc.lr, tc.weight_decay, dev)
    # ablation only (--rl.kl_coef > 0): the paper drops the KL term and the reference model
    ref = copy.deepcopy(model).eval().requires_grad_(False) if rc.kl_coef > 0 else None
    run = RLRun(model, opt, ref, TaskSampler(bundle.sets, "sft", parse_mix(tc.task_mix), tc.seed * 1000 + 7 + ctx.rank),
                torch.Generator(device=dev).manual_seed(tc.seed * 1000 + 11 + ctx.rank),
                torch.Generator().manual_seed(tc.seed * 1000 + 13 + ctx.rank))
    if blob is not None:          # continue every random stream where the checkpoint left it
        opt.load_state_dict(blob["optim"])
        run.step, run.elapsed, run.history = blob["step"], blob.get("elapsed", 0.0), blob.get("history", [])
        restore_rank_state(blob, ctx, run.sft, gen=run.gen, pick=run.pick)
    return run


def save_rl(path: str, run: RLRun, cfg, bundle: Bundle, ctx: Ctx):
    """The RL checkpoint: weights, optimizer, log, and every rank's random streams (SFT rows,
    sampling noise and masks, prompt picker), so that --resume draws what an unbroken run would.
    Collective (gather_rank_states): every rank calls it; rank 0 writes."""
    states = gather_rank_states(ctx, run.sft, gen=run.gen, pick=run.pick)
    if ctx.master:
        save_checkpoint(path, run.model, run.opt, run.step, cfg, bundle, {"elapsed": run.elapsed, "history": run.history,
                                                                          "rank_states": states})


def prompt_draws(rc) -> dict[str, int]:
    """Prompts per task in one RL step: rl.prompts_per_step per task on average, split by rl.task_mix."""
    mix = parse_mix(rc.task_mix, "rl.task_mix", RL_TASKS)
    return {k: max(1, round(rc.prompts_per_step * len(mix) * w)) for k, w in mix.items()}


def describe_rl(rc, draws: dict) -> str:
    """The RL stage's settings in one log line."""
    return (f"RL: prompts/step {draws} x group {rc.group_size} | sft rows {rc.sft_rows} | likelihood "
            f"{rc.likelihood} | gamma {rc.gamma} | answer-forcing p={rc.af_prob} ({rc.af_mode}) | tree "
            f"{rc.tree_schedule} on {rc.tree_tasks} | kl {rc.kl_coef} | lr {rc.lr} | "
            f"{rc.max_steps} steps" + (f" (cap {rc.time_budget_s:.0f}s)" if rc.time_budget_s > 0 else ""))


def step_record(st: rl.Step, tok, tau: float, device) -> dict:
    """The RL log's record of one step (rl_log.json): timings, -J, the gradient norm, whether the
    update was skipped, N, the clip share, the per-kind statistics, and per task group_stats."""
    u = st.update
    clipped = [c for *_, c, _ in u.parts if c is not None]
    n_scored = sum(int(t.scored.sum()) for t, *_ in u.parts)
    rec = {"rollout_s": round(st.rollout_s, 2), "update_s": round(st.update_s, 2), "loss": u.loss,
           "grad": round(u.grad, 3),
           "nonfinite": u.skipped.removeprefix("non-finite ") if u.skipped and u.skipped != "no rows" else None,
           "skipped": u.skipped, "n_triplets": st.trip.n, "rows": len(st.trip.adv),
           "logp_per_tok": (sum(float((t.weight * t.logp).sum()) for t, *_ in u.parts) / max(1, n_scored)),
           **kind_stats(u.parts), "peak_mem_mb": round(peak_memory_mb(device), 1)}
    if clipped:
        rec["clip_frac"] = sum(int(c.sum()) for c in clipped) / max(1, n_scored)
    if any(kl is not None for _, kl, *_ in u.parts):
        rec["kl"] = sum(float(kl.sum()) for _, kl, *_ in u.parts if kl is not None) / max(1, n_scored)
    for g, a in zip(st.groups, st.advs):
        rec[g.task] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in group_stats(g, a, tau, tok).items()}
    return rec


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
           "grpo_nonzero_frac": rl.rewards_differ(g.rewards, g.member).float().mean().item(),
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
            # a word answer (a user's row) has no trace to recompute it from: never counted consistent
            out["forced_consistent"] = sum(normalise(e.answer) is not None and trace_answer(x, e.qtype) == normalise(e.answer)
                                           for x, e in zip(texts, exs)) / len(f)
    return out


def kind_stats(parts: list) -> dict:
    """Per token kind (text, image), the mean and population variance over every scored term of the
    step of the policy's NLL (-log p of the raw term: how uncertain the policy is; the paper drops
    the KL term because image NLL > 6 against < 2 for text) and, with a reference, of the k3 KL:
    "nll_text_mean", "nll_image_var", "kl_text_mean", ...; a kind with no term gets neither."""
    acc = {}
    for terms, kl, _, img in parts:
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


def log_line(rec: dict, tasks: list[str]) -> str:
    """One RL step of rl_log.json in one line: per task the mean reward, the share of groups with any
    nonzero advantage and with a GRPO signal, and answer-forcing's count."""
    parts = [f"{k} r={rec[k]['reward']:.3f} nz={rec[k]['nonzero_adv_frac']:.2f} grpo={rec[k]['grpo_nonzero_frac']:.2f}"
             + (f" af={rec[k]['af_fired']}" if k in ("vqa", "ground") else "") for k in tasks]
    return (f"rl step {rec['step']} | {' | '.join(parts)} | rollout {rec['rollout_s']:.1f}s "
            f"update {rec['update_s']:.1f}s | {rec['seconds']:.0f}s")


# ----------------------------------------------------------------------------------------------
# what both loops do after a step


@dataclass
class StageLoop:
    """What the SFT and RL loops do after every step, in one place: the checkpoint (every
    train.ckpt_interval steps and at the end), the quick eval on eval.curve_split every `eval_interval`
    steps and the best checkpoint by it (metrics.eval_and_keep_best), and a stop request during the
    eval. t_start moves forward by each eval's seconds: the time budgets count training only."""
    cfg: object
    ctx: Ctx
    bundle: Bundle
    vq: object
    stage: str                     # "sft" | "rl": the log lines and the best checkpoint's name
    save: object                   # () -> None: writes the stage's checkpoint (collective)
    eval_interval: int
    best: float
    t_start: float
    saved_step: int = -1

    def end_step(self, model, step: int, elapsed: float, done: bool, on_eval=None, tasks=None) -> bool:
        """After step `step` (done: the last one): save, quick-eval, save again. on_eval(m) records the
        eval's metrics before that second save, so the checkpoint's log holds them. Returns done, now
        also True when a stop request came during the eval (checkpoint written)."""
        ctx, saved = self.ctx, False
        if done:             # the last step is on disk before the final quick eval (minutes on larger presets)
            self.save()
            saved, self.saved_step = True, step
        evaluated = False
        if self.eval_interval and (step % self.eval_interval == 0 or done):
            best_path = os.path.join(self.cfg.train.out_dir, f"ckpt_{self.stage}_best.pt")
            m, self.best, secs = metrics.eval_and_keep_best(model, self.bundle, self.vq, self.cfg, ctx, self.stage, step,
                                                            elapsed, self.best, best_path, tasks=tasks)
            if m is not None and on_eval is not None:   # None on the other ranks, or cut short by a stop request
                on_eval(m)
            evaluated, self.t_start = secs is not None, self.t_start + (secs or 0.0)   # the budget counts training only
            done = done or stop_together(STOP.asked, ctx)       # a stop during the eval: checkpoint now
        if (step % self.cfg.train.ckpt_interval == 0 or done) and (not saved or evaluated):
            self.save()              # (again after the final eval: the checkpoint's log then holds it)
            self.saved_step = step
        return done


def quick_eval_best(cfg, stage: str) -> float:
    """The best quick-eval score so far: a resumed run keeps its best checkpoint's, a fresh run replaces it."""
    return best_score(os.path.join(cfg.train.out_dir, f"ckpt_{stage}_best.pt")) if cfg.train.resume else -math.inf


# ----------------------------------------------------------------------------------------------
# the stage dispatcher


def main(argv=None):
    cfg = C.get_config(argv)
    ctx = setup(cfg)
    # one run per out_dir: a second one would overwrite the first's checkpoints under it
    with OutDirLock(cfg.train.out_dir, ctx.log) if ctx.master else nullcontext():
        run_stages(cfg, ctx, argv)


def run_stages(cfg, ctx: Ctx, argv):
    """The stages of --train.stage in order, then the exit code of a stop request (after its checkpoint)."""
    stage, out = cfg.train.stage, cfg.train.out_dir
    if ctx.master:
        C.save_config(cfg, out)
        ctx.log(f"$ python train.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        ctx.log(f"torch {torch.__version__} | device {ctx.device} | {ctx.dtype_reason} | world {ctx.world}")
        ctx.log("config: " + json.dumps(C.to_dict(cfg)))
    t0 = time.time()
    check_inputs(cfg)
    if stage == "vq":
        VQ.run_vq_stage(cfg, out, ctx.device)
        return
    vq = VQ.get_vq(cfg, ctx.device, out)
    try:
        bundle = get_bundle(cfg, vq, ctx)
    except C.ConfigError as e:        # a config value only the data builder can check (e.g. a colour)
        raise SystemExit(f"config error: {e}") from None
    model = None
    with STOP:                  # Ctrl-C / SIGTERM: finish the step, write the checkpoint, then stop
        if stage in ("sft", "all"):
            model = run_sft(cfg, ctx, bundle, vq)
        stopped = stop_together(STOP.asked, ctx)        # one word for all ranks: every rank goes on, or none
        if (stage == "rl" or (stage == "all" and cfg.rl.max_steps > 0)) and not stopped:
            model = run_rl(cfg, ctx, bundle, vq, model)
        stopped = stop_together(STOP.asked, ctx)
        if stage in ("eval", "all") and ctx.master and not stopped:
            try:
                final_eval(cfg, ctx, model, bundle, vq, t0)
            except Stopped:                             # the checkpoints are already written
                stopped = True
    if ctx.ddp:
        dist.destroy_process_group()
    if stopped:
        args = " ".join(sys.argv[1:] if argv is None else argv)
        ctx.log(f"interrupted: the checkpoints in {out} are up to date; continue with "
                f"`python train.py {args}{'' if cfg.train.resume else ' --resume'}`")
        raise SystemExit(STOP.exit_code)


def check_inputs(cfg):
    """The checkpoint a stage starts from must exist before any work (the VQ tokenizer or the data
    would otherwise be built first): --stage=rl needs --train.init_from or out_dir/ckpt_sft.pt (unless
    --resume finds ckpt_rl.pt), --stage=eval a checkpoint in out_dir."""
    tc = cfg.train
    if tc.stage == "rl" and not (tc.resume and os.path.exists(os.path.join(tc.out_dir, "ckpt_rl.pt"))):
        src = tc.init_from or os.path.join(tc.out_dir, "ckpt_sft.pt")
        if not os.path.exists(src):
            raise SystemExit(f"checkpoint error: --stage=rl starts from {src}, which does not exist; run "
                             f"--stage=sft first or point --train.init_from at an SFT checkpoint")
    if tc.stage == "eval":
        latest_checkpoint(tc.out_dir)


def final_eval(cfg, ctx: Ctx, model, bundle: Bundle, vq, t0: float):
    """The held-out evaluation at the end of `all` (or --stage=eval): metrics.json and samples.png."""
    out = cfg.train.out_dir
    if model is None:
        model, bundle, vq = load_latest(cfg, ctx)
    m = metrics.evaluate(model, bundle, vq, cfg, ctx.device, ctx.autocast, grid_path=os.path.join(out, "samples.png"))
    m.update(metrics.baselines(bundle, cfg))
    sft_path = os.path.join(out, "ckpt_sft.pt")
    beyond = parse_levels(cfg.data.eval_levels)[-1] > parse_levels(cfg.data.sft_levels)[-1]
    if beyond and os.path.exists(os.path.join(out, "ckpt_rl.pt")) and os.path.exists(sft_path):
        # the held-out levels go past the traced ones: what RL added per bucket, on the same examples
        sft_model = model_from_checkpoint(load_checkpoint(sft_path, bundle.tok.vocab_size), ctx.device)
        ms = metrics.evaluate(sft_model, bundle, vq, cfg, ctx.device, ctx.autocast,
                              tasks=[t for t in ("vqa", "ground", "edit") if t in bundle.sets])
        m["sft_checkpoint"] = {k: v for k, v in ms.items() if k.startswith(("vqa_acc", "ground_miou", "edit_score"))}
        for name in (n for n in ("vqa_acc", "ground_miou", "edit_score") if f"{n}_in" in m):
            ctx.log(f"{name} by bucket, SFT -> RL: " + " | ".join(
                f"{b} {ms[f'{name}_{b}']:.3f} -> {m[f'{name}_{b}']:.3f}" for b in ("in", "edge", "far") if f"{name}_{b}" in m))
    m["total_seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(out, "metrics.json"), m)
    ctx.log(f"final eval: {metrics.headline(m)}")
    ctx.log(f"baselines: vqa prior {m['vqa_prior_acc']:.3f} | ground random mIoU {m['ground_random_miou']:.3f} "
            f"P@0.5 {m['ground_random_p50']:.3f} | edit copy-input {m['edit_copy_score']:.3f} | "
            f"t2i empty-canvas cell acc {m['t2i_empty_cell_acc']:.3f}")
    ctx.log(f"wrote {out}/metrics.json and {out}/samples.png ({m['total_seconds']:.0f}s in all)")
    try:              # the report card is a view of the files above: it must never cost the run
        ctx.log(f"wrote {report.write(out)}: the run's report card")
    except Exception as e:                                              # noqa: BLE001
        ctx.log(f"note: report.md not written ({type(e).__name__}: {e}); python report.py --out_dir={out} retries")


if __name__ == "__main__":
    run_main(main)
