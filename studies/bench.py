"""
Speed benchmarks. One function per benchmark, picked by the first argument:

    python studies/bench.py sampler [--prompts=8] [--reps=3] [--ckpt=PATH] [--device=cuda]
    python studies/bench.py rollout [--prompts=4] [--n=8] [--reps=2] [--ckpt=PATH] [--device=cuda]
    python studies/bench.py rl      [--arms=before,after] [--mu=1] [--steps=3] [--ckpt=PATH]
                                    [--ckpts=before=PATH,after=PATH]   (each arm its own trained model)
    python studies/bench.py train   [--batch=16] [--warmup=2] [--steps=5] [--peak=989e12] [--compile] [--device=cuda]
    python studies/bench.py -h                      # this list; `python studies/bench.py NAME -h`: every option and key

The config keys a benchmark reads (KEYS: --preset=small, --section.key=value, --seed, --device, as in
train.py; `NAME -h` lists them) work as in train.py; with a checkpoint they are set on top of its
config, except its data, VQ and model. A key the benchmark does not read, or sets itself (FIXED: the
arms' attention, --mu's rl.ppo_epochs, the sampling temperature, ...), is a one-line error, as are
options that set the same number twice (--n and --rl.group_size, --ckpt and --ckpts, ...).
Results are printed and written to runs/bench_<name>.json. On CPU one thread (a second intra-op
thread only contends on a shared 2-core box); --device=cuda (the default `auto` picks it when there
is one) uses bf16 autocast as train.py does.

They measure time, which does not depend on the weights: they use the checkpoint's config and data
when there is one (--ckpt, default <out_dir>/ckpt_sft.pt), else the preset's config on small freshly
built pools (untrained VQ, scratch cache in runs/bench/dev_cache; only the layouts matter), and say
which. Each times the two variants it compares side by side in ONE run, interleaved (so both see
the same machine load), after warm-up calls, and prints the ratio. At toy size on CPU each takes
5-20 s. Timings on a shared machine are noisy: compare the ratios.

`sampler` -- the prefix KV cache of the sampler (METHOD.md §3; LaViDa's prefix-DLM attention).
diffusion.sample with use_cache=True (the prompt is encoded once per call, every step runs only the
response) vs the LLaDA-style loop that re-encodes prompt + response at every step (use_cache=False),
on the same held-out vqa and edit prompts (both carry the input picture's codes in the prompt),
greedy on text AND image slots. Prints response tokens/s of both, the speed-up and (P+R)/R (the
ratio of the positions each step runs, a rough bound), and checks that both give the same tokens
and the same unmasking order (in fp32; on CUDA the timed runs use bf16 autocast). The cache needs
prefix-DLM attention: when the checkpoint is not prefix-DLM (every preset is, since c3c4b12) a RANDOMLY
INITIALISED prefix-DLM model of the same size is used, and the output says so.

`rollout` -- the group batching of rollout.sample_groups / sample_rounds: ONE sampler call for a whole group (rows = G prompts
x N samples, base.repeat(N), as sample_rounds builds it) vs N sequential sampler calls, each one
sample of every prompt (G rows), same prompts, temperature rl.temperature. Defaults: G =
min(rl.prompts_per_step, 4), N = rl.group_size. Prints tokens/s of both and the ratio. The same
prefix-DLM model as `sampler`. On one CPU thread the work is compute-bound and grows linearly with
the rows, so batching gains little there (measured ~0.8-1.0x); the gain is a GPU effect.

`rl` -- whole RL steps (rl.rl_step: rollouts of every task, advantages, the J loss, the update) for
each arm of --arms x each rl.ppo_epochs = mu of --mu, one model per arm (same init), interleaved.
The arms (RL_ARMS): `before` = plain bidirectional attention, where every sampler step re-encodes
prompt + response, and one model pass per row (--diffusion.dedupe=false); `after` = today's toy
preset: prefix-DLM attention with the prompt's KV cache in the sampler and the likelihood, and
each distinct canvas run once per step. Both run today's code otherwise, so the smaller savings
(the sampler's per-block work, forced samples drawn only where they join, each distinct prompt
encoded once) are in both arms and the ratio understates the change a little. Give each arm its
own trained checkpoint (--ckpts=before=A,after=B): the share of equal canvases depends on how
confident the policy is, so a random model shows the smallest gain. Prints step time, the rollout share of it, policy
updates per minute (mu optimizer steps per RL step) and their ratio to the first arm, and the
answer-forced rows sampled per step.

`train` -- SFT training-step throughput: sft_loss (complementary masks double the rows) + backward
+ clip + AdamW on micro batches of train.micro_batch sequences (--batch), a randomly initialised
model of the preset's size, bf16 autocast on CUDA, optional --compile. Prints step time, tokens/s
(every position the model runs, padding included) and MFU = model.flops_per_token(T) x tokens/s /
peak FLOP/s (PaLM appendix B). Peak: --peak, else 989e12 (bf16 dense) on an H100/H200 under bf16
autocast, else "n/a (pass --peak)" (always so on CPU unless --peak is given).

The likelihood-estimator study is its own script: estimators.py.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # the method's modules live one folder up (run from the repo root)

import common  # noqa: E402
import config as C  # noqa: E402
import data  # noqa: E402
import rl  # noqa: E402
import tokens as T  # noqa: E402
import train  # noqa: E402   (the RL stage's log record and prompt draws)
import vq as VQ  # noqa: E402
from diffusion import make_plan, sample, sft_loss  # noqa: E402
from rollout import RolloutContext  # noqa: E402
from study import git_commit, parse_options  # noqa: E402

H100_BF16_DENSE = 989e12    # FLOP/s, H100 SXM bf16 dense tensor cores (H200: the same compute)

# ----------------------------------------------------------------------------------------------
# shared: device, data and model, timing, output


def speed_device(want: str) -> tuple[str, torch.dtype, str]:
    """(device, autocast dtype, reason) from --device (default auto: cuda > cpu), as common.setup
    decides: bf16 autocast on CUDA with bf16, fp32 elsewhere (never autocast on CPU)."""
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("bench: --device=cuda but torch.cuda.is_available() is False")
        name = torch.cuda.get_device_name(dev)
        if torch.cuda.is_bf16_supported():
            return dev, torch.bfloat16, f"bf16 autocast ({name})"
        return dev, torch.float32, f"fp32 ({name}: no bf16)"
    return dev, torch.float32, f"fp32 on {dev} (1 thread)"


def autocast_for(dtype: torch.dtype):
    return torch.autocast("cuda", dtype=dtype) if dtype == torch.bfloat16 else nullcontext()


def speed_world(cfg, ckpt: str, given=()):
    """(cfg, bundle, trained model or None, note). With the checkpoint: its config, data and model
    (on CPU), with the config keys of the command line (`given`, "section.key") set on top; a data,
    VQ or model key is then a one-line error (the checkpoint fixes them). Without it, and quietly
    (time does not depend on the weights or the VQ): the preset's config, small pools (256 SFT / 64
    eval examples per family, enough for the layouts), tokenized by an untrained VQ in a scratch
    cache, and no model."""
    path = ckpt or os.path.join(cfg.train.out_dir, "ckpt_sft.pt")
    scratch = os.path.join("runs", "bench")
    ctx = common.Ctx("cpu", torch.float32, "fp32", False, 0, 1, scratch)
    os.makedirs(scratch, exist_ok=True)
    if os.path.exists(path):
        fixed = sorted(k for k in given if k.split(".")[0] in ("data", "vq", "model") or
                       (ckpt and k in ("preset", "train.out_dir")))
        if fixed:
            raise SystemExit(f"bench: --{fixed[0]}: the checkpoint {path} fixes it (its data, VQ and model are "
                             f"benched); drop it, or pass --ckpt=<a missing path> to bench the preset's config")
        cli = cfg
        cfg, bundle, model, _, blob = data.load_run(path, scratch, "bench")
        for key in given:                         # the command line's other keys (rl.*, diffusion.*, train.*)
            if "." in key:
                section, name = key.split(".")
                setattr(getattr(cfg, section), name, getattr(getattr(cli, section), name))
        return cfg, bundle, model, f"data and config of {path} (step {blob['step']})"
    cfg.data.n_sft, cfg.data.n_rl = min(cfg.data.n_sft, 256), 8
    cfg.data.n_eval, cfg.data.n_val = min(cfg.data.n_eval, 64), min(cfg.data.n_val, 8)
    cfg.data.cache_dir = os.path.join(scratch, "dev_cache")              # never the real token cache
    torch.manual_seed(0)
    bundle = data.get_bundle(cfg, VQ.VQVAE(cfg.vq, cfg.data.image_size).eval(), ctx)
    return cfg, bundle, None, (f"no checkpoint at {path}: preset {cfg.preset!r} data (small pools, untrained VQ; "
                               f"only the layout matters here)")


def prefix_model(cfg, bundle, trained, dev: str, seed: int):
    """The model the sampler benchmarks run: the trained one if it is a prefix-DLM, else a RANDOMLY
    INITIALISED prefix-DLM of the same size (the prefix cache needs prefix-DLM attention; speed
    does not depend on training)."""
    if trained is not None and trained.cfg.prefix_dlm:
        return trained.to(dev).eval(), "the trained checkpoint (prefix-DLM)"
    pcfg = C.from_dict(C.to_dict(cfg))
    pcfg.model.prefix_dlm = True
    torch.manual_seed(seed)
    why = "the checkpoint is not prefix-DLM" if trained is not None else "no checkpoint"
    return (common.build_model(pcfg, bundle.tok, dev).eval(),
            f"RANDOMLY INITIALISED prefix-DLM of the {cfg.preset} size ({why}; speed does not depend on training)")


def prompts_of(bundle, task: str, n: int, dev: str) -> T.Batch:
    """The first n held-out prompts of `task` with an all-mask response canvas."""
    ts = bundle.sets[task]["eval"]
    return T.collate({task: ts}, [(task, i) for i in range(min(n, len(ts)))], bundle.tok, responses=False).to(dev)


def n_steps(batch: T.Batch, dcfg) -> int:
    """Total denoising steps for this batch's layout (text blocks + image steps)."""
    is_img = batch.is_image[0, batch.P:]
    return len(make_plan(int((batch.is_resp[0, batch.P:] & ~is_img).sum()), int(is_img.sum()), dcfg))


def timed(fn, dev: str):
    """(fn(), seconds) with the device's queue drained before and after."""
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda d: None)
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def model_line(model) -> str:
    m = model.cfg
    return (f"{model.num_params(False) / 1e6:.2f}M params (n_layer {m.n_layer}, d_model {m.d_model}, "
            f"n_head {m.n_head}, prefix_dlm {m.prefix_dlm})")


def write_json(name: str, result: dict):
    """runs/bench_<name>.json (strict JSON)."""
    common.write_json(os.path.join("runs", f"bench_{name}.json"), result)


# ----------------------------------------------------------------------------------------------
# the benchmarks: each gets the command line's config (for --device, --seed, the preset) and its options


def bench_sampler(cfg, opts: dict):
    """Prefix-cache sampler vs the LLaDA-style loop that re-encodes prompt + response every step."""
    dev, dtype, why = speed_device(cfg.train.device)
    seed = cfg.train.seed
    cfg, bundle, trained, data_note = speed_world(cfg, opts["ckpt"], opts["keys"])
    model, model_note = prefix_model(cfg, bundle, trained, dev, seed)
    tok, amp = bundle.tok, autocast_for(dtype)
    print(f"bench sampler | device {dev} | {why} | torch {torch.__version__} | commit {git_commit()}")
    print(f"model: {model_note}; {model_line(model)}\ndata: {data_note}")
    print(f"greedy decoding (temperature 0 on text AND image slots), cfg_scale {cfg.diffusion.cfg_scale}, "
          f"{opts['prompts']} prompts per task, median of {opts['reps']} timed calls after 1 warm-up call each")
    print(f"{'task':<6}{'rows':>5}{'P':>5}{'R':>5}{'steps':>7}{'cached tok/s':>14}{'full tok/s':>12}"
          f"{'speed-up':>10}{'(P+R)/R':>9}{'identical tokens':>18}")
    res = {"device": dev, "dtype": str(dtype), "model": model_note, "data": data_note, "tasks": {}}
    for task in ("vqa", "edit"):                     # both have the input picture's codes in the prompt
        batch = prompts_of(bundle, task, opts["prompts"], dev)
        B, R = batch.tokens.shape[0], batch.tokens.shape[1] - batch.P

        def run(cache: bool):
            return sample(model, batch, tok, cfg.diffusion, temperature=0.0, image_temperature=0.0, use_cache=cache)
        outs, times = {}, {True: [], False: []}
        for cache in (True, False):
            with amp:
                outs[cache] = run(cache)             # warm-up (and the tokens compared below)
        for _ in range(opts["reps"]):
            for cache in (True, False):              # interleaved: both see the same machine load
                with amp:
                    times[cache].append(timed(lambda: run(cache), dev)[1])
        if dtype != torch.float32:                   # the identity check in fp32: bf16 rounding differs
            outs = {c: run(c) for c in (True, False)}
        same_tok = outs[True][0] == outs[False][0]
        same, same_rows = same_tok.float().mean().item(), same_tok.all(1).float().mean().item()
        same_order = bool(torch.equal(outs[True][1], outs[False][1]))
        tc, tf = median(times[True]), median(times[False])
        gen, steps = B * R, n_steps(batch, cfg.diffusion)  # response tokens produced per call
        rows = "all" if same_rows == 1 else f"{100 * same_rows:.0f}% of"
        print(f"{task:<6}{B:>5}{batch.P:>5}{R:>5}{steps:>7}{gen / tc:>14.0f}{gen / tf:>12.0f}{tf / tc:>9.2f}x"
              f"{(batch.P + R) / R:>9.2f}{100 * same:>10.1f}% ({rows} rows"
              f"{', same order' if same_order else ', order differs'})")
        res["tasks"][task] = {"rows": B, "P": batch.P, "R": R, "steps": steps, "cached_s": tc, "full_s": tf,
                              "cached_tok_s": gen / tc, "full_tok_s": gen / tf, "speedup": tf / tc,
                              "identical_tokens": same, "identical_rows": same_rows, "identical_order": same_order}
    print("(tok/s = response tokens generated per second. cached = prompt encoded once per call "
          "(encode_prefix), each step runs only the response (forward_cached); full = use_cache=False, "
          "each step runs prompt + response, as LLaDA's generate does. The work per step shrinks by about "
          "(P+R)/R (more where attention dominates), which bounds the speed-up; long prompts gain most.)")
    write_json("sampler", res)


def bench_rollout(cfg, opts: dict):
    """One batched sampler call for a whole group vs N sequential calls of one sample per prompt."""
    dev, dtype, why = speed_device(cfg.train.device)
    seed = cfg.train.seed
    cfg, bundle, trained, data_note = speed_world(cfg, opts["ckpt"], opts["keys"])
    model, model_note = prefix_model(cfg, bundle, trained, dev, seed)
    tok, amp, rc = bundle.tok, autocast_for(dtype), cfg.rl
    G, N = opts["prompts"] or min(rc.prompts_per_step, 4), opts["n"] or rc.group_size
    print(f"bench rollout | device {dev} | {why} | torch {torch.__version__} | commit {git_commit()}")
    print(f"model: {model_note}; {model_line(model)}\ndata: {data_note}")
    print(f"{G} prompts x N={N} samples per task, temperature {rc.temperature} (as rollout.sample_groups), "
          f"median of {opts['reps']} timed runs after a warm-up")
    print(f"{'task':<6}{'rows':>6}{'batched tok/s':>15}{'sequential tok/s':>18}{'speed-up':>10}")
    res = {"device": dev, "dtype": str(dtype), "model": model_note, "data": data_note, "G": G, "N": N, "tasks": {}}
    gen = torch.Generator(device=dev).manual_seed(seed)
    for task in ("vqa", "edit"):
        base = prompts_of(bundle, task, G, dev)
        Gr, R = base.tokens.shape[0], base.tokens.shape[1] - base.P

        def call(canvas):
            with amp:
                return sample(model, canvas, tok, cfg.diffusion, temperature=rc.temperature,
                              image_temperature=rc.temperature, generator=gen)

        def batched():                            # sample_rounds: rows = prompts x samples, one call
            return call(base.repeat(N))

        def sequential():                         # N calls, each one sample of every prompt
            return [call(base) for _ in range(N)]
        batched(), sequential()                   # warm-up
        tb, ts = [], []
        for _ in range(opts["reps"]):             # interleaved: both see the same machine load
            tb.append(timed(batched, dev)[1])
            ts.append(timed(sequential, dev)[1])
        tb, ts = median(tb), median(ts)
        tokens = Gr * N * R
        print(f"{task:<6}{Gr * N:>6}{tokens / tb:>15.0f}{tokens / ts:>18.0f}{ts / tb:>9.2f}x")
        res["tasks"][task] = {"rows": Gr * N, "R": R, "batched_s": tb, "sequential_s": ts,
                              "batched_tok_s": tokens / tb, "sequential_tok_s": tokens / ts, "speedup": ts / tb}
    print(f"(batched: ONE sampler call with {G}x{N} rows, as sample_rounds makes it (base.repeat(N): the prefix "
          f"cache is computed for all {G}x{N} rows, each prompt {N} times); sequential: {N} calls of {G} rows, the "
          f"same tokens. Scoring, answer-forcing and tree search are not timed (the same work either way). On one "
          f"CPU thread the work is compute-bound and linear in the rows, so batching can gain little there; on a GPU "
          f"small calls leave most of the device idle.)")
    write_json("rollout", res)


RL_ARMS = {   # name -> (what it is, the config overrides on top of the preset)
    "before": ("the toy preset before: plain bidirectional attention (every sampler step re-encodes prompt + "
               "response) and one pass per row", {"model.prefix_dlm": False, "diffusion.dedupe": False}),
    "after": ("today's toy preset: prefix-DLM attention (each distinct prompt encoded once per sampler call and "
              "per likelihood micro-batch, every step runs the response only) and each distinct canvas run "
              "once per step", {"model.prefix_dlm": True, "diffusion.dedupe": True}),
}


def bench_rl(cfg, opts: dict):
    """Whole RL steps (rl.rl_step: rollouts + update) per arm of --arms (RL_ARMS) x --mu, interleaved."""
    dev, dtype, why = speed_device(cfg.train.device)
    per_arm = dict(kv.split("=", 1) for kv in opts["ckpts"].split(",") if kv)     # arm -> its own checkpoint
    cfg, bundle, trained, data_note = speed_world(cfg, next(iter(per_arm.values()), opts["ckpt"]), opts["keys"])
    ctx = common.Ctx(dev, dtype, why, False, 0, 1, os.path.join("runs", "bench"))
    # the edit reward decodes pictures: the run's own VQ, else an untrained one (same time, no meaning)
    vq = VQ.get_vq(cfg, dev, ctx.out_dir) if trained is not None else VQ.VQVAE(cfg.vq, cfg.data.image_size).eval()
    names = [a for a in opts["arms"].split(",") if a]
    unknown = set(names) - set(RL_ARMS)
    if unknown:
        raise SystemExit(f"bench rl: unknown arm(s) {sorted(unknown)}; arms are {', '.join(RL_ARMS)}")
    arms = {}
    for name in names:       # each arm its own model (same seed: same init), optimizer and random streams
        for mu in [int(m) for m in opts["mu"].split(",")]:
            acfg = C.from_dict(C.to_dict(cfg))
            for key, v in RL_ARMS[name][1].items():
                section, field_ = key.split(".")
                setattr(getattr(acfg, section), field_, v)
            acfg.rl.ppo_epochs = mu
            torch.manual_seed(cfg.train.seed)
            model = common.build_model(acfg, bundle.tok, dev)
            if name in per_arm:                   # the arm's own trained checkpoint (same data and vocabulary)
                own = data.load_run(per_arm[name], os.path.join("runs", "bench"), "bench")[2]
                if own.cfg.prefix_dlm != acfg.model.prefix_dlm or own.vocab_size != bundle.tok.vocab_size:
                    raise SystemExit(f"bench rl: {per_arm[name]} does not fit arm {name!r} (prefix_dlm "
                                     f"{own.cfg.prefix_dlm}, vocabulary {own.vocab_size})")
                model.load_state_dict(own.state_dict())
            elif trained is not None and trained.cfg.prefix_dlm == acfg.model.prefix_dlm:
                model.load_state_dict(trained.state_dict())
            arms[(name, mu)] = (acfg, model, common.make_optimizer(model, acfg.rl.lr, acfg.train.weight_decay, dev),
                                data.TaskSampler(bundle.sets, "sft", T.parse_mix(acfg.train.task_mix), 7),
                                torch.Generator().manual_seed(13), torch.Generator(device=dev).manual_seed(11), [])
    draws = train.prompt_draws(cfg.rl)
    print(f"bench rl | device {dev} | {why} | torch {torch.__version__} | commit {git_commit()}")
    print(f"model: {'per arm: ' + opts['ckpts'] if per_arm else 'the checkpoint where its attention matches the arm, else randomly initialised' if trained is not None else 'randomly initialised'}; "
          f"{model_line(next(iter(arms.values()))[1])}\ndata: {data_note}\n"
          f"prompts/step {draws} x group {cfg.rl.group_size}, sft rows {cfg.rl.sft_rows}, answer-forcing "
          f"p={cfg.rl.af_prob}; {opts['steps']} steps per arm after 1 warm-up step, interleaved")
    for name in names:
        print(f"  {name}: {RL_ARMS[name][0]}")
    for i in range(opts["steps"] + 1):
        for (acfg, model, opt, sft, pick, gen, recs) in arms.values():
            ro = RolloutContext(model, bundle.tok, bundle.sets, data.picture_judge(acfg, vq), acfg, dev, ctx.autocast, gen)
            st = rl.rl_step(ro, opt, ctx, draws, sft, pick)
            if i:                                 # the first step of each arm is a warm-up
                recs.append(train.step_record(st, bundle.tok, acfg.rl.tau, dev))
    print(f"{'arm':>7}{'mu':>4}{'step s':>9}{'rollout s':>11}{'rollout share':>15}{'updates/min':>13}"
          f"{'vs first':>10}{'forced rows':>13}")
    res, base = {"device": dev, "data": data_note, "draws": draws, "arms": {}}, None
    for (name, mu), (*_, recs) in arms.items():
        roll = median([r["rollout_s"] for r in recs])
        step = roll + median([r["update_s"] for r in recs])
        per_min = 60 * mu / step                  # optimizer steps on the policy per minute
        base = base or per_min
        forced = sum(r[t].get("forced_rows", 0) for r in recs for t in draws if t in ("vqa", "ground")) / len(recs)
        print(f"{name:>7}{mu:>4}{step:>9.2f}{roll:>11.2f}{100 * roll / step:>14.0f}%{per_min:>13.1f}"
              f"{per_min / base:>9.2f}x{forced:>13.1f}")
        res["arms"][f"{name}_mu{mu}"] = {"step_s": step, "rollout_s": roll, "rollout_share": roll / step,
                                         "updates_per_min": per_min, "vs_first": per_min / base,
                                         "forced_rows_per_step": forced}
    print("(median step; updates/min = ppo_epochs optimizer steps per RL step; vs first = the ratio to the first "
          "arm's updates/min. Forced rows: answer-forced samples drawn per step, one per group the forced sample "
          "joins.)")
    write_json("rl", res)


def train_batches(cfg, bundle, B: int, n: int, seed: int, dev: str) -> list[T.Batch]:
    """n SFT micro batches of B sequences drawn by the task mix, as run_sft draws them."""
    sampler = data.TaskSampler(bundle.sets, "sft", T.parse_mix(cfg.train.task_mix), seed)
    sets = {k: v["sft"] for k, v in bundle.sets.items()}
    return [T.collate(sets, sampler.draw(B), bundle.tok).to(dev) for _ in range(n)]


def bench_train(cfg, opts: dict):
    """SFT training-step throughput and model FLOPs utilisation."""
    dev, dtype, why = speed_device(cfg.train.device)
    seed = cfg.train.seed
    cfg, bundle, _, data_note = speed_world(cfg, opts["ckpt"], opts["keys"])
    tok, amp = bundle.tok, autocast_for(dtype)
    torch.manual_seed(seed)
    model = common.build_model(cfg, tok, dev).train()
    opt = common.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, dev)
    fwd = torch.compile(model) if opts["compile"] else model
    B = opts["batch"] or cfg.train.micro_batch
    batches = train_batches(cfg, bundle, B, opts["warmup"] + opts["steps"], seed, dev)
    print(f"bench train | device {dev} | {why} | compile {opts['compile']} | torch {torch.__version__} | "
          f"commit {git_commit()}")
    print(f"model: randomly initialised, {cfg.preset} size; {model_line(model)}\ndata: {data_note}")

    def step(batch):
        with amp:
            loss, _ = sft_loss(fwd, batch, cfg.diffusion, tok)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    rows = B * (2 if cfg.diffusion.complementary else 1)          # complementary masks double the rows
    warm, timed_batches = batches[:opts["warmup"]], batches[opts["warmup"]:]
    # T = P + the widest response in the batch, so it can vary: warm up on every width that is timed
    # (under --compile a new shape would otherwise recompile inside the timed steps)
    seen = {b.tokens.shape[1] for b in warm}
    warm += [b for b in timed_batches if b.tokens.shape[1] not in seen and not seen.add(b.tokens.shape[1])]
    for batch in warm:
        step(batch)
    secs, toks, flops = 0.0, 0, 0.0
    for batch in timed_batches:
        secs += timed(lambda: step(batch), dev)[1]
        T = batch.tokens.shape[1]
        toks += rows * T
        flops += rows * T * model.flops_per_token(T)
    tps, fpt, n = toks / secs, flops / toks, len(timed_batches)   # per-token FLOPs, token-weighted
    Ts = sorted({b.tokens.shape[1] for b in timed_batches})
    peak = opts["peak"] or (H100_BF16_DENSE if dev.startswith("cuda") and dtype == torch.bfloat16 and any(
        k in torch.cuda.get_device_name(dev) for k in ("H100", "H200")) else None)
    mfu = fpt * tps / peak if peak else None
    print(f"micro batch {B} sequences -> {rows} rows of T={'/'.join(map(str, Ts))} tokens per step (complementary "
          f"{cfg.diffusion.complementary}); {len(warm)} warm-up + {n} timed steps")
    print(f"step time {1000 * secs / n:.1f} ms | {tps:,.0f} tokens/s | {rows * n / secs:.1f} "
          f"rows/s | model FLOPs/token {fpt / 1e6:.2f} MFLOP (6N + 12 L d T) | {fpt * tps / 1e12:.3f} TFLOP/s")
    print(f"MFU: {f'{100 * mfu:.2f}% of {peak:.3g} FLOP/s' if mfu is not None else 'n/a (pass --peak=FLOPS, e.g. --peak=989e12 for H100 bf16 dense)'}")
    print("(tokens = every position of every row the model runs, padding included; MFU = flops_per_token(T) "
          "x tokens/s / peak, PaLM appendix B; the optimizer step and clipping are inside the timed step.)")
    write_json("train", {"device": dev, "dtype": str(dtype), "compile": opts["compile"], "micro_batch": B,
                         "rows": rows, "T": Ts, "step_ms": 1000 * secs / n, "tokens_per_s": tps,
                         "flops_per_token": fpt, "peak": peak, "mfu": mfu, "data": data_note})


# ----------------------------------------------------------------------------------------------
# name -> (benchmark, its options with their defaults, one line for the usage)

BENCHMARKS = {
    "sampler": (bench_sampler, {"ckpt": "", "prompts": 8, "reps": 3},
                "prefix-cache sampler vs re-encoding every step: tokens/s, speed-up, same greedy tokens"),
    "rollout": (bench_rollout, {"ckpt": "", "prompts": 0, "n": 0, "reps": 2},
                "one batched group call vs N sequential sampler calls: tokens/s, speed-up"),
    "rl": (bench_rl, {"ckpt": "", "ckpts": "", "arms": "before,after", "mu": "1", "steps": 3},
           "whole RL steps, before/after the prefix cache x rl.ppo_epochs: step time, rollout share, updates/min"),
    "train": (bench_train, {"ckpt": "", "batch": 0, "warmup": 2, "steps": 5, "peak": 0.0, "compile": False},
              "SFT step throughput (tokens/s) and MFU (--peak=0: 989e12 on an H100/H200 under bf16, else n/a)"),
}
# the config keys each benchmark reads ("section." = every key of the section; the checkpoint, when
# there is one, fixes data., vq. and model.), and those it sets itself (a one-line error: which option
# sets it). Any other key would change nothing, so it is refused too.
_COMMON = ("preset", "train.seed", "train.device", "train.out_dir", "data.", "vq.", "model.")
_SAMPLER = ("diffusion.tokens_per_step", "diffusion.block_len", "diffusion.image_steps", "diffusion.cfg_scale",
            "diffusion.remask", "diffusion.dedupe")
KEYS = {
    "sampler": _COMMON + _SAMPLER,
    "rollout": _COMMON + _SAMPLER + ("rl.temperature", "rl.prompts_per_step", "rl.group_size"),
    "rl": _COMMON + ("train.weight_decay", "train.task_mix", "diffusion.", "rl."),
    "train": _COMMON + ("train.micro_batch", "train.lr", "train.weight_decay", "train.grad_clip", "train.task_mix",
                        "diffusion.eps", "diffusion.loss_weight", "diffusion.complementary",
                        "diffusion.full_mask_frac", "diffusion.prompt_drop"),
}
_TEMPERATURE = "the benchmark sets the sampling temperature itself"
FIXED = {
    "sampler": {"model.prefix_dlm": "the cache needs prefix-DLM attention: the benchmark always uses it",
                "diffusion.temperature": _TEMPERATURE + " (greedy)", "diffusion.image_temperature": _TEMPERATURE + " (greedy)"},
    "rollout": {"model.prefix_dlm": "the cache needs prefix-DLM attention: the benchmark always uses it",
                "diffusion.temperature": _TEMPERATURE + " (--rl.temperature)",
                "diffusion.image_temperature": _TEMPERATURE + " (--rl.temperature)"},
    "rl": {"model.prefix_dlm": "each arm of --arms sets it (RL_ARMS)", "diffusion.dedupe": "each arm of --arms sets it (RL_ARMS)",
           "rl.ppo_epochs": "set by --mu (a comma list: one run per value)",
           "rl.max_steps": "the benchmark runs --steps RL steps", "rl.time_budget_s": "the benchmark runs --steps RL steps",
           "rl.eval_interval": "the benchmark runs no evaluation",
           "diffusion.temperature": "the rollouts sample at --rl.temperature",
           "diffusion.image_temperature": "the rollouts sample at --rl.temperature",
           "diffusion.cfg_scale": "the rollouts never use guidance (rollout.rollout_diffusion)"},
    "train": {"train.compile": "use --compile", "train.batch_size": "set by --batch (sequences per step)"},
}


def usage() -> str:
    lines = ["usage: python studies/bench.py NAME [--option=value ...] [--preset=toy] [--section.key=value ...]",
             "benchmarks (`python studies/bench.py NAME -h` lists every option and config key):"]
    for name, (_, extra, what) in BENCHMARKS.items():
        lines += [f"  {name:<8} {what}", "           " + " ".join(f"[--{k}={v!r}]" for k, v in extra.items())]
    return "\n".join(lines)


def bench_usage(name: str) -> str:
    _, extra, what = BENCHMARKS[name]
    return (f"usage: python studies/bench.py {name} [--option=value ...] [--section.key=value ...]\n{what}\n"
            "options: " + " ".join(f"[--{k}={v!r}]" for k, v in extra.items()) + "\n"
            "config keys it reads (section. = every key of the section): " + ", ".join(KEYS[name]))


def check(name: str, opts: dict, given: set):
    """One-line errors for option values out of range and for options that would cancel another."""
    script = f"bench.py {name}"
    for k, lo in (("prompts", 1 if name == "sampler" else 0), ("n", 0), ("reps", 1), ("steps", 1), ("warmup", 0),
                  ("batch", 0), ("peak", 0)):
        if k in opts and opts[k] < lo:
            raise SystemExit(f"{script}: --{k}={opts[k]}: must be >= {lo}")
    for opt, key in (("prompts", "rl.prompts_per_step"), ("n", "rl.group_size"), ("batch", "train.micro_batch")):
        if opt in given and key in given and name in ("rollout", "train"):
            raise SystemExit(f"{script}: --{key} and --{opt} set the same number; pass one of them")
    if name == "rl":
        try:
            mus = [int(m) for m in opts["mu"].split(",")]
        except ValueError:
            mus = []
        if not mus or min(mus) < 1:
            raise SystemExit(f"{script}: --mu={opts['mu']}: expected rl.ppo_epochs values >= 1, comma-separated")
        arms = [a for a in opts["arms"].split(",") if a]
        if not arms or set(arms) - set(RL_ARMS):
            raise SystemExit(f"{script}: --arms={opts['arms']}: expected a comma list of {', '.join(RL_ARMS)}")
        if opts["ckpts"]:
            if "ckpt" in given:
                raise SystemExit(f"{script}: --ckpt={opts['ckpt']}: --ckpts gives every arm its checkpoint; pass one of them")
            pairs = [kv.split("=", 1) for kv in opts["ckpts"].split(",")]
            bad = [kv for kv in pairs if len(kv) != 2 or kv[0] not in arms or not kv[1]]
            if bad:
                raise SystemExit(f"{script}: --ckpts={opts['ckpts']}: expected ARM=PATH, comma-separated, for arms of "
                                 f"--arms ({', '.join(arms)})")


def main(argv: list[str]):
    name = argv[0] if argv else ""
    if name not in BENCHMARKS:
        if name and name not in ("-h", "--help"):
            print(f"bench: unknown benchmark {name!r}; benchmarks are: {', '.join(BENCHMARKS)}", file=sys.stderr)
        print(usage())
        raise SystemExit(0 if name in ("-h", "--help") else 2)
    fn, extra, what = BENCHMARKS[name]
    cfg, opts, given = parse_options(f"bench.py {name}", argv[1:], extra, bench_usage(name), KEYS[name], FIXED[name])
    check(name, opts, given)
    opts["keys"] = sorted(k for k in given if k not in extra)      # the config keys given (speed_world)
    torch.set_num_threads(1)
    fn(cfg, opts)


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
