"""
The training script: every stage of the pipeline, one process or many, CPU or GPU.

    python train.py --preset=toy                     # the main toy job: vq (if not cached) -> sft -> rl -> eval
    python train.py --preset=toy --stage=sft         # one stage (vq | sft | rl | eval)
    python train.py --preset=small                   # one GPU, bf16 autocast
    torchrun --standalone --nproc_per_node=4 train.py --preset=base     # several GPUs (DDP)
    python train.py --preset=toy --resume            # continue the latest checkpoint in out_dir

The pipeline of LaViDa-R1 (arXiv 2602.14147; METHOD.md): stage 1 is SFT on traced reasoning data
(+ the text-to-image data), stage 2 the unified post-training (rl.py). We train the small VQ tokenizer
first (vq.py) because no pretrained one can be downloaded; the paper starts from LaViDa-O's
pretrained weights instead.

This file holds the SFT stage and the stage dispatcher; the plumbing they share (device and DDP
context, the cached data bundle, checkpoints, the task sampler) lives in common.py.
  run_sft()   masked-diffusion SFT (diffusion.sft_loss, METHOD.md §2) on a task mix: global batch
              with derived gradient accumulation, cosine LR, a quick-eval curve on the validation
              split and the best checkpoint by it, atomic checkpoints that resume exactly (every
              rank's RNG and sampler state; tests/test_distributed.py).
              Under DDP: rank 0's initial weights are broadcast and gradients averaged by one flat
              all-reduce (common.sync_grads), not by the DDP wrapper.
  main()      the stage dispatcher; `all` writes config.json, log.txt, checkpoints, metrics.json and
              the sample grid into out_dir.

Left out on purpose: FSDP/ZeRO, EMA weights, mixed fp16 (bf16 or fp32 only), wandb.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import config as C
import data as D
import metrics
import rl
import vq as VQ
from common import (STOP, Bundle, OutDirLock, Stopped, run_main, Ctx, TaskSampler, all_reduce_mean, best_score, broadcast_params, build_model,
                    check_model_config, check_vq, from_rank0, gather_rank_states, get_bundle, load_checkpoint,
                    latest_checkpoint, load_latest, load_weights, lr_at, make_optimizer, mean_over_all, model_from_checkpoint,
                    restore_rank_state, resume_hint,
                    save_checkpoint, setup, stop_together, unwrap, write_json)
from diffusion import sft_loss
from model import Transformer

# ----------------------------------------------------------------------------------------------
# SFT

def sft_start(cfg, ctx: Ctx, bundle: Bundle, ckpt_path: str):
    """(model, optimizer, task sampler, saved run state) for SFT: fresh, from --train.init_from's
    weights, or resumed from ckpt_path with --resume (weights, optimizer, every rank's random state)."""
    t = cfg.train
    # the stage's own seed: whatever ran before it in this process (training the VQ, or loading it
    # from the cache instead) must not change the initial weights or the masks
    torch.manual_seed(t.seed + ctx.rank)
    model = build_model(cfg, bundle.tok, ctx.device)
    opt = make_optimizer(model, t.lr, t.weight_decay, ctx.device)
    sampler = TaskSampler(bundle.sets, "sft", C.parse_mix(t.task_mix), t.seed * 1000 + ctx.rank)
    run = {"step": 0, "elapsed": 0.0, "history": [], "loss_ema": None}
    if t.resume and os.path.exists(ckpt_path):
        blob = load_checkpoint(ckpt_path, bundle.tok.vocab_size)
        check_model_config(blob, cfg, ckpt_path)
        check_vq(blob, cfg, ckpt_path)
        load_weights(model, blob["model"], ckpt_path)
        opt.load_state_dict(blob["optim"])
        run.update(step=blob["step"], elapsed=blob.get("elapsed", 0.0), history=blob.get("history", []),
                   loss_ema=blob.get("loss_ema"))
        restore_rank_state(blob, ctx, sampler)
        ctx.log(f"resumed SFT from {ckpt_path} at step {run['step']}")
    elif t.resume:
        ctx.log(f"note: --resume, but there is no {ckpt_path} yet: SFT starts from step 0")
    if not (t.resume and os.path.exists(ckpt_path)) and t.init_from:
        start = load_checkpoint(t.init_from, bundle.tok.vocab_size)
        check_model_config(start, cfg, t.init_from)
        check_vq(start, cfg, t.init_from)
        load_weights(model, start["model"], t.init_from)
    broadcast_params(model, ctx)
    return model, opt, sampler, run


def sft_step(model, opt, cfg, ctx: Ctx, bundle: Bundle, sampler: TaskSampler, accum: int) -> tuple[float, dict, float]:
    """One optimizer step of masked-diffusion SFT on `accum` micro-batches of this rank: the mean
    loss over every token the step scores, on all micro-batches and ranks alike (common.mean_over_all).
    Returns (that loss, the last micro-batch's stats, the gradient norm); a non-finite loss takes
    no step (gradient norm nan)."""
    t = cfg.train
    loss_sum, n_local, stats = 0.0, 0.0, {}
    for _ in range(accum):
        batch = D.collate({k: v["sft"] for k, v in bundle.sets.items()}, sampler.draw(t.micro_batch),
                          bundle.tok).to(ctx.device)
        with ctx.autocast:
            loss, stats = sft_loss(model, batch, cfg.diffusion, bundle.tok)
            (loss * stats["n"]).backward()                     # the micro-batch's sum; mean_over_all divides
        loss_sum, n_local = loss_sum + loss.item() * stats["n"], n_local + stats["n"]
    n = mean_over_all(model, n_local, ctx)
    # the same number on every rank, so every rank takes the same skip-or-step decision (a NaN on one
    # rank has already spread to every rank's gradients through the all-reduce)
    loss_sum = all_reduce_mean(loss_sum, ctx) * ctx.world / max(n, 1.0)
    gnorm = float("nan")
    if math.isfinite(loss_sum):          # never step on a NaN
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, stats, gnorm


def run_sft(cfg, ctx: Ctx, bundle: Bundle, vq) -> Transformer:
    """The SFT stage: train for train.max_steps (or until the optional cap train.time_budget_s of
    training seconds, quick evals not counted); writes ckpt_sft.pt (every ckpt_interval steps and at
    the end), sft_curve.json (the quick evals on eval.curve_split) and ckpt_sft_best.pt (the weights
    with the best quick-eval score, metrics.selection_score)."""
    t, dev = cfg.train, ctx.device
    accum = t.batch_size // (t.micro_batch * ctx.world)
    if accum < 1 or t.batch_size % (t.micro_batch * ctx.world):
        raise SystemExit(f"config error: train.batch_size={t.batch_size} must be a multiple of "
                         f"micro_batch*world = {t.micro_batch}*{ctx.world}")
    ckpt_path = os.path.join(t.out_dir, "ckpt_sft.pt")
    model, opt, sampler, run = sft_start(cfg, ctx, bundle, ckpt_path)
    step, elapsed, history, ema = run["step"], run["elapsed"], run["history"], run["loss_ema"]
    best_path = os.path.join(t.out_dir, "ckpt_sft_best.pt")
    best = best_score(best_path) if t.resume else -math.inf       # a fresh run replaces an old best
    ctx.log(f"SFT: {model.num_params(False) / 1e6:.2f}M params | {ctx.dtype_reason} | device {dev} | "
            f"world {ctx.world} | global batch {t.batch_size} = micro {t.micro_batch} x accum {accum} x world "
            f"{ctx.world} | {t.max_steps} steps" + (f" (cap {t.time_budget_s:.0f}s)" if t.time_budget_s > 0 else ""))
    if t.compile:
        model = torch.compile(model)
    model.train()
    t_start, bad_losses = time.time() - elapsed, 0

    def save(step, loss, ema, elapsed):     # collective (gather_rank_states): every rank calls it
        states = gather_rank_states(ctx, sampler)
        if ctx.master:   # loss = this step's loss (the resume test compares it), loss_ema = the log's
            save_checkpoint(ckpt_path, model, opt, step, cfg, bundle,
                            {"elapsed": elapsed, "history": history, "sampler": sampler.state(),
                             "rank_states": states, "loss": loss, "loss_ema": ema})
        if ctx.ddp:      # nobody runs ahead (or exits) while rank 0 is still writing
            dist.barrier()

    bar = tqdm(total=t.max_steps, initial=step, disable=not ctx.master, desc="sft", dynamic_ncols=True,
               mininterval=5)
    while step < t.max_steps:
        # a run cut by its time budget still finishes its schedule (see common.lr_at); rank 0's
        # clock for every rank: one learning rate for all
        progress = step / t.max_steps
        if t.time_budget_s > 0:
            progress = max(progress, from_rank0(time.time() - t_start, ctx) / t.time_budget_s)
        lr = lr_at(step, progress, t.warmup, t.lr, t.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        loss, stats, gnorm = sft_step(model, opt, cfg, ctx, bundle, sampler, accum)
        if not math.isfinite(loss):      # the batch was dropped; several in a row means the run is broken
            bad_losses += 1
            ctx.log(f"step {step}: non-finite loss ({loss}); batch skipped ({bad_losses} in a row)")
            if bad_losses >= 5:
                raise SystemExit(f"training error: 5 non-finite losses in a row at step {step}; lower "
                                 f"--train.lr (now {t.lr}) and {resume_hint(ckpt_path)}")
            continue
        bad_losses, step = 0, step + 1
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        elapsed = time.time() - t_start
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}")
        if step % t.log_interval == 0:
            ctx.log(f"sft step {step}/{t.max_steps} | loss {ema:.4f} | masked acc {stats['masked_acc']:.3f} | "
                    f"lr {lr:.2e} | grad {gnorm:.2f} | {1000 * (time.time() - t0):.0f} ms/step | "
                    f"{elapsed:.0f}s elapsed")
        done = step >= t.max_steps or stop_together(0 < t.time_budget_s < elapsed or STOP.asked, ctx)
        if done:             # the last step is on disk before the final quick eval
            save(step, loss, ema, elapsed)
        saved, evaluated = done, False
        if t.eval_interval and (step % t.eval_interval == 0 or done):
            m, best, secs = metrics.eval_and_keep_best(model, bundle, vq, cfg, ctx, "sft", step, elapsed, best, best_path)
            if m is not None:                       # None on the other ranks, or cut short by a stop request
                history.append({**m, "step": step, "seconds": round(elapsed, 1)})
            evaluated, t_start = secs is not None, t_start + (secs or 0.0)   # the time budget counts training only
            done = done or stop_together(STOP.asked, ctx)       # a stop during the eval: checkpoint now
        if (step % t.ckpt_interval == 0 or done) and (not saved or evaluated):
            save(step, loss, ema, elapsed)          # (again after the final eval: its history then holds it)
        if done:
            break
    bar.close()
    ctx.log(f"SFT done: {step} steps in {elapsed:.0f}s -> {ckpt_path}")
    if ctx.master:
        write_json(os.path.join(t.out_dir, "sft_curve.json"), history)
    return unwrap(model)


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
        stopped = stop_together(STOP.asked, ctx)        # rank 0's word: every rank goes on, or none
        if (stage == "rl" or (stage == "all" and cfg.rl.max_steps > 0)) and not stopped:
            model = rl.run_rl(cfg, ctx, bundle, vq, model)
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
    t = cfg.train
    if t.stage == "rl" and not (t.resume and os.path.exists(os.path.join(t.out_dir, "ckpt_rl.pt"))):
        src = t.init_from or os.path.join(t.out_dir, "ckpt_sft.pt")
        if not os.path.exists(src):
            raise SystemExit(f"checkpoint error: --stage=rl starts from {src}, which does not exist; run "
                             f"--stage=sft first or point --train.init_from at an SFT checkpoint")
    if t.stage == "eval":
        latest_checkpoint(t.out_dir)


def final_eval(cfg, ctx: Ctx, model, bundle: Bundle, vq, t0: float):
    """The held-out evaluation at the end of `all` (or --stage=eval): metrics.json and samples.png."""
    out = cfg.train.out_dir
    if model is None:
        model, bundle, vq = load_latest(cfg, ctx)
    m = metrics.evaluate(model, bundle, vq, cfg, ctx.device, ctx.autocast, grid_path=os.path.join(out, "samples.png"))
    m.update(metrics.baselines(bundle, cfg))
    sft_path = os.path.join(out, "ckpt_sft.pt")
    beyond = D.parse_levels(cfg.data.eval_levels)[-1] > D.parse_levels(cfg.data.sft_levels)[-1]
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


if __name__ == "__main__":
    run_main(main)
