"""
Shared plumbing of the training loops (train.py) and the entry scripts (eval.py, sample.py and the
studies): nothing here is the method itself, it is what every stage needs around it.

  Ctx, setup()          device (cuda > mps > cpu), dtype (bf16 autocast on CUDA with bf16, or on any
                        device with --train.dtype=bfloat16; else fp32; the reason is printed), DDP from
                        torchrun's environment (NCCL on GPU, gloo on CPU), seeds offset by rank, out_dir
                        and log.txt (rank 0 writes files); Ctx.all_sum, Ctx.from_rank0 and
                        Ctx.average_gradients are the collectives rl.policy_update needs
  sync_grads, broadcast_params, all_reduce_mean, mean_over_all, from_rank0, stop_together
                        the collectives the training loops need (we do not wrap the model in
                        DistributedDataParallel: see sync_grads)
  STOP                  SIGINT / SIGTERM: stop after the current step with a checkpoint
  build_model, make_optimizer, lr_at, unwrap
  save_checkpoint, load_checkpoint, load_weights, model_from_checkpoint, latest_checkpoint,
  best_score            atomic checkpoints (tmp + rename) and one-line errors for the usual mistakes
  gather_rank_states, restore_rank_state
                        every rank's random state, so that a resumed run continues exactly
                        (tests/test_distributed.py)
  OutDirLock, run_main, write_json
                        one run per out_dir, the exit codes, strict JSON

The data bundle (pools -> tokens, cached; the SFT task sampler; a finished run's data) is data.py.
Like nanochat's common.py: the training scripts read top to bottom because this lives elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import config as C
import tokens as T
import vq as VQ
from model import Transformer

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
        """bf16 autocast when the dtype is bfloat16 (on CUDA by default when supported; on the CPU when
        asked for with --train.dtype=bfloat16, which runs the GPU presets' number format on a laptop);
        plain fp32 otherwise. Softmaxes, losses and Gumbel noise are computed in fp32 / fp64 anyway."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        return nullcontext()

    def all_sum(self, x: float) -> float:
        """x summed over the ranks (x itself on one process). Collective under DDP."""
        return all_reduce_mean(x, self) * self.world

    def from_rank0(self, x: float) -> float:
        """Rank 0's value of x on every rank (x itself on one process). Collective under DDP."""
        return from_rank0(x, self)

    def average_gradients(self, model):
        """Every gradient averaged over the ranks (sync_grads; nothing on one process). Collective."""
        sync_grads(model, self)

    def log(self, msg: str):
        """print + append to out_dir/log.txt, on rank 0 only."""
        if not self.master:
            return
        tqdm.write(msg)
        with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
            f.write(msg + "\n")


def setup(cfg) -> Ctx:
    tc = cfg.train
    ddp = int(os.environ.get("RANK", -1)) != -1
    if tc.device == "auto":
        device = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    else:
        device = tc.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"config error: --train.device={device} but torch sees no CUDA device here; "
                             f"use --train.device=cpu (or auto)")
        if device == "mps" and not torch.backends.mps.is_available():
            raise SystemExit("config error: --train.device=mps but MPS is not available; use --train.device=cpu (or auto)")
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
    if tc.dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            dtype, why = torch.bfloat16, f"bf16 autocast ({torch.cuda.get_device_name(device)} supports bf16)"
        else:
            dtype, why = torch.float32, f"fp32 (no bf16 autocast on {device.split(':')[0]})"
    else:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(tc.dtype)
        if dtype is None:
            raise SystemExit(f"config error: --train.dtype={tc.dtype!r}: expected auto, bfloat16 or float32")
        why = f"{tc.dtype} (requested)"
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(tc.seed + rank)
    try:
        os.makedirs(tc.out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"config error: --train.out_dir={tc.out_dir!r} cannot be created ({e.strerror}); "
                         f"pick a writable folder") from None
    return Ctx(device, dtype, why, ddp, rank, world, tc.out_dir)


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


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask the training loops to stop after the current step: they
    write their checkpoint as at a normal end and return, and train.py exits with a line that says
    how to --resume. A second signal stops at once; the last checkpoint is still whole, since every
    checkpoint is written to a temporary file and renamed."""

    def __init__(self):
        self.asked, self.signum = False, 0
        self._old = {}

    @property
    def exit_code(self) -> int:
        """The shell's convention for a stop by signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
        return 128 + (self.signum or signal.SIGINT)

    def _handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked, self.signum = True, signum
        # os.write, not print: a handler may interrupt a print in progress (print is not reentrant)
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step (checkpoint first); "
                    f"again to stop now\n".encode())

    def __enter__(self):
        self.asked, self.signum = False, 0
        if threading.current_thread() is threading.main_thread():     # handlers live on the main thread
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


STOP = StopRequest()      # train.main installs it (with STOP:); the loops read STOP.asked


class Stopped(Exception):
    """Raised between the batches of a long evaluation when STOP was asked. The checkpoints are
    written before any final evaluation, so nothing is lost; train.py exits with STOP.exit_code."""


def check_stop():
    """Raise Stopped if a signal asked to stop: called between the batches of long evaluations."""
    if STOP.asked:
        raise Stopped()



def comm_device(ctx: Ctx) -> str:
    """Where a collective's tensor lives: NCCL only moves CUDA tensors, gloo CPU ones."""
    return ctx.device if ctx.device.startswith("cuda") else "cpu"


def from_rank0(x: float, ctx: Ctx) -> float:
    """Rank 0's value of x on every rank. Wall-clock quantities (elapsed training time, the time
    budget's verdict) differ from rank to rank; whatever decides the learning rate or when to stop
    must be one number for all, or the ranks' weights drift apart or the next all-reduce hangs."""
    if not ctx.ddp:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=comm_device(ctx))
    dist.broadcast(t, 0)
    return t.item()


def mean_over_all(model, n_local: float, ctx: Ctx) -> float:
    """Turn gradients of summed micro-batch losses into the gradient of ONE mean over everything the
    step scored. Each micro-batch i of each rank has run backward on loss_i * n_i (its mean times
    the count it is a mean over); the step's loss is then sum_i loss_i n_i / N with N = sum_i n_i over
    all micro-batches and ranks, whatever their sizes. Averaging each micro-batch's mean instead
    would weight a token of a sparsely masked batch more than one of a densely masked batch (the
    same 16 rows as 1 x 16 or 2 x 8 gave gradients 9 % apart). Returns N. Collective under DDP."""
    n = all_reduce_mean(n_local, ctx) * ctx.world                 # the sum over ranks
    sync_grads(model, ctx)                                         # the mean over ranks ...
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(ctx.world / max(n, 1.0))                   # ... times world / N
    return n


def stop_together(flag: bool, ctx: Ctx) -> bool:
    """One stop decision for every rank: stop when ANY rank asks (a signal may reach one process
    only, e.g. a kill of one worker), and every rank adopts the signal (STOP.signum) so that all exit
    with the same code (143 for SIGTERM, not 130). Collective under DDP."""
    if not ctx.ddp:
        return bool(flag)
    t = torch.tensor([float(flag), float(STOP.signum)], dtype=torch.float64,
                     device=comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[1] > 0 and not STOP.signum:
        STOP.signum = int(t[1])
    return bool(t[0])


def best_score(path: str) -> float:
    """The quick-eval score stored in a best checkpoint (-inf when there is none yet), so that a
    resumed run only replaces it with a better one."""
    if not os.path.exists(path):
        return -math.inf
    s = torch.load(path, map_location="cpu", weights_only=False).get("score", -math.inf)
    return s if math.isfinite(s) else -math.inf


def all_reduce_mean(x: float, ctx: Ctx) -> float:
    if not ctx.ddp:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=comm_device(ctx))
    dist.all_reduce(t)
    return t.item() / ctx.world


# ----------------------------------------------------------------------------------------------
# model, optimizer, schedule, checkpoints



def build_model(cfg, tok: T.Tokenizer, device: str) -> Transformer:
    return Transformer(cfg.model, tok.vocab_size).to(device)



def make_optimizer(model, lr: float, weight_decay: float, device: str):
    """AdamW; weight decay on matrices only (norm gains and nothing else are 1-D here)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))


def lr_at(step: int, progress: float, warmup: int, lr: float, min_frac: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_frac as progress -> 1.
    progress = step / max_steps, or max(that, elapsed / time_budget) under an optional time cap: a run
    cut by its cap still finishes its schedule (the step count alone would leave the lr high)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers: what checkpoints store."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path: str, model, opt, step: int, cfg, bundle, extra: dict | None = None):
    """Atomic write (tmp + rename): a run killed mid-save never leaves a broken checkpoint.
    Holds the unwrapped model, the optimizer, step, config, tokenizer and rank 0's torch RNG state,
    plus the caller's `extra` (SFT: elapsed time, eval history, every rank's RNG and sampler state
    from gather_rank_states, the step's loss and the log's loss EMA)."""
    blob = {"model": unwrap(model).state_dict(), "optim": opt.state_dict() if opt is not None else None,
            "step": step, "config": C.to_dict(cfg), "vocab_size": bundle.tok.vocab_size, "vq_sha": vq_sha(cfg),
            "tok": bundle.tok.state(), "rng": {"torch": torch.get_rng_state()}, **(extra or {})}
    atomic_save(blob, path)


def atomic_save(obj, path: str):
    """torch.save to a temporary file of this process (path.tmp.<pid>: two runs never share one),
    then rename over `path`. An OSError while writing (a full disk: ENOSPC and kin) removes the
    partial file, keeps the previous `path` as it was, and stops with one line naming the file,
    the reason and the free space."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:         # torch.save reports a short write as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise SystemExit(f"save error: cannot write {path} ({why}; {free:.0f} MiB free on its disk); free "
                         f"space or pick another --out_dir (the previous {os.path.basename(path)} is unchanged)") from None


class OutDirLock:
    """One run per out_dir: `with OutDirLock(out_dir):` creates out_dir/.lock holding this process's
    pid and removes it on exit. A lock whose pid is still alive is a one-line error (another run is
    writing there); a lock whose process is gone (a killed run) is stale and taken over with a note."""

    def __init__(self, out_dir: str, log=print):
        self.path, self.log, self.held = os.path.join(out_dir, ".lock"), log, False

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(open(self.path).read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise SystemExit(f"config error: another run (pid {pid}) is using {os.path.dirname(self.path)}; "
                                     f"wait for it to finish or pick another --out_dir") from None
                self.log(f"note: removing the stale lock {self.path} (pid {pid} is not running)")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise SystemExit(f"config error: cannot take the lock {self.path}; remove it if no run uses the folder")

    def __exit__(self, *exc):
        if self.held and os.path.exists(self.path):
            os.remove(self.path)
        self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process: alive
        return True
    return True


EXIT_CODES = {"training error": 1, "save error": 1}     # runtime failures; every other one-line error is 2


def run_main(main, argv=None):
    """Run an entry script's main with the project's exit codes: a one-line error (a SystemExit
    with a message: config, data and checkpoint errors) goes to stderr and exits 2, a runtime failure
    ("training error: ...", "save error: ...") 1, a stop by signal 128 + the signal (SIGINT 130,
    SIGTERM 143; a second signal stops at once, the last checkpoint whole)."""
    try:
        main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            raise SystemExit(EXIT_CODES.get(e.code.split(":")[0], 2)) from None
        raise
    except KeyboardInterrupt:
        print("stopped at once (the last checkpoint written is whole)", file=sys.stderr)
        raise SystemExit(STOP.exit_code) from None


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


def vq_sha(cfg) -> str:
    """A fingerprint of the cached VQ tokenizer file of this config ("" when there is none yet)."""
    path = VQ.vq_path(cfg)
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


def check_vq(blob: dict, cfg, path: str):
    """The image codes a checkpoint learned must mean the same pictures now: its VQ tokenizer's
    fingerprint must match the cached file's, else a one-line error (a retrained tokenizer assigns
    other codes, and the model would read and draw garbage)."""
    want, have = blob.get("vq_sha", ""), vq_sha(cfg)
    if not want and not have:       # no tokenizer file on either side (a fake VQ in tests): nothing to compare
        return
    if not have:
        raise SystemExit(f"checkpoint error: the VQ tokenizer {VQ.vq_path(cfg)} that {path} needs is missing "
                         f"(a new one would assign other codes); restore {cfg.data.cache_dir}/ or retrain the checkpoint")
    if not want:
        print(f"warning: {path} records no VQ tokenizer fingerprint (an older version): cannot check that "
              f"{VQ.vq_path(cfg)} is the tokenizer it was trained with", file=sys.stderr)
    elif want != have:
        raise SystemExit(f"checkpoint error: {path} was trained with another VQ tokenizer than "
                         f"{VQ.vq_path(cfg)} (it was retrained since); retrain the checkpoint, or restore the file")


def check_model_config(blob: dict, cfg, path: str):
    """A run that continues a checkpoint must describe the same model: a --model.* flag that
    contradicts the checkpoint's is a one-line error naming the first differing key, before any
    work (otherwise the checkpoint's model would train and the flag's config be written beside it,
    and the result would never load again)."""
    try:
        theirs, ours = C.from_dict(blob["config"], path).model, cfg.model
    except C.ConfigError as e:
        raise SystemExit(f"checkpoint error: {e}") from None
    diff = [k for k in C.to_dict(C.Config())["model"] if getattr(theirs, k) != getattr(ours, k)]
    if diff:
        k = diff[0]
        raise SystemExit(f"config error: {path} was trained with --model.{k}={getattr(theirs, k)!r}, this run "
                         f"says --model.{k}={getattr(ours, k)!r}; drop the --model.* flags or use another out_dir")


def model_from_checkpoint(blob: dict, device: str) -> Transformer:
    """Rebuild the model with the checkpoint's own architecture (like nanoGPT's resume)."""
    model = build_model(C.from_dict(blob["config"]), T.Tokenizer.from_state(blob["tok"]), device)
    load_weights(model, blob["model"], "the checkpoint (written by another version of model.py?)")
    return model


def gather_rank_states(ctx: Ctx, sampler, **generators: torch.Generator) -> list[dict]:
    """Every rank's random state, for the checkpoint: the torch CPU generator (masks, t, prompt
    drop on CPU), the CUDA generator of its device (the same draws on GPU), its TaskSampler and the
    named `generators` of the stage (RL: the sampling noise and the prompt picker). The ranks draw
    different items and masks, so one rank's state restored on all of them would make every rank
    compute the same gradient after a resume. Collective: every rank calls it."""
    mine = {"torch": torch.get_rng_state(), "sampler": sampler.state(),
            **{name: g.get_state() for name, g in generators.items()}}
    if ctx.device.startswith("cuda"):
        mine["cuda"] = torch.cuda.get_rng_state(ctx.device)
    if not ctx.ddp:
        return [mine]
    out = [None] * ctx.world
    dist.all_gather_object(out, mine)
    return out


def restore_rank_state(blob: dict, ctx: Ctx, sampler, **generators: torch.Generator):
    """This rank's part of gather_rank_states() back (the same `generators` by name). Older checkpoints hold only rank 0's torch
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
    for name, g in generators.items():
        if name in st:
            g.set_state(st[name])


def resume_hint(ckpt_path: str) -> str:
    """How to continue after a failure, naming only a checkpoint that exists."""
    if os.path.exists(ckpt_path):
        return f"resume from {ckpt_path} (add --resume)"
    return f"run the command again ({os.path.basename(ckpt_path)} is not written yet: nothing to resume)"


def latest_checkpoint(out_dir: str) -> str:
    """out_dir's RL checkpoint if there is one, else its SFT checkpoint; a one-line error naming
    what to run when out_dir has neither."""
    for name in ("ckpt_rl.pt", "ckpt_sft.pt"):
        if os.path.exists(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    raise SystemExit(f"no checkpoint in {out_dir}: train one there (python train.py --out_dir={out_dir}) "
                     f"or pass --ckpt=PATH / the --out_dir of a finished run")


def peak_memory_mb(device: str) -> float:
    """The process's peak memory so far, in MiB: allocated GPU memory on CUDA
    (torch.cuda.max_memory_allocated), else the peak resident set size of the process (Linux and
    macOS getrusage; 0 where neither exists). On the CPU it counts everything the process holds
    (Python, the data, the tokenizer), so compare runs of the same job, not absolute numbers."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource            # Unix only; optional by design
    except ImportError:
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if os.uname().sysname == "Darwin" else rss / 2**10       # bytes on macOS, KiB on Linux


def write_json(path: str, result: dict):
    """Write `result` as strict JSON (NaN / inf, e.g. a ratio to a zero variance, become null)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(result), f, indent=1, allow_nan=False)
    print(f"wrote {path}")
