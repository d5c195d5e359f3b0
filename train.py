"""
The training script: every stage of the pipeline, one process or many, CPU or GPU.

    python train.py --preset=toy                     # the main toy job: vq (if not cached) -> sft -> rl -> eval
    python train.py --preset=toy --stage=sft         # one stage (vq | sft | rl | eval)
    python train.py --preset=small                   # one GPU, bf16 autocast
    torchrun --standalone --nproc_per_node=4 train.py --preset=base     # several GPUs (DDP)
    python train.py --preset=toy --resume            # continue the latest checkpoint in out_dir

Paper mapping (PAPER.md §2.4): stage 1 is SFT on traced reasoning data (+ the text-to-image data),
stage 2 the unified post-training (rl.py). We train the small VQ tokenizer first (vq.py) because no
pretrained one can be downloaded; the paper starts from LaViDa-O's pretrained weights instead.

What it does, top to bottom:
  setup()        device (cuda > mps > cpu), dtype (bf16 autocast on CUDA with bf16, else fp32; the
                 reason is printed), DDP from torchrun's environment (NCCL on GPU, gloo on CPU),
                 seeds offset by rank, out_dir, log.txt (rank 0 only writes files).
  get_bundle()   synthetic pools -> tokenizer -> VQ codes of every picture, computed ONCE and cached
                 in data.cache_dir (STYLE rule 15: tokenizing images never happens in the loop).
  run_sft()      masked-diffusion SFT (diffusion.sft_loss) on a task mix, global batch with derived
                 gradient accumulation, cosine LR, held-out eval curve, atomic checkpoints that
                 resume exactly (every rank's RNG and sampler state; tests/test_distributed.py).
                 Under DDP: rank 0's initial weights are broadcast and gradients averaged by one
                 flat all-reduce (sync_grads), not by the DDP wrapper.
  main()         the stage dispatcher; `all` writes config.json, log.txt, checkpoints, metrics.json
                 and the sample grid into out_dir.

Left out on purpose: FSDP/ZeRO, EMA weights, mixed fp16 (bf16 or fp32 only), wandb.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import config as C
import data as D
from diffusion import sft_loss
from model import ImageSpec, Transformer

# ----------------------------------------------------------------------------------------------
# setup


@dataclass
class Ctx:
    device: str
    dtype: torch.dtype
    dtype_reason: str
    ddp: bool
    rank: int
    world: int
    out_dir: str

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def autocast(self):
        """bf16 autocast on CUDA when supported; plain fp32 elsewhere (never autocast on CPU)."""
        if self.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def log(self, msg: str):
        """print + append to out_dir/log.txt, on rank 0 only."""
        if not self.master:
            return
        tqdm.write(msg)
        with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
            f.write(msg + "\n")


def setup(cfg) -> Ctx:
    t = cfg.train
    ddp = int(os.environ.get("RANK", -1)) != -1
    if t.device == "auto":
        device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    else:
        device = t.device
    rank, world = 0, 1
    if ddp:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        else:   # CPU ranks share the cores: give each its share instead of oversubscribing
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if t.dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            dtype, why = torch.bfloat16, f"bf16 autocast ({torch.cuda.get_device_name(device)} supports bf16)"
        else:
            dtype, why = torch.float32, f"fp32 (no bf16 autocast on {device.split(':')[0]})"
    else:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(t.dtype)
        if dtype is None:
            raise SystemExit(f"config error: --train.dtype={t.dtype!r}: expected auto, bfloat16 or float32")
        why = f"{t.dtype} (requested)"
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t.seed + rank)
    os.makedirs(t.out_dir, exist_ok=True)
    return Ctx(device, dtype, why, ddp, rank, world, t.out_dir)


def sync_grads(model, ctx: Ctx):
    """Average gradients over ranks with one all-reduce of a flat buffer. We do this by hand instead
    of wrapping the model in DistributedDataParallel because the sampler and the likelihood call
    model methods other than forward() (encode_prefix / forward_cached), which DDP's hooks miss."""
    if not ctx.ddp:
        return
    # every rank must reduce the SAME buffer: a parameter with no gradient on this rank (no
    # backward at all, e.g. an RL step whose rows all had advantage 0) takes part as zeros;
    # skipping it would make the buffers' sizes differ between ranks and the all-reduce hang
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world
    for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(piece.view_as(g))


def broadcast_params(model, ctx: Ctx):
    """Give every rank rank 0's weights. setup() seeds each rank differently (seed + rank), so a
    model built from scratch starts with different weights on every rank; the DDP wrapper would
    broadcast rank 0's in its constructor, and since we do not use it (see sync_grads) we do it
    here. Without it each rank would apply the averaged gradient to its own, different weights."""
    if not ctx.ddp:
        return
    with torch.no_grad():
        for t in unwrap(model).state_dict().values():     # parameters and persistent buffers
            dist.broadcast(t, 0)


def all_reduce_mean(x: float, ctx: Ctx) -> float:
    if not ctx.ddp:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=ctx.device if ctx.device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.item() / ctx.world


# ----------------------------------------------------------------------------------------------
# data: pools -> tokens, cached


@dataclass
class Bundle:
    tok: D.Tokenizer
    P: int
    layouts: dict
    sets: dict          # sets[task][split] -> data.TaskSet


def _bundle_key(cfg, vq_file: str) -> str:
    # the key covers everything the tokens depend on: the data and VQ configs, the VQ weights' file,
    # and the source of data.py itself (edit a task generator and the stale cache is not reused)
    blob = json.dumps(C.to_dict(cfg)["data"], sort_keys=True) + json.dumps(C.to_dict(cfg)["vq"], sort_keys=True)
    blob += str(os.path.getmtime(vq_file)) if os.path.exists(vq_file) else ""
    with open(D.__file__, "rb") as f:
        blob += hashlib.sha1(f.read()).hexdigest()
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def get_bundle(cfg, vq, ctx: Ctx) -> Bundle:
    """All tokenized sets. VQ codes are computed once per (data, vq) config and cached on disk."""
    import vq as VQ
    pools = D.build_pools(cfg.data)
    if cfg.data.jsonl:
        user, skipped = D.load_jsonl(cfg.data.jsonl, cfg.data, strict=False)
        ctx.log(f"jsonl: {len(user)} rows from {cfg.data.jsonl} ({skipped} malformed rows skipped)")
        for ex in user:   # traced rows join the SFT pool, answer-only rows the RL pool
            pools[ex.task]["sft" if ex.trace is not None else "rl"].append(ex)
    path = os.path.join(cfg.data.cache_dir, f"tokens_{_bundle_key(cfg, VQ.vq_path(cfg))}.pt")
    if os.path.exists(path):
        blob = torch.load(path, map_location="cpu", weights_only=False)
        tok = D.Tokenizer.from_state(blob["tok"])
        lay = {k: D.Layout(**v) for k, v in blob["layouts"].items()}
        sets = {t: {s: D.TaskSet(t, pools[t][s], *blob["sets"][t][s], lay[t]) for s in pools[t]} for t in pools}
        return Bundle(tok, blob["P"], lay, sets)
    t0 = time.time()
    side = cfg.data.image_size // cfg.vq.downsample                 # token grid side
    tok = D.Tokenizer.fit(D.all_texts(pools), cfg.vq.codebook_size, max_number=cfg.data.image_size, grid=side)
    n_img = side * side
    lay, P = D.layouts_for(pools, tok, n_img), D.prompt_width(pools, tok, n_img, cfg.data.cell_tags)
    sets = {}
    for task in pools:
        sets[task] = {}
        for split, exs in pools[task].items():
            D.ensure_images(exs, cfg.data)
            codes = vq.encode(np.stack([e.image for e in exs])) \
                if task != "t2i" and exs else None
            tcodes = vq.encode(np.stack([e.target_image for e in exs])) \
                if task in ("edit", "t2i") and exs else None
            sets[task][split] = D.tokenize_split(task, exs, tok, lay[task], P, codes, tcodes, cfg.data.cell_tags)
            for e in exs:      # pictures are cheap to re-render; keep memory flat
                if e.scene is not None:
                    e.image = e.target_image = None
    if tok.n_unknown:
        ctx.log(f"tokenizer: {tok.n_unknown} unknown words mapped to [UNK]")
    if ctx.master:
        os.makedirs(cfg.data.cache_dir, exist_ok=True)
        blob = {"tok": tok.state(), "P": P, "layouts": {k: vars(v) for k, v in lay.items()},
                "sets": {t: {s: (ts.prompt, ts.response) for s, ts in v.items()} for t, v in sets.items()}}
        torch.save(blob, path + ".tmp")
        os.replace(path + ".tmp", path)
    ctx.log(f"tokenized {sum(len(s) for v in sets.values() for s in v.values())} examples in "
            f"{time.time() - t0:.1f}s (vocab {tok.vocab_size}, prompt width {P}, response widths "
            + ", ".join(f"{k} {v.R}" for k, v in lay.items()) + f") -> {path}")
    return Bundle(tok, P, lay, sets)


# ----------------------------------------------------------------------------------------------
# model, optimizer, schedule, checkpoints


def image_spec(cfg, tok: D.Tokenizer) -> ImageSpec:
    """The vocabulary's image facts for the model: code ids, [IMASK], and the word naming each cell
    of the VQ token grid (one token per board cell in every preset)."""
    side = cfg.data.image_size // cfg.vq.downsample
    return ImageSpec(tok.img_offset, tok.IMASK, [tok.stoi[D.cell_name(k, side)] for k in range(side * side)])


def build_model(cfg, tok: D.Tokenizer, device: str) -> Transformer:
    return Transformer(cfg.model, tok.vocab_size, image_spec(cfg, tok)).to(device)


def make_optimizer(model, lr: float, weight_decay: float, device: str):
    """AdamW; weight decay on matrices only (norm gains and nothing else are 1-D here)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))


def lr_at(step: int, progress: float, warmup: int, lr: float, min_frac: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_frac as progress -> 1.
    progress = max(step / max_steps, elapsed / time_budget): a run cut by its time budget still
    finishes its schedule (toy runs are time-boxed, so the step count alone would leave lr high)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers: what checkpoints store."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: str, model, opt, step: int, cfg, bundle: Bundle, extra: dict | None = None):
    """Atomic write (tmp + rename): a run killed mid-save never leaves a broken checkpoint.
    Holds the unwrapped model, the optimizer, step, config, tokenizer and rank 0's torch RNG state,
    plus the caller's `extra` (SFT: elapsed time, eval history, every rank's RNG and sampler state
    from gather_rank_states, the step's loss and the log's loss EMA)."""
    blob = {"model": unwrap(model).state_dict(), "optim": opt.state_dict() if opt is not None else None,
            "step": step, "config": C.to_dict(cfg), "vocab_size": bundle.tok.vocab_size,
            "tok": bundle.tok.state(), "rng": {"torch": torch.get_rng_state()}, **(extra or {})}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str, vocab_size: int | None = None) -> dict:
    """Load on CPU (map_location) and check it fits the data, with one-line errors that say how."""
    if not os.path.exists(path):
        raise SystemExit(f"checkpoint error: {path} does not exist; run the stage that writes it "
                         f"(e.g. --stage=sft) or point --train.init_from at an existing file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"checkpoint error: {path} is unreadable ({type(e).__name__}: {e}); "
                         f"delete it and re-run the stage that writes it") from None
    if not isinstance(blob, dict) or "model" not in blob or "config" not in blob:
        raise SystemExit(f"checkpoint error: {path} is not a checkpoint of this project (no model/config)")
    if vocab_size is not None and blob.get("vocab_size") != vocab_size:
        raise SystemExit(f"checkpoint error: {path} has vocabulary {blob.get('vocab_size')} but the data has "
                         f"{vocab_size}; use the same --data.* and --vq.* flags it was trained with")
    return blob


def load_weights(model, state: dict, source: str):
    """load_state_dict with a one-line error: the usual cause is a checkpoint trained with other
    --model.* flags (or by an older model.py), and a key-by-key traceback does not say that."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise SystemExit(f"checkpoint error: {source} does not fit this model ({first[:160]}); use the "
                         f"--model.* flags it was trained with, or retrain it") from None


def model_from_checkpoint(blob: dict, device: str) -> Transformer:
    """Rebuild the model with the checkpoint's own architecture (like nanoGPT's resume)."""
    model = build_model(C.from_dict(blob["config"]), D.Tokenizer.from_state(blob["tok"]), device)
    load_weights(model, blob["model"], "the checkpoint (written by another version of model.py?)")
    return model


# ----------------------------------------------------------------------------------------------
# SFT


class TaskSampler:
    """Draws (task, index) training items by the task-mix weights. Each rank has its own stream."""

    def __init__(self, sets: dict, split: str, mix: dict, seed: int):
        self.sets, self.split = sets, split
        self.set_mix(mix)
        self.g = torch.Generator().manual_seed(seed)

    def set_mix(self, mix: dict):
        """Change the weights (a curriculum); the random stream goes on where it was."""
        self.mix = mix
        self.tasks = [t for t in mix if len(self.sets[t][self.split]) > 0 and mix[t] > 0]
        if not self.tasks:
            raise SystemExit(f"data error: no examples in split {self.split!r} for tasks {list(mix)}")
        self.w = torch.tensor([mix[t] for t in self.tasks])

    def draw(self, n: int) -> list[tuple[str, int]]:
        ti = torch.multinomial(self.w, n, replacement=True, generator=self.g)
        return [(self.tasks[i], int(torch.randint(len(self.sets[self.tasks[i]][self.split]), (1,),
                                                    generator=self.g))) for i in ti]

    def state(self):
        return self.g.get_state()

    def load_state(self, st):
        self.g.set_state(st)


def gather_rank_states(ctx: Ctx, sampler: TaskSampler) -> list[dict]:
    """Every rank's random state, for the checkpoint: the torch CPU generator (masks, t, prompt
    drop on CPU), the CUDA generator of its device (the same draws on GPU) and its TaskSampler.
    The ranks draw different items and masks, so one rank's state restored on all of them would
    make every rank compute the same gradient after a resume. Collective: every rank calls it."""
    mine = {"torch": torch.get_rng_state(), "sampler": sampler.state()}
    if ctx.device.startswith("cuda"):
        mine["cuda"] = torch.cuda.get_rng_state(ctx.device)
    if not ctx.ddp:
        return [mine]
    out = [None] * ctx.world
    dist.all_gather_object(out, mine)
    return out


def restore_rank_state(blob: dict, ctx: Ctx, sampler: TaskSampler):
    """This rank's part of gather_rank_states() back. Older checkpoints hold only rank 0's torch
    and sampler state; ranks the checkpoint has no state for keep their fresh (per-rank) seeds."""
    states = blob.get("rank_states") or [{"torch": blob["rng"]["torch"], "sampler": blob.get("sampler")}]
    if len(states) != ctx.world:
        ctx.log(f"note: checkpoint written with {len(states)} rank(s), resuming with {ctx.world}: "
                f"data order and masks will not continue exactly")
    if ctx.rank >= len(states):
        return
    st = states[ctx.rank]
    torch.set_rng_state(st["torch"])
    if st.get("sampler") is not None:
        sampler.load_state(st["sampler"])
    if "cuda" in st and ctx.device.startswith("cuda"):
        torch.cuda.set_rng_state(st["cuda"], ctx.device)


def run_sft(cfg, ctx: Ctx, bundle: Bundle, vq) -> Transformer:
    import eval as E
    t, dev = cfg.train, ctx.device
    accum = t.batch_size // (t.micro_batch * ctx.world)
    if accum < 1 or t.batch_size % (t.micro_batch * ctx.world):
        raise SystemExit(f"config error: train.batch_size={t.batch_size} must be a multiple of "
                         f"micro_batch*world = {t.micro_batch}*{ctx.world}")
    ckpt_path = os.path.join(t.out_dir, "ckpt_sft.pt")
    model = build_model(cfg, bundle.tok, dev)
    opt = make_optimizer(model, t.lr, t.weight_decay, dev)
    main_mix = C.parse_mix(t.task_mix)
    early_mix = C.parse_mix(t.task_mix_early) if t.early_frac > 0 else main_mix
    sampler = TaskSampler(bundle.sets, "sft", main_mix, t.seed * 1000 + ctx.rank)
    step, elapsed, history, ema = 0, 0.0, [], None
    if t.resume and os.path.exists(ckpt_path):
        blob = load_checkpoint(ckpt_path, bundle.tok.vocab_size)
        load_weights(unwrap(model), blob["model"], ckpt_path)
        opt.load_state_dict(blob["optim"])
        step, elapsed, history = blob["step"], blob.get("elapsed", 0.0), blob.get("history", [])
        restore_rank_state(blob, ctx, sampler)
        ema = blob.get("loss_ema")
        ctx.log(f"resumed SFT from {ckpt_path} at step {step}")
    elif t.init_from:
        load_weights(unwrap(model), load_checkpoint(t.init_from, bundle.tok.vocab_size)["model"], t.init_from)
    broadcast_params(model, ctx)
    raw = model
    if t.compile:
        model = torch.compile(model)
    ctx.log(f"SFT: {unwrap(raw).num_params(False) / 1e6:.2f}M params | {ctx.dtype_reason} | device {dev} | "
            f"world {ctx.world} | global batch {t.batch_size} = micro {t.micro_batch} x accum {accum} x world "
            f"{ctx.world} | max {t.max_steps} steps or {t.time_budget_s:.0f}s")
    model.train()
    t_start, bad_losses = time.time() - elapsed, 0
    bar = tqdm(total=t.max_steps, initial=step, disable=not ctx.master, desc="sft", dynamic_ncols=True,
               mininterval=5)
    while step < t.max_steps:
        progress = max(step / t.max_steps, (time.time() - t_start) / t.time_budget_s)
        lr = lr_at(step, progress, t.warmup, t.lr, t.min_lr_frac)
        mix = early_mix if progress < t.early_frac else main_mix      # curriculum (train.early_frac)
        if mix is not sampler.mix:
            sampler.set_mix(mix)
            ctx.log(f"step {step}: task mix {t.task_mix_early if mix is early_mix else t.task_mix}")
        for g in opt.param_groups:
            g["lr"] = lr
        t0, loss_sum, stats = time.time(), 0.0, {}
        for micro in range(accum):
            batch = D.collate({k: v["sft"] for k, v in bundle.sets.items()}, sampler.draw(t.micro_batch),
                              bundle.tok).to(dev)
            with ctx.autocast:
                loss, stats = sft_loss(model, batch, cfg.diffusion, bundle.tok)
                (loss / accum).backward()
            loss_sum += loss.item() / accum
        sync_grads(model, ctx)
        # the mean over ranks: every rank then takes the same skip-or-step decision below (a NaN on
        # one rank has already spread to every rank's gradients through the all-reduce)
        loss_sum = all_reduce_mean(loss_sum, ctx)
        if not math.isfinite(loss_sum):
            # never step on a NaN: drop this batch; several in a row means the run is broken
            opt.zero_grad(set_to_none=True)
            bad_losses += 1
            ctx.log(f"step {step}: non-finite loss ({loss_sum}); batch skipped ({bad_losses} in a row)")
            if bad_losses >= 5:
                raise SystemExit(f"training error: 5 non-finite losses in a row at step {step}; lower "
                                 f"--train.lr (now {t.lr}) and resume from {ckpt_path}")
            continue
        bad_losses = 0
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = loss_sum if ema is None else 0.95 * ema + 0.05 * loss_sum
        elapsed = time.time() - t_start
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}")
        if step % t.log_interval == 0:
            ctx.log(f"sft step {step}/{t.max_steps} | loss {ema:.4f} | masked acc {stats['masked_acc']:.3f} | "
                    f"lr {lr:.2e} | grad {gnorm:.2f} | {1000 * (time.time() - t0):.0f} ms/step | "
                    f"{elapsed:.0f}s elapsed")
        out_of_time = elapsed > t.time_budget_s
        if ctx.ddp:   # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)])
            dist.broadcast(flag, 0)
            out_of_time = bool(flag.item())
        done = step >= t.max_steps or out_of_time
        if t.eval_interval and (step % t.eval_interval == 0 or done) and ctx.master:
            m = E.evaluate(unwrap(model), bundle, vq, cfg, dev, ctx.autocast, n=min(100, cfg.eval.n_per_task))
            m.update(step=step, seconds=round(elapsed, 1))
            history.append(m)
            ctx.log(f"sft eval @ {step} ({elapsed:.0f}s): {E.headline(m)}")
        if step % t.ckpt_interval == 0 or done:
            states = gather_rank_states(ctx, sampler)       # collective: every rank takes part
            if ctx.master:   # loss = this step's loss (the resume test compares it), loss_ema = the log's
                save_checkpoint(ckpt_path, model, opt, step, cfg, bundle,
                                {"elapsed": elapsed, "history": history, "sampler": sampler.state(),
                                 "rank_states": states, "loss": loss_sum, "loss_ema": ema})
            if ctx.ddp:      # nobody runs ahead (or exits) while rank 0 is still writing
                dist.barrier()
        if done:
            break
    bar.close()
    ctx.log(f"SFT done: {step} steps in {elapsed:.0f}s -> {ckpt_path}")
    if ctx.master:
        with open(os.path.join(t.out_dir, "sft_curve.json"), "w") as f:
            json.dump(history, f, indent=1)
    return unwrap(model)


# ----------------------------------------------------------------------------------------------
# entry points


def load_for_eval(cfg, ctx: Ctx):
    """(model, bundle, vq) for eval.py: the RL checkpoint if present, else the SFT one."""
    import vq as VQ
    vq = VQ.get_vq(cfg, ctx.device, ctx.out_dir)
    bundle = get_bundle(cfg, vq, ctx)
    for name in ("ckpt_rl.pt", "ckpt_sft.pt"):
        path = os.path.join(cfg.train.out_dir, name)
        if os.path.exists(path):
            blob = load_checkpoint(path, bundle.tok.vocab_size)
            ctx.log(f"eval: {path} (step {blob['step']})")
            return model_from_checkpoint(blob, ctx.device), bundle, vq
    return model_from_checkpoint(load_checkpoint(os.path.join(cfg.train.out_dir, "ckpt_sft.pt")), ctx.device), bundle, vq


def main(argv=None):
    import eval as E
    import vq as VQ
    cfg = C.get_config(argv)
    ctx = setup(cfg)
    stage, out = cfg.train.stage, cfg.train.out_dir
    if ctx.master:
        C.save_config(cfg, out)
        ctx.log(f"$ python train.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        ctx.log(f"torch {torch.__version__} | device {ctx.device} | {ctx.dtype_reason} | world {ctx.world}")
        ctx.log("config: " + json.dumps(C.to_dict(cfg)))
    t0 = time.time()
    if stage == "vq":
        VQ.run_vq_stage(cfg, out, ctx.device)
        return
    vq = VQ.get_vq(cfg, ctx.device, out)
    try:
        bundle = get_bundle(cfg, vq, ctx)
    except C.ConfigError as e:        # a config value only the data builder can check (e.g. a colour)
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    model = None
    if stage in ("sft", "all"):
        model = run_sft(cfg, ctx, bundle, vq)
    if stage == "rl" or (stage == "all" and cfg.rl.max_steps > 0):
        import rl
        model = rl.run_rl(cfg, ctx, bundle, vq, model)
    if stage in ("eval", "all") and ctx.master:
        if model is None:
            model, bundle, vq = load_for_eval(cfg, ctx)
        m = E.evaluate(model, bundle, vq, cfg, ctx.device, ctx.autocast,
                       grid_path=os.path.join(out, "samples.png"))
        m.update(E.baselines(bundle, cfg))
        m["total_seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(m, f, indent=1)
        ctx.log(f"final eval: {E.headline(m)}")
        ctx.log(f"baselines: vqa prior {m['vqa_prior_acc']:.3f} | ground random mIoU {m['ground_random_miou']:.3f} "
                f"P@0.5 {m['ground_random_p50']:.3f} | edit copy-input {m['edit_copy_score']:.3f} | "
                f"t2i empty-canvas cell acc {m['t2i_empty_cell_acc']:.3f}")
        ctx.log(f"wrote {out}/metrics.json and {out}/samples.png ({m['total_seconds']:.0f}s in all)")
    if ctx.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
