"""
Tests of the multi-process and checkpoint machinery (common.py, train.run_sft):

  1. DDP equivalence: 2 CPU processes on gloo, each with 2 micro-batches per step and gradients
     combined by common.mean_over_all, end with the same parameters after 3 AdamW steps as ONE
     process that takes the mean over every scored token of all 4 micro-batches and steps once. The ranks start from
     different seeds (setup() seeds seed + rank), so this also checks common.broadcast_params. A 4th
     step in which rank 1 runs no backward at all checks that sync_grads still agrees with the
     reference (rank 1 counts as a zero gradient) instead of hanging.
  2. Resume: run_sft for 3 steps straight == 2 steps, a crash right after the step-2 checkpoint,
     then --resume for the 3rd step (same loss at step 3, same weights), in one process and in two
     (each rank restores its OWN RNG and sampler state). Two controls show that the test has teeth:
     without the sampler state or without the torch RNG state the step-3 loss differs.
  3. Checkpoints: load with map_location="cpu" (tensors on the CPU), atomic write, and one-line
     SystemExit messages for a missing, corrupted, truncated or foreign file and a wrong vocabulary.
  4. The RL stage (rl.py, train.run_rl) on 2 processes: one rl.rl_step per rank (own prompts,
     samples, SFT rows) ends with the weights of ONE process running rl.policy_update on the union
     of the ranks' rows with N = N_0 + N_1; rl.shared_t masks every micro-batch of every rank at one
     rate; and (slow) SIGTERM mid-RL-step or during an RL quick eval exits 143 on both ranks with
     ckpt_rl.pt at that step, and --resume ends bit-identical to an uninterrupted 2-process run;
     a SIGTERM that reaches ONE rank only stops both ranks the same way (common.stop_together takes
     any rank's request and its signal: a quick check in the first launch, the full run slow).

The world is tiny: a few synthetic examples per family, a fake VQ (one code per 8x8 patch from its
mean colour), a 1-layer d_model=32 Transformer. The two processes are started the way torchrun
starts them (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK in the environment, this file run as
a script), so common.setup's DDP detection is what is tested. One launch serves the DDP tests of
1-3 (worker), one those of 4 but the stop (rl_step_worker), one the RL stop (rl_stop_worker).

    python -m pytest tests/test_distributed.py -q
"""
import copy
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config as C  # noqa: E402
import data as D  # noqa: E402
import common  # noqa: E402
import rl  # noqa: E402
import tokens as T  # noqa: E402
import train  # noqa: E402
from diffusion import sft_loss  # noqa: E402
from rollout import RolloutContext  # noqa: E402

# tiny tensors on a shared 2-core box: extra intra-op threads only add contention
torch.set_num_threads(1)

WORLD, ACCUM, K_STEPS = 2, 2, 3      # DDP equivalence: ranks, micro-batches per rank, steps compared
MICRO = 2                            # rows per micro-batch
N_RESUME = 2                         # resume: crash after step N_RESUME, compare step N_RESUME + 1


class FakeVQ:
    """A stand-in tokenizer: each 8x8 patch -> one code from a hash of its mean colour. get_bundle
    only needs .encode; .decode (eval only, unused here) paints every patch grey."""

    def __init__(self, image_size: int = 32, ds: int = 8, K: int = 64):
        self.size, self.ds, self.K = image_size, ds, K

    def encode(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images)).float()                 # (N, H, W, 3)
        N, h = x.shape[0], self.size // self.ds
        m = x.view(N, h, self.ds, h, self.ds, 3).mean((2, 4)).round().long()   # (N, h, h, 3)
        return ((m[..., 0] * 31 + m[..., 1] * 17 + m[..., 2] * 7) % self.K).reshape(N, -1)  # (N, h*h)

    def decode(self, codes) -> torch.Tensor:
        return torch.full((len(codes), self.size, self.size, 3), 0.5)


def tiny_config(out_dir: str, cache_dir: str, **over) -> C.Config:
    o = {"data.n_sft": 8, "data.n_rl": 2, "data.n_eval": 2, "data.cache_dir": cache_dir,
         "model.n_layer": 1, "model.n_head": 2, "model.d_model": 32, "model.max_len": 128,
         "train.out_dir": out_dir, "train.device": "cpu", "train.batch_size": 4, "train.micro_batch": 2,
         "train.max_steps": N_RESUME + 1, "train.time_budget_s": 0.0, "train.eval_interval": 0,
         "train.ckpt_interval": 1, "train.log_interval": 1, "train.warmup": 1, "train.lr": 1e-2}
    o.update(over)
    return C.make_config("toy", o)


def make_bundle(cfg) -> D.Bundle:
    ctx = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, cfg.train.out_dir)
    os.makedirs(cfg.train.out_dir, exist_ok=True)
    return D.get_bundle(cfg, FakeVQ(cfg.data.image_size), ctx)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in common.unwrap(model).state_dict().items()}


# ----------------------------------------------------------------------------------------------
# the sync_grads run: the same deterministic micro-batches in the worker and in the reference

def micro_batch(bundle, rank: int, step: int, micro: int):
    """Micro-batch `micro` of rank `rank` at step `step`: fixed items, a fixed t, a seeded mask."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    tasks = ("vqa", "ground", "edit", "t2i")
    items = [(tasks[int(torch.randint(4, (1,), generator=g))], int(torch.randint(8, (1,), generator=g)))
             for _ in range(MICRO)]
    batch = T.collate({k: v["sft"] for k, v in bundle.sets.items()}, items, bundle.tok)
    return batch, torch.full((MICRO,), 0.3 + 0.1 * micro), g


def micro_loss(model, bundle, cfg, rank, step, micro):
    """The micro-batch's summed loss (its mean times the count it is a mean over) and that count."""
    batch, t, g = micro_batch(bundle, rank, step, micro)
    loss, stats = sft_loss(model, batch, cfg.diffusion, bundle.tok, generator=g, t=t)
    return loss * stats["n"], stats["n"]


def sync_run(cfg, ctx, bundle) -> dict:
    """The run_sft recipe (build, broadcast, accumulate, sync_grads, clip, AdamW) on fixed batches.
    Returns the weights at init and after K_STEPS steps, and after the extra step in which rank 1
    does no backward."""
    model = common.build_model(cfg, bundle.tok, "cpu")     # seeded seed + rank
    before = params(model)
    common.broadcast_params(model, ctx)
    opt = common.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, "cpu")
    out = {"init_own": before, "init": params(model)}
    for step in range(K_STEPS + 1):
        n = 0.0
        if step < K_STEPS or ctx.rank == 0:
            for micro in range(ACCUM):
                loss, count = micro_loss(model, bundle, cfg, ctx.rank, step, micro)
                loss.backward()
                n += count
        common.mean_over_all(model, n, ctx)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == K_STEPS - 1:
            out["after_k"] = params(model)
    out["after_k1"] = params(model)
    return out


def reference_run(cfg, bundle) -> dict:
    """One process: all ranks' micro-batches of a step, the gradient of their summed loss divided by
    the total count: the mean over every scored token of the step, written out."""
    torch.manual_seed(cfg.train.seed)                                      # rank 0's init
    model = common.build_model(cfg, bundle.tok, "cpu")
    opt = common.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, "cpu")
    out = {"init": params(model)}
    for step in range(K_STEPS + 1):
        ranks = range(WORLD) if step < K_STEPS else [0]                    # the step rank 1 sits out
        n = 0.0
        for r in ranks:
            for micro in range(ACCUM):
                loss, count = micro_loss(model, bundle, cfg, r, step, micro)
                loss.backward()
                n += count
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= n
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == K_STEPS - 1:
            out["after_k"] = params(model)
    out["after_k1"] = params(model)
    return out


# ----------------------------------------------------------------------------------------------
# the RL update: N of Eq. U over every rank (forced samples that join on one rank only)

RL_ROWS = {0: [0, 1, 2], 1: [3, 4, 5, 6]}     # each rank's kept rows (indices into the SFT pool)
RL_N = {0: 9, 1: 14}                          # each rank's N: rank 1 had a forced sample join (+1) and more rows


def rl_triplets(bundle, rows: list[int], n: int, scale: float = 1.0) -> rl.Triplets:
    """Fixed triplets: vqa SFT rows `rows` with advantages +-1, 0.5 (scaled), and N = n."""
    batch = T.collate({"vqa": bundle.sets["vqa"]["sft"]}, [("vqa", i) for i in rows], bundle.tok)
    adv = torch.tensor([(1.0, -1.0, 0.5)[i % 3] for i in rows]) * scale
    return rl.Triplets(batch, adv, n)


def rl_config(cfg, mu: int):
    c = copy.deepcopy(cfg)
    c.rl.likelihood, c.rl.ppo_epochs, c.train.micro_batch = "one_step", mu, 2   # one_step: no random masks
    return c


def rl_context(model, bundle, cfg, ctx, gen) -> RolloutContext:
    """What rl.policy_update reads of a rollout context: the policy, the tokenizer, the configs, the
    device and the mask generator (no pictures are judged here)."""
    return RolloutContext(model, bundle.tok, bundle.sets, None, cfg, ctx.device, ctx.autocast, gen)


def rl_update_run(cfg, ctx, bundle, world: int, rank: int) -> dict:
    """Two RL updates (mu = 1, then mu = 2: the clipped ratio) on this rank's triplets (ranks > 0:
    RL_ROWS[rank]; one process: every rank's rows with N = the sum), then a step with no row on any
    rank. Returns the weights after the updates and after the row-less step, and the optimizer's
    step count (AdamW's "step" of one parameter) before and after it."""
    torch.manual_seed(cfg.train.seed)
    model = common.build_model(cfg, bundle.tok, "cpu")
    common.broadcast_params(model, ctx)
    opt = common.make_optimizer(model, cfg.rl.lr, cfg.train.weight_decay, "cpu")
    gen = torch.Generator().manual_seed(0)
    if world == 1:
        trip = rl_triplets(bundle, RL_ROWS[0] + RL_ROWS[1], RL_N[0] + RL_N[1])
    else:
        trip = rl_triplets(bundle, RL_ROWS[rank], RL_N[rank])
    for mu in (1, 2):
        u = rl.policy_update(rl_context(model, bundle, rl_config(cfg, mu), ctx, gen), opt, trip, ctx)
        assert u.skipped is None, u.skipped
    out = {"after": params(model), "loss": u.loss}
    steps = int(opt.state[next(iter(model.parameters()))]["step"])
    empty = rl.Triplets(None, torch.zeros(0), RL_N[rank])
    u = rl.policy_update(rl_context(model, bundle, rl_config(cfg, 1), ctx, gen), opt, empty, ctx)
    out.update(after_empty=params(model), skipped=u.skipped, steps=(steps, int(opt.state[next(iter(model.parameters()))]["step"])))
    return out


class Crash(Exception):
    """A stand-in for a run killed right after a checkpoint was written."""


def crash_after_checkpoint(n: int):
    """Patches for run_sft: raise Crash after the step-n checkpoint is written (and, under DDP,
    after the barrier that follows it, so that every rank stops at the same point)."""
    calls = {"n": 0}
    gather, barrier = train.gather_rank_states, torch.distributed.barrier

    def counting_gather(ctx, sampler):
        calls["n"] += 1                                # ckpt_interval = 1: call k is at step k
        states = gather(ctx, sampler)
        if not ctx.ddp and calls["n"] == n:
            # one process: no barrier follows; crash at the save itself, after the write
            save = train.save_checkpoint

            def save_then_crash(*a, **k):
                save(*a, **k)
                raise Crash()
            train.save_checkpoint = save_then_crash
        return states

    def crashing_barrier(*a, **k):
        barrier(*a, **k)
        if calls["n"] == n:
            raise Crash()
    return counting_gather, crashing_barrier


def resume_runs(base_dir: str, cache_dir: str, setup_ctx) -> dict:
    """3 steps straight, and 2 steps + crash + 1 resumed step. Returns each run's final checkpoint."""
    out = {}
    cfg = tiny_config(os.path.join(base_dir, "straight"), cache_dir)
    ctx = setup_ctx(cfg)
    bundle = make_bundle(cfg)
    train.run_sft(cfg, ctx, bundle, FakeVQ())
    out["straight"] = torch.load(os.path.join(cfg.train.out_dir, "ckpt_sft.pt"), weights_only=False)

    cfg = tiny_config(os.path.join(base_dir, "crashed"), cache_dir)
    ctx = setup_ctx(cfg)
    orig = (train.gather_rank_states, torch.distributed.barrier, train.save_checkpoint)
    train.gather_rank_states, torch.distributed.barrier = crash_after_checkpoint(N_RESUME)
    try:
        train.run_sft(cfg, ctx, bundle, FakeVQ())
        raise AssertionError("the run did not crash")
    except Crash:
        pass
    finally:
        train.gather_rank_states, torch.distributed.barrier, train.save_checkpoint = orig
    out["at_crash"] = torch.load(os.path.join(cfg.train.out_dir, "ckpt_sft.pt"), weights_only=False)
    cfg = tiny_config(cfg.train.out_dir, cache_dir, **{"train.resume": True})
    ctx = setup_ctx(cfg)                                 # a new process: reseeded from scratch
    train.run_sft(cfg, ctx, bundle, FakeVQ())
    out["resumed"] = torch.load(os.path.join(cfg.train.out_dir, "ckpt_sft.pt"), weights_only=False)
    return out


# ----------------------------------------------------------------------------------------------
# the worker: this file run as a script by torchrun-like environment variables

def worker(out_dir: str, cache_dir: str):
    cfg = tiny_config(os.path.join(out_dir, "sync"), cache_dir)
    ctx = common.setup(cfg)                               # RANK etc. set -> gloo process group
    torch.set_num_threads(1)
    assert ctx.ddp and ctx.world == WORLD, (ctx.ddp, ctx.world)
    bundle = make_bundle(cfg)                            # the parent wrote the token cache
    res = {"sync": sync_run(cfg, ctx, bundle), "rl": rl_update_run(cfg, ctx, bundle, ctx.world, ctx.rank)}

    def setup_ctx(c):
        return common.setup(c)
    ck = resume_runs(os.path.join(out_dir, "resume"), cache_dir, setup_ctx)
    # every rank reports its own final weights (run_sft's checkpoints are rank 0's alone)
    res["resume"] = {k: {kk: v[kk] for kk in ("step", "loss", "rank_states")} for k, v in ck.items()}
    res["resume_model"] = {k: v["model"] for k, v in ck.items()} if ctx.master else None
    # the ranks' stop decision when a SIGTERM reached rank 1 alone, then when no rank was signalled
    common.STOP.signum = 15 if ctx.rank == 1 else 0          # SIGTERM: exit code 128 + 15
    res["stop"] = (common.stop_together(ctx.rank == 1, ctx), common.STOP.exit_code, common.stop_together(False, ctx))
    common.STOP.signum = 0
    torch.save(res, os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Launch the 2 ranks once; every DDP test reads their results."""
    tmp = tmp_path_factory.mktemp("ddp")
    cache = str(tmp / "cache")
    cfg = tiny_config(str(tmp / "sync"), cache)
    bundle = make_bundle(cfg)                            # written once, before the ranks read it
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(tmp), cache],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers hung (> 180 s)")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"
    res = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return SimpleNamespace(res=res, cfg=cfg, bundle=bundle, cache=cache)


def assert_close(a: dict, b: dict, atol=1e-5, what=""):
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k] - b[k]).abs().max().item()
        assert err <= atol, f"{what} {k}: max |diff| {err:.3g} > {atol}"


# ----------------------------------------------------------------------------------------------
# 1. DDP equivalence


def test_ddp_ranks_start_from_rank0_weights(ddp):
    r0, r1 = ddp.res[0]["sync"], ddp.res[1]["sync"]
    # setup() seeds rank r with seed + r: without broadcast_params the two inits differ ...
    assert any(not torch.equal(r0["init_own"][k], r1["init_own"][k]) for k in r0["init_own"])
    # ... with it, both ranks hold rank 0's weights, which are the 1-process run's init
    assert_close(r0["init"], r1["init"], 0.0, "init")
    ref = reference_run(ddp.cfg, ddp.bundle)
    assert_close(r0["init"], ref["init"], 0.0, "init vs reference")


def test_ddp_matches_one_process_with_grad_accumulation(ddp):
    ref = reference_run(ddp.cfg, ddp.bundle)
    moved = max((ref["after_k"][k] - ref["init"][k]).abs().max().item() for k in ref["init"])
    assert moved > 1e-3                                  # the steps really changed the weights
    for rank in range(WORLD):
        assert_close(ddp.res[rank]["sync"]["after_k"], ref["after_k"], 1e-5, f"rank {rank} after {K_STEPS} steps:")
    # the two ranks hold the same weights (float tolerance: the all-reduce sums in its own order)
    assert_close(ddp.res[0]["sync"]["after_k"], ddp.res[1]["sync"]["after_k"], 1e-6, "rank 0 vs 1:")
    # and rank 1's micro-batches mattered: rank 0's data alone gives other weights
    solo = copy.deepcopy(ddp.cfg)
    torch.manual_seed(solo.train.seed)
    m = common.build_model(solo, ddp.bundle.tok, "cpu")
    opt = common.make_optimizer(m, solo.train.lr, solo.train.weight_decay, "cpu")
    for step in range(K_STEPS):
        n = 0.0
        for micro in range(ACCUM):
            loss, count = micro_loss(m, ddp.bundle, solo, 0, step, micro)
            loss.backward()
            n += count
        for p in m.parameters():
            p.grad /= n
        torch.nn.utils.clip_grad_norm_(m.parameters(), solo.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    diff = max((params(m)[k] - ref["after_k"][k]).abs().max().item() for k in ref["init"])
    assert diff > 1e-4


def test_ddp_rank_without_backward_counts_as_zero_gradient(ddp):
    ref = reference_run(ddp.cfg, ddp.bundle)
    for rank in range(WORLD):
        assert_close(ddp.res[rank]["sync"]["after_k1"], ref["after_k1"], 1e-5, f"rank {rank}, step {K_STEPS + 1}:")


def test_rl_update_normalises_by_the_n_of_every_rank(ddp):
    """Eq. U's N is the step's total over ranks: two ranks whose N differ (a forced sample joined on
    rank 1 only) make the same two updates (mu = 1, then the clipped mu = 2) as one process holding
    every row with N = N_0 + N_1. The old rule, (1/W) sum_r (1/N_r) sum_i, gives other weights."""
    ctx1 = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, "unused")
    ref = rl_update_run(ddp.cfg, ctx1, ddp.bundle, 1, 0)
    moved = max((ref["after"][k] - params_init(ddp)[k]).abs().max().item() for k in ref["after"])
    assert moved > 1e-5
    for rank in range(WORLD):
        assert_close(ddp.res[rank]["rl"]["after"], ref["after"], 1e-6, f"rank {rank} RL update:")
        assert abs(ddp.res[rank]["rl"]["loss"] - ref["loss"]) < 1e-5
    # the per-rank normaliser, written as one process: row i of rank r weighs N / (W N_r)
    torch.manual_seed(ddp.cfg.train.seed)
    model = common.build_model(ddp.cfg, ddp.bundle.tok, "cpu")
    opt = common.make_optimizer(model, ddp.cfg.rl.lr, ddp.cfg.train.weight_decay, "cpu")
    n = RL_N[0] + RL_N[1]
    parts = [rl_triplets(ddp.bundle, RL_ROWS[r], n, scale=n / (WORLD * RL_N[r])) for r in range(WORLD)]
    old = rl.Triplets(T.cat_batches([p.batch for p in parts], ddp.bundle.tok), torch.cat([p.adv for p in parts]), n)
    for mu in (1, 2):
        rl.policy_update(rl_context(model, ddp.bundle, rl_config(ddp.cfg, mu), ctx1, torch.Generator().manual_seed(0)),
                         opt, old, ctx1)
    diff = max((params(model)[k] - ref["after"][k]).abs().max().item() for k in ref["after"])
    assert diff > 1e-6, "the test cannot tell the two normalisers apart"


def params_init(ddp) -> dict:
    torch.manual_seed(ddp.cfg.train.seed)
    return params(common.build_model(ddp.cfg, ddp.bundle.tok, "cpu"))


def test_one_ranks_stop_request_stops_every_rank_with_its_signal(ddp):
    """common.stop_together with a SIGTERM on rank 1 only: both ranks stop and both exit 143 (rank
    0 adopts the signal); with no request no rank stops."""
    for rank in range(WORLD):
        assert ddp.res[rank]["stop"] == (True, 143, False), (rank, ddp.res[rank]["stop"])


def test_a_step_without_rows_is_skipped_alike_on_one_process_and_on_two(ddp):
    """No row on any rank: no optimizer step (AdamW's step count, momentum and weight decay stay
    as they were) under DDP, exactly as on one process; before, sync_grads zero-filled the missing
    gradients under DDP and AdamW stepped on them."""
    ctx1 = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, "unused")
    ref = rl_update_run(ddp.cfg, ctx1, ddp.bundle, 1, 0)
    for res in [ref] + [ddp.res[r]["rl"] for r in range(WORLD)]:
        assert res["skipped"] == "no rows"
        assert res["steps"][0] == res["steps"][1] == 3          # mu = 1, then mu = 2
        assert_close(res["after_empty"], res["after"], 0.0, "a row-less step moved the weights:")


# ----------------------------------------------------------------------------------------------
# 2. resume gives the same next-step loss


def test_resume_same_next_step_loss_one_process(tmp_path):
    ck = resume_runs(str(tmp_path), str(tmp_path / "cache"), common.setup)
    assert ck["at_crash"]["step"] == N_RESUME
    assert ck["straight"]["step"] == ck["resumed"]["step"] == N_RESUME + 1
    assert ck["straight"]["loss"] == pytest.approx(ck["resumed"]["loss"], abs=1e-6)
    assert_close(ck["straight"]["model"], ck["resumed"]["model"], 1e-6, "weights after resume:")
    assert len(ck["resumed"]["rank_states"]) == 1


@pytest.mark.parametrize("drop", ["sampler", "torch_rng"])
def test_resume_without_saved_state_differs(tmp_path, monkeypatch, drop):
    """Controls: the resume test above fails if either state is not restored."""
    ck = resume_runs(str(tmp_path / "ok"), str(tmp_path / "cache"), common.setup)
    crashed = str(tmp_path / "control")
    os.makedirs(crashed)
    torch.save(ck["at_crash"], os.path.join(crashed, "ckpt_sft.pt"))
    if drop == "sampler":
        monkeypatch.setattr(D.TaskSampler, "load_state", lambda self, st: None)
    else:
        monkeypatch.setattr(torch, "set_rng_state", lambda st: None)
    cfg = tiny_config(crashed, str(tmp_path / "cache"), **{"train.resume": True})
    train.run_sft(cfg, common.setup(cfg), make_bundle(cfg), FakeVQ())
    blob = torch.load(os.path.join(crashed, "ckpt_sft.pt"), weights_only=False)
    assert blob["step"] == N_RESUME + 1
    assert abs(blob["loss"] - ck["straight"]["loss"]) > 1e-4


def test_resume_same_next_step_loss_two_processes(ddp):
    r0 = ddp.res[0]
    st, rs = r0["resume"]["straight"], r0["resume"]["resumed"]
    assert r0["resume"]["at_crash"]["step"] == N_RESUME and rs["step"] == N_RESUME + 1
    assert st["loss"] == pytest.approx(rs["loss"], abs=1e-6)
    assert_close(r0["resume_model"]["straight"], r0["resume_model"]["resumed"], 1e-6, "DDP weights after resume:")
    # one state per rank, and the ranks' streams differ (else they would draw the same items)
    states = r0["resume"]["at_crash"]["rank_states"]
    assert len(states) == WORLD and not torch.equal(states[0]["sampler"], states[1]["sampler"])
    assert not torch.equal(states[0]["torch"], states[1]["torch"])


# ----------------------------------------------------------------------------------------------
# 3. checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(str(tmp), str(tmp / "cache"))
    bundle = make_bundle(cfg)
    torch.manual_seed(0)
    model = common.build_model(cfg, bundle.tok, "cpu")
    opt = common.make_optimizer(model, 1e-3, 0.0, "cpu")
    micro_loss(model, bundle, cfg, 0, 0, 0)[0].backward()
    opt.step()                                            # optimizer state with tensors
    path = str(tmp / "ckpt_sft.pt")
    common.save_checkpoint(path, model, opt, 7, cfg, bundle, {"elapsed": 1.5})
    return SimpleNamespace(path=path, model=model, bundle=bundle, cfg=cfg, tmp=tmp)


def all_tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from all_tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from all_tensors(v)


def test_checkpoint_round_trip_on_cpu(saved, monkeypatch):
    seen = {}
    real = torch.load

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)
    monkeypatch.setattr(torch, "load", spy)
    blob = common.load_checkpoint(saved.path, saved.bundle.tok.vocab_size)
    assert seen.get("map_location") == "cpu"             # GPU checkpoints load on a CPU-only box
    assert blob["step"] == 7 and blob["elapsed"] == 1.5
    ts = list(all_tensors(blob))
    assert ts and all(t.device.type == "cpu" for t in ts)
    assert not os.path.exists(saved.path + ".tmp")       # atomic: tmp renamed away
    m = common.model_from_checkpoint(blob, "cpu")
    assert_close(params(m), params(saved.model), 0.0, "model_from_checkpoint:")
    assert C.from_dict(blob["config"]) == saved.cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_loads_on_cpu(saved, tmp_path):
    m = copy.deepcopy(saved.model).cuda()
    opt = common.make_optimizer(m, 1e-3, 0.0, "cuda")
    path = str(tmp_path / "gpu.pt")
    common.save_checkpoint(path, m, opt, 1, saved.cfg, saved.bundle)
    blob = common.load_checkpoint(path)
    assert all(t.device.type == "cpu" for t in all_tensors(blob))


def one_line_exit(path, vocab=None) -> str:
    with pytest.raises(SystemExit) as e:
        common.load_checkpoint(path, vocab)
    msg = str(e.value.code)
    assert msg.startswith("checkpoint error: ") and "\n" not in msg, msg
    return msg


def test_checkpoint_errors_are_one_line(saved, tmp_path):
    assert "does not exist" in one_line_exit(str(tmp_path / "nope.pt"))
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a torch file\n" * 10)
    assert "unreadable" in one_line_exit(str(bad))
    cut = tmp_path / "truncated.pt"
    raw = open(saved.path, "rb").read()
    cut.write_bytes(raw[:len(raw) // 2])
    assert "unreadable" in one_line_exit(str(cut))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "unreadable" in one_line_exit(str(empty))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert "not a checkpoint of this project" in one_line_exit(str(foreign))
    assert "vocabulary" in one_line_exit(saved.path, saved.bundle.tok.vocab_size + 1)


def test_architecture_mismatch_is_one_line(saved):
    """A checkpoint whose weights do not fit the model (another --model.* flag, or an older
    model.py): both ways of loading it say so in one line instead of a key-by-key traceback."""
    blob = common.load_checkpoint(saved.path, saved.bundle.tok.vocab_size)
    blob["model"]["norm_f.weight"] = torch.ones(saved.cfg.model.d_model)   # a final norm it lacks
    for load in (lambda: common.model_from_checkpoint(blob, "cpu"),
                 lambda: common.load_weights(saved.model, blob["model"], saved.path)):
        with pytest.raises(SystemExit) as e:
            load()
        msg = str(e.value.code)
        assert msg.startswith("checkpoint error: ") and "\n" not in msg and "norm_f.weight" in msg, msg


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    worker(sys.argv[2], sys.argv[3])


def test_a_flag_that_contradicts_the_checkpoint_is_an_error(tmp_path):
    """SFT with 1 layer, then RL (or an SFT resume) on the same out_dir with --model.n_layer=2: a
    one-line error naming the key, before any work, and nothing written (it used to train the
    checkpoint's model and write the flag's config into ckpt_rl.pt, which then never loaded)."""
    cache = str(tmp_path / "cache")
    cfg = tiny_config(str(tmp_path), cache, **{"train.max_steps": 1})
    train.run_sft(cfg, common.setup(cfg), make_bundle(cfg), FakeVQ())
    for stage_cfg, run in ((tiny_config(str(tmp_path), cache, **{"model.n_layer": 2}), "rl"),
                           (tiny_config(str(tmp_path), cache, **{"model.n_layer": 2, "train.resume": True}), "sft")):
        ctx = common.setup(stage_cfg)
        with pytest.raises(SystemExit, match=r"trained with --model.n_layer=1, this run says --model.n_layer=2"):
            if run == "rl":
                train.run_rl(stage_cfg, ctx, make_bundle(stage_cfg), FakeVQ())
            else:
                train.run_sft(stage_cfg, ctx, make_bundle(stage_cfg), FakeVQ())
    assert not (tmp_path / "ckpt_rl.pt").exists()


def test_a_signal_stops_with_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    """SIGINT in the middle of SFT step 2: the step finishes, the checkpoint is written, the run
    stops (exit 130); --resume then ends exactly where an uninterrupted run ends (same last loss,
    same weights)."""
    import signal
    cache = str(tmp_path / "cache")
    steps = 4

    def flags(out, *extra):
        return [f"--out_dir={out}", f"--data.cache_dir={cache}", "--data.n_sft=8", "--data.n_rl=4", "--data.n_eval=2",
                "--data.n_val=2", "--model.n_layer=1", "--model.n_head=2", "--model.d_model=32", "--vq.steps=10",
                "--vq.n_images=32", f"--train.max_steps={steps}", "--train.batch_size=4", "--train.micro_batch=2",
                "--train.eval_interval=0", "--train.ckpt_interval=100", "--rl.max_steps=0", "--stage=sft", *extra]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    train.main(flags(straight))
    real, calls = train.sft_step, []

    def step_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)          # arrives in the middle of the step
        return real(*a, **k)
    monkeypatch.setattr(train, "sft_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        train.main(flags(broken))
    assert e.value.code == 130 and len(calls) == 2
    assert torch.load(os.path.join(broken, "ckpt_sft.pt"), weights_only=False)["step"] == 2
    monkeypatch.setattr(train, "sft_step", real)
    train.main(flags(broken, "--resume"))
    a, b = (torch.load(os.path.join(d, "ckpt_sft.pt"), weights_only=False) for d in (straight, broken))
    assert a["step"] == b["step"] == steps and a["loss"] == b["loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_micro_batches_weight_every_token_alike(tmp_path):
    """The same 16 rows with the same masks (t = 1: every response token masked, no randomness) as
    one micro-batch of 16 or two of 8: the same loss and gradient once each micro-batch's sum is
    divided by the step's total count (common.mean_over_all, as sft_step does). The rows' responses
    differ in length, so averaging the two micro-batches' means (the old rule) is measurably off."""
    cfg = tiny_config(str(tmp_path), str(tmp_path / "cache"), **{"diffusion.prompt_drop": 0.0})
    bundle = make_bundle(cfg)
    ctx = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, str(tmp_path))
    tasks = ("vqa", "ground", "edit", "t2i")
    items = [(tasks[i % 4] if i < 8 else "t2i", i % 8) for i in range(16)]   # 2nd half: short t2i responses
    sets = {k: v["sft"] for k, v in bundle.sets.items()}
    torch.manual_seed(0)
    model = common.build_model(cfg, bundle.tok, "cpu")

    def grads(chunks, rule):
        model.zero_grad()
        n, total = 0.0, 0.0
        for part in chunks:
            batch = T.collate(sets, part, bundle.tok)
            loss, stats = sft_loss(model, batch, cfg.diffusion, bundle.tok, t=torch.ones(len(part)))
            if rule == "token mean":
                (loss * stats["n"]).backward()
                n, total = n + stats["n"], total + loss.item() * stats["n"]
            else:
                (loss / len(chunks)).backward()
                total += loss.item() / len(chunks)
        if rule == "token mean":
            common.mean_over_all(model, n, ctx)
            total /= n
        return total, torch.cat([p.grad.flatten() for p in model.parameters()])

    l16, g16 = grads([items], "token mean")
    l8, g8 = grads([items[:8], items[8:]], "token mean")
    assert abs(l16 - l8) < 1e-5 and torch.allclose(g16, g8, rtol=1e-4, atol=1e-7)
    old_l, old_g = grads([items[:8], items[8:]], "mean of means")
    assert abs(old_l - l16) > 1e-3 and (old_g - g16).norm() > 0.01 * g16.norm()


def test_a_checkpoint_without_a_vq_fingerprint_is_a_warning(tmp_path, capsys):
    a = C.make_config("toy", {"data.cache_dir": str(tmp_path)})
    import vq as VQ
    with open(VQ.vq_path(a), "wb") as f:
        f.write(b"some tokenizer")
    common.check_vq({}, a, "old.pt")
    err = capsys.readouterr().err
    assert "warning" in err and "old.pt" in err and "fingerprint" in err


def test_a_vq_tokenizer_is_never_shared_or_swapped_under_a_checkpoint(tmp_path):
    """Two VQ configs (here only the time cap differs) get two cache files, so training one never
    overwrites the other; and a checkpoint records its tokenizer's fingerprint, so a retrained file
    under it is a one-line error instead of a model that reads and draws garbage (seen: eval.py at
    chance after another run retrained the shared file)."""
    import vq as VQ
    a = C.make_config("toy", {"data.cache_dir": str(tmp_path)})
    b = C.make_config("toy", {"data.cache_dir": str(tmp_path), "vq.time_budget_s": 150.0})
    assert VQ.vq_path(a) != VQ.vq_path(b)
    with open(VQ.vq_path(a), "wb") as f:
        f.write(b"the tokenizer the model was trained with")
    blob = {"vq_sha": common.vq_sha(a)}
    common.check_vq(blob, a, "ckpt.pt")                         # the same file: fine
    with open(VQ.vq_path(a), "wb") as f:
        f.write(b"a retrained tokenizer")
    with pytest.raises(SystemExit, match="another VQ tokenizer"):
        common.check_vq(blob, a, "ckpt.pt")
    # no silent pass on an empty fingerprint: a checkpoint without one is a warning, a missing file
    # under a checkpoint that has one an error
    common.check_vq({"vq_sha": ""}, a, "old.pt")
    os.remove(VQ.vq_path(a))
    with pytest.raises(SystemExit, match="VQ tokenizer .* that ckpt.pt needs is missing"):
        common.check_vq(blob, a, "ckpt.pt")



# ----------------------------------------------------------------------------------------------
# 4. the RL stage on 2 processes. One rl.rl_step per rank against one process on the union of the
#    ranks' rows, and rl.shared_t's one masking rate for all ranks (a launch of 2 ranks, rl_step_worker);
#    a stop request (mid-step, and in a quick eval) then --resume, bit-identical to an uninterrupted
#    2-process run (slow: another launch, rl_stop_worker, six short train.main runs).

RL_STEP = {"rl.likelihood": "one_step", "rl.af_prob": 1.0, "rl.af_mode": "all_groups", "rl.prompts_per_step": 2,
           "rl.group_size": 2, "rl.sft_rows": 2, "rl.task_mix": "vqa:1,ground:1", "train.micro_batch": 2,
           "train.grad_clip": 1e6}
# one_step: no random masks, so any split of the rows scores them alike; af_prob 1 on all groups: each
# group gets a forced sample that scores 1, so every rank has rollout rows with A != 0; no clipping,
# which would hide a wrong scale of the gradient
RL_LR = 0.1


class PlainSGD:
    """SGD written out (p -= lr * grad) with the optimizer interface policy_update uses. The rank
    processes never build a torch optimizer: the first one imports torch's compiler (seconds)."""

    def __init__(self, params, lr: float):
        self.params, self.lr = list(params), lr

    def step(self):
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.sub_(self.lr * p.grad)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def rl_step_worker(tmp: str, cache: str):
    """One rl.rl_step on this rank (its own prompts, samples and SFT rows, from rank 0's weights);
    then a policy_update of the same rows with rl.shared_t whose masking rates are recorded (the
    ranks' mask generators are seeded apart, so rates drawn per rank would differ)."""
    import data as Dd
    import likelihood as LK
    from tokens import parse_mix
    cfg = tiny_config(os.path.join(tmp, "rl_step"), cache, **RL_STEP)
    ctx = common.setup(cfg)                               # seeds seed + rank: the inits differ ...
    torch.set_num_threads(1)
    bundle = make_bundle(cfg)
    model = common.build_model(cfg, bundle.tok, "cpu")
    common.broadcast_params(model, ctx)                   # ... until rank 0's are broadcast
    ro = RolloutContext(model, bundle.tok, bundle.sets, Dd.picture_judge(cfg, FakeVQ()), cfg, "cpu", ctx.autocast,
                        torch.Generator().manual_seed(100 + ctx.rank))
    sft = Dd.TaskSampler(bundle.sets, "sft", parse_mix(cfg.train.task_mix), 7 + ctx.rank)
    out = {"init": params(model)}
    st = rl.rl_step(ro, PlainSGD(model.parameters(), RL_LR), ctx, train.prompt_draws(cfg.rl), sft,
                    torch.Generator().manual_seed(50 + ctx.rank))
    out.update(after=params(model), loss=st.update.loss, skipped=st.update.skipped,
               trip=(st.trip.batch, st.trip.adv, st.trip.n))
    shared = copy.deepcopy(cfg)
    shared.rl.likelihood, shared.rl.shared_t = "complementary", True
    rates, real = [], LK.complementary

    def spy(model, batch, tok, generator=None, norm="sum", shared_t=False, t1=None):
        rates.append(None if t1 is None else t1.tolist())
        return real(model, batch, tok, generator, norm, shared_t, t1)
    LK.complementary = spy
    try:
        rl.policy_update(RolloutContext(model, ro.tok, ro.sets, None, shared, "cpu", ctx.autocast,
                                        torch.Generator().manual_seed(200 + ctx.rank)),
                         PlainSGD(model.parameters(), RL_LR), st.trip, ctx)
    finally:
        LK.complementary = real
    out["rates"] = rates
    torch.save(out, os.path.join(tmp, f"rl_step_rank{ctx.rank}.pt"))
    torch.distributed.destroy_process_group()


def launch(mode: str, *args, port: int = 0, timeout: int = 180) -> None:
    """Start this file as `mode` on WORLD ranks the way torchrun does and wait for both. port: the
    rendezvous port (0: the worker sets MASTER_PORT itself)."""
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, *map(str, args)],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{mode} ranks hung (> {timeout} s)")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{mode} rank {rank} failed:\n{log[-3000:]}"


@pytest.fixture(scope="module")
def ddp_rl_step(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_rl_step")
    cache = str(tmp / "cache")
    cfg = tiny_config(str(tmp / "rl_step"), cache, **RL_STEP)
    bundle = make_bundle(cfg)                            # the token cache, written before the ranks read it
    launch("rl_step_worker", tmp, cache, port=free_port())
    res = [torch.load(tmp / f"rl_step_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return SimpleNamespace(res=res, cfg=cfg, bundle=bundle)


def test_rl_step_on_two_processes_equals_one_process_on_the_union_of_rows(ddp_rl_step):
    """One rl.rl_step per rank (each its own prompts, samples and SFT rows) ends with the weights of
    ONE process that runs policy_update on both ranks' rows together with N = N_0 + N_1, from the
    same start. A control: rank 0's rows alone give other weights, so rank 1's rows reached rank 0."""
    r0, r1 = ddp_rl_step.res
    assert r0["skipped"] is None and r1["skipped"] is None
    assert_close(r0["init"], r1["init"], 0.0, "the ranks' starts:")
    (b0, a0, n0), (b1, a1, n1) = r0["trip"], r1["trip"]
    sft = ddp_rl_step.cfg.rl.sft_rows
    assert len(a0) > sft and len(a1) > sft                                # rollout rows beside the SFT rows
    assert not torch.equal(b0.tokens, b1.tokens)                          # the ranks drew different rows
    tok = ddp_rl_step.bundle.tok
    ctx1 = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, "unused")

    def one_process(trip):
        model = common.build_model(ddp_rl_step.cfg, tok, "cpu")
        model.load_state_dict(r0["init"])
        model.train()
        u = rl.policy_update(RolloutContext(model, tok, None, None, ddp_rl_step.cfg, "cpu", ctx1.autocast,
                                            torch.Generator()), PlainSGD(model.parameters(), RL_LR), trip, ctx1)
        return params(model), u.loss
    ref, loss = one_process(rl.Triplets(T.cat_batches([b0, b1], tok), torch.cat([a0, a1]), n0 + n1))
    assert max((ref[k] - r0["init"][k]).abs().max().item() for k in ref) > 1e-3       # the step moved
    for rank, r in enumerate((r0, r1)):
        assert_close(r["after"], ref, 1e-6, f"rank {rank} after rl_step:")
        assert abs(r["loss"] - loss) < 1e-5
    alone, _ = one_process(rl.Triplets(b0, a0, n0))
    assert max((alone[k] - ref[k]).abs().max().item() for k in ref) > 1e-4


def test_shared_t_is_one_masking_rate_on_every_rank(ddp_rl_step):
    """rl.shared_t under DDP: every row of every micro-batch of both ranks is masked at ONE rate t1,
    though the ranks' mask generators are seeded apart."""
    r0, r1 = ddp_rl_step.res
    assert len(r0["rates"]) >= 2 and len(r1["rates"]) >= 2               # several micro-batches per rank
    rates = {x for r in (r0, r1) for call in r["rates"] for x in call}
    assert len(rates) == 1 and 0 < rates.pop() < 1


RL_STOP_RUNS = [   # (out folder, extra flags, where the SIGTERM arrives: None, "step 2" or "eval 1" on
    # both ranks, "step 2 on rank R" on rank R alone)
    ("straight", [], None), ("stopped", [], "step 2"), ("stopped", ["--resume"], None),
    ("straight_eval", ["--rl.eval_interval=1"], None), ("stopped_eval", ["--rl.eval_interval=1"], "eval 1"),
    ("stopped_eval", ["--rl.eval_interval=1", "--resume"], None),
    ("stopped_r1", [], "step 2 on rank 1"), ("stopped_r1", ["--resume"], None),
    ("stopped_r0", [], "step 2 on rank 0"), ("stopped_r0", ["--resume"], None)]


def rl_stage_flags(cache: str, out: str, *extra) -> list[str]:
    """train.py flags of a run of seconds: 1 layer, d 32, 2 SFT steps, 3 RL steps of vqa + ground
    with answer-forcing and 2 SFT rows per step."""
    return [f"--out_dir={out}", f"--data.cache_dir={cache}", "--data.n_sft=8", "--data.n_rl=4", "--data.n_eval=4",
            "--data.n_val=2", "--model.n_layer=1", "--model.n_head=2", "--model.d_model=32", "--vq.steps=10",
            "--vq.n_images=32", "--train.max_steps=2", "--train.batch_size=4", "--train.micro_batch=2",
            "--train.eval_interval=0", "--train.ckpt_interval=100", "--rl.max_steps=3", "--rl.prompts_per_step=1",
            "--rl.group_size=2", "--rl.sft_rows=2", "--rl.task_mix=vqa:1,ground:1", "--rl.af_prob=0.5",
            "--rl.time_budget_s=0", "--eval.curve_n=2", "--eval.n_per_task=4", "--eval.batch_size=2",
            "--eval.grid_rows=1", *extra]


def rl_stop_run(tmp: str, cache: str, init: str, out: str, extra: list, stop) -> dict:
    """train.main --stage=rl on this rank for one of RL_STOP_RUNS: SIGTERM to this process in the
    middle of RL step 2, or during the quick eval after step 1 (rank 0 in its first sampling batch;
    rank 1, which does not evaluate, as it enters the eval's collective), as torchrun signals every
    rank; "... on rank R": to rank R alone (the other rank's calls are still counted), as when one
    worker is killed. Returns the exit code, the patched calls, and (rank 0) the step in ckpt_rl.pt."""
    import signal
    import metrics
    real_step, real_sample, real_keep = rl.rl_step, metrics.sample, metrics.eval_and_keep_best
    calls = []
    stop, _, only = (stop or "").partition(" on rank ")
    signalled = not only or int(only) == int(os.environ["RANK"])

    def signalling(name, real, nth):
        def call(*a, **k):
            calls.append(name)
            if calls.count(name) == nth and signalled:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        return call
    if stop == "step 2":
        rl.rl_step = signalling("step", real_step, 2)
    elif stop == "eval 1" and int(os.environ["RANK"]) == 0:
        metrics.sample = signalling("sample", real_sample, 1)
    elif stop == "eval 1":
        metrics.eval_and_keep_best = signalling("eval", real_keep, 1)
    code = 0
    try:
        train.main(rl_stage_flags(cache, os.path.join(tmp, out), "--stage=rl", f"--train.init_from={init}", *extra))
    except SystemExit as e:
        code = e.code
    finally:
        rl.rl_step, metrics.sample, metrics.eval_and_keep_best = real_step, real_sample, real_keep
    res = {"code": code, "calls": calls}
    if int(os.environ["RANK"]) == 0:
        res["step"] = torch.load(os.path.join(tmp, out, "ckpt_rl.pt"), weights_only=False)["step"]
    return res


def rl_stop_worker(tmp: str, cache: str, init: str, ports: str):
    """The runs of RL_STOP_RUNS in order, each with its own rendezvous port: train.main closes the
    process group when it ends."""
    res = []
    for port, (out, extra, stop) in zip(ports.split(","), RL_STOP_RUNS):
        os.environ["MASTER_PORT"] = port
        res.append(rl_stop_run(tmp, cache, init, out, extra, stop))
    torch.save(res, os.path.join(tmp, f"rl_stop_rank{os.environ['RANK']}.pt"))


@pytest.fixture(scope="module")
def ddp_rl_stop(tmp_path_factory):
    """An SFT checkpoint (one process), then the 2 ranks of rl_stop_worker."""
    tmp = tmp_path_factory.mktemp("ddp_rl_stop")
    cache, sft = str(tmp / "cache"), str(tmp / "sft")
    train.main(rl_stage_flags(cache, sft, "--stage=sft"))        # the tokenizer and the data cache, once
    ports = ",".join(str(free_port()) for _ in RL_STOP_RUNS)
    launch("rl_stop_worker", tmp, cache, os.path.join(sft, "ckpt_sft.pt"), ports, timeout=400)
    res = [torch.load(tmp / f"rl_stop_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return SimpleNamespace(res=res, tmp=tmp)


def strip_timings(x):
    """rl_log.json without its wall-clock fields (they differ between any two runs)."""
    if isinstance(x, dict):
        return {k: strip_timings(v) for k, v in x.items()
                if k not in ("seconds", "rollout_s", "update_s", "peak_mem_mb", "eval_seconds")}
    if isinstance(x, list):
        return [strip_timings(v) for v in x]
    return x


@pytest.mark.slow
@pytest.mark.parametrize("straight,stopped,at,cut_eval", [(0, 1, 2, False), (3, 4, 1, True)])
def test_rl_stopped_by_sigterm_on_two_processes_resumes_bit_identical(ddp_rl_stop, straight, stopped, at, cut_eval):
    """SIGTERM on both ranks in the middle of RL step 2 (or in the quick eval after step 1, which
    rank 0 runs while rank 1 waits): both ranks exit 143, ckpt_rl.pt holds that step, and --resume on
    2 processes ends with the uninterrupted 2-process run's weights, every rank's random streams
    and rl_log.json (timings aside; the eval the stop cut short is missing from the log)."""
    import json
    for rank in range(WORLD):
        runs = ddp_rl_stop.res[rank]
        assert runs[straight]["code"] == 0 and runs[stopped + 1]["code"] == 0
        assert runs[stopped]["code"] == 143, (rank, runs[stopped])
    assert ddp_rl_stop.res[0][stopped]["step"] == at
    if not cut_eval:
        assert ddp_rl_stop.res[0][stopped]["calls"] == ["step", "step"]     # no third step after the stop
    a, b = (str(ddp_rl_stop.tmp / RL_STOP_RUNS[i][0]) for i in (straight, stopped))
    ca, cb = (torch.load(os.path.join(d, "ckpt_rl.pt"), weights_only=False) for d in (a, b))
    assert ca["step"] == cb["step"] == 3
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert len(ca["rank_states"]) == len(cb["rank_states"]) == WORLD
    for sa, sb in zip(ca["rank_states"], cb["rank_states"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "a rank's random stream ended elsewhere"
    la, lb = (strip_timings(json.load(open(os.path.join(d, "rl_log.json")))) for d in (a, b))
    if cut_eval:
        assert "eval" in la[at - 1] and "eval" not in lb[at - 1]
        la[at - 1].pop("eval")
    assert la == lb


@pytest.mark.slow
@pytest.mark.parametrize("stopped,rank", [(6, 1), (8, 0)])
def test_a_sigterm_to_one_rank_stops_both_with_143(ddp_rl_stop, stopped, rank):
    """SIGTERM to ONE rank only, in the middle of RL step 2 (a kill of one worker): the other rank
    stops too, after the same step, and both exit 143 (the signal's code, not SIGINT's 130);
    ckpt_rl.pt holds step 2 and --resume ends bit-identical to the uninterrupted run, as when both
    ranks are signalled."""
    assert RL_STOP_RUNS[stopped][2] == f"step 2 on rank {rank}"
    for r in range(WORLD):
        assert ddp_rl_stop.res[r][stopped]["calls"] == ["step", "step"], (r, ddp_rl_stop.res[r][stopped])
    # the claims of the both-ranks stop: 143 on each rank, the checkpoint's step, the resumed end
    test_rl_stopped_by_sigterm_on_two_processes_resumes_bit_identical(ddp_rl_stop, 0, stopped, 2, False)


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "rl_step_worker":
    rl_step_worker(*sys.argv[2:])
if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "rl_stop_worker":
    rl_stop_worker(*sys.argv[2:])
