"""
Benchmarks. One function per benchmark, picked by the first argument:

    python bench.py likelihood [--ckpt=runs/toy/ckpt_sft.pt] [--preset=toy] [--seed=0]
    python bench.py sampler    [--prompts=8] [--reps=3] [--preset=toy] [--device=cuda]
    python bench.py rollout    [--prompts=4] [--n=8] [--reps=2] [--preset=toy] [--device=cuda]
    python bench.py train      [--batch=16] [--warmup=2] [--steps=5] [--peak=989e12] [--compile] [--device=cuda]
    python bench.py search     [--seeds=3] [--steps=1500] [--preset=toy]

Results are printed and written to runs/bench_<name>.json. All run on one CPU thread (a second
intra-op thread only contends on a shared 2-core box); the speed benchmarks use the GPU with
--device=cuda (the default `auto` picks it when there is one), with bf16 autocast as train.py does.

`likelihood` needs the toy checkpoint: run `python train.py --preset=toy` first. CPU only, fixed
seeds; it takes about 2 minutes on a 2-core CPU (104 s measured while other jobs shared it; under 5
minutes).

The speed benchmarks (`sampler`, `rollout`, `train`) measure time, which does not depend on the
weights: they use the checkpoint's config and data when there is one, else the preset's config on
small freshly built pools (untrained VQ, scratch cache in runs/bench/dev_cache; only the layouts
matter), and say which. Each times the two variants it compares side by side in ONE run,
interleaved (so both see the same machine load), after warm-up calls, and prints the ratio. At
toy size on CPU each takes 5-20 s. Timings on a shared machine are noisy: compare the ratios.

`sampler` -- PAPER.md §7 / LaViDa's prefix-DLM cache. Our sampler with the prefix KV cache
(diffusion.sample, use_cache=True: the prompt is encoded once per call, every step runs only the
response) vs the LLaDA-style loop that re-encodes prompt + response at every step
(use_cache=False), on the same held-out vqa and edit prompts (both carry the input picture's codes
in the prompt), greedy on text AND image slots. Prints response tokens/s of both, the speed-up and
(P+R)/R (the ratio of the positions each step runs, a rough bound), and checks that both give the
same tokens and the same unmasking order (in fp32; on CUDA the timed runs use bf16 autocast). The
cache needs prefix-DLM attention: when the checkpoint is not prefix-DLM (the toy preset's default)
a RANDOMLY INITIALISED prefix-DLM model of the same size is used, and the output says so.

`rollout` -- rollout.rollout_task's batching: ONE sampler call for a whole group (rows = G prompts
x N samples, base.repeat(N), as rollout_task builds it) vs N sequential sampler calls, each one
sample of every prompt (G rows), same prompts, temperature rl.temperature. Defaults: G =
min(rl.prompts_per_step, 4), N = rl.group_size. Prints tokens/s of both and the ratio. The same
prefix-DLM model as `sampler`. On one CPU thread the work is compute-bound and grows linearly with
the rows, so batching gains little there (measured ~0.8-1.0x); the gain is a GPU effect.

`train` -- SFT training-step throughput: sft_loss (complementary masks double the rows) + backward
+ clip + AdamW on micro batches of train.micro_batch sequences (--batch), a randomly initialised
model of the preset's size, bf16 autocast on CUDA, optional --compile. Prints step time,
tokens/s (every position the model runs, padding included) and MFU = model.flops_per_token(T) x
tokens/s / peak FLOP/s (PaLM appendix B). Peak: --peak, else 989e12 (bf16 dense) on an H100/H200
under bf16 autocast, else "n/a (pass --peak)" (always so on CPU unless --peak is given).

`search` -- why model.init is fan-in. The toy's reading tasks hinge on one skill: given a
question ("where is the red circle?"), find the image code that matches among the 16 cell codes and
name its cell. This benchmark isolates that skill with no diffusion, no trace and no other task: a
sequence of 16 cell codes (3-7 random shapes, colour x kind x size, as in data.py), the query's
colour and kind words, one [MASK] whose target is the name of the unique matching cell, plus 16
filler slots (the response canvas). Plain cross-entropy at the [MASK], batch 16, AdamW lr 2e-3,
betas (0.9, 0.95), 50 warm-up steps, constant after. Each configuration is trained per seed until
held-out accuracy (512 fixed queries) reaches 90 %, or --steps:
    model fan_in              our Transformer as configured by the preset (the default)
    model fan_in + final norm the same with the RMSNorm before the head
    model gpt2 (old default)  N(0, 0.02) everywhere, tied head, final norm: the toy's first setting
    torch encoder (reference) stock nn.TransformerEncoder (pre-norm, ReLU, biases, PyTorch's default
                              init: N(0, 1) embeddings), learned positions, same width/depth/heads
Prints, per configuration, the steps to 90 % of every seed and the accuracy at the end. CPU, one
thread, about 5 minutes at the defaults.

`likelihood` -- PAPER.md §5 (the complementary-masking estimator of log pi(y|x)) and §12 claims 1-4.
The estimators of likelihood.py at an EQUAL forward-pass budget of 2 per (x, y) pair:
    complementary       one complementary pair (t1, t2 = 1 - t1), w = 1       2 passes
    elbo_mc n=2         LLaDA's ELBO estimate: k ~ U{1..L}, weight L/k        2 passes
    mc_unweighted n=2   the same masks with w = 1                             2 passes
    one_step            d1: response fully masked (deterministic)             1 pass
    one_step p=.15      d1 with 15% of the prompt tokens masked               1 pass
    elbo_mc n=1         reference: one LLaDA mask                             1 pass
(elbo_mc is LLaDA's finite-variance form, not the t ~ U(0,1), 1/t form, which has infinite variance:
PAPER.md §5.3.) What it measures, on held-out (x, y) pairs of the four families (y = ground truth):
  1. claim 1: variance of the value log pi^ over repeated draws, per pair, averaged over pairs;
  2. claim 1: total variance of the policy gradient d log pi^ / d theta (all parameters, flattened):
     mean squared distance of K draws from their mean, averaged over pairs;
  3. claim 2: bias against `likelihood.exact` (exact ELBO and exact any-order log-likelihood) on
     5-token windows of real held-out responses (the response truncated to the window: the rest
     of its canvas stays masked), using the exact expectation of each estimator where enumeration
     gives it;
  4. claim 2: Spearman rank correlation of ONE draw of each estimator with the exact any-order
     likelihood and ELBO across 16 candidate windows per prompt (ground truth + plausible variants);
  5. variance against response length / modality: short text (vqa, ground) vs image codes (t2i)
     and text + codes (edit). The paper expects the gap to be largest on long image-token responses;
     at toy size the image responses are SHORT (16 codes; vqa canvases are ~40 slots), so this
     table separates modality from length only partly.
  plus claim 3 (coverage: share of response tokens that contribute) and claim 4 (share of the
  elbo_mc n=1 variance that comes from the draws with few masked tokens, i.e. large L/k weights).
Expected (PAPER.md §12.1): var complementary < mc_unweighted << elbo_mc; one_step ~ 0 but biased.
Variance ratios are given two ways: the ratio of the pair-averaged variances (dominated by the
pairs with the largest variance) and the median of the per-pair ratios (every pair alike); the
[claims] block at the end states each claim's outcome, whichever way it comes out.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import torch

import config as C
import data as D
import likelihood as LK
from diffusion import apply_mask, sft_loss

USAGE = """usage: python bench.py NAME [--ckpt=PATH] [--seed=N] [--preset=toy] [--section.key=value ...]
benchmarks:
  likelihood   variance / bias / rank correlation of the log pi estimators (PAPER.md §5, §12.1-4)
  sampler      prefix-cache sampler vs re-encoding every step: tokens/s, speed-up, same greedy tokens
               [--prompts=8] [--reps=3] [--device=cpu|cuda]
  rollout      one batched group call vs N sequential sampler calls: tokens/s, speed-up
               [--prompts=4] [--n=8] [--reps=2] [--device=cpu|cuda]
  train        SFT step throughput (tokens/s) and MFU [--batch=N] [--warmup=2] [--steps=5]
               [--peak=FLOPS] [--compile] [--device=cpu|cuda]
  search       steps to learn the image-code lookup: fan-in vs GPT-2 init vs a stock torch encoder
               [--seeds=3] [--steps=1500]"""


# ----------------------------------------------------------------------------------------------
# shared: arguments, model and data


def parse_args(argv: list[str], extra: dict | None = None) -> tuple[dict, list[str]]:
    """Split bench flags (--ckpt, --seed, plus the benchmark's own `extra` flags, typed by their
    defaults; a bool flag may be bare: --compile) from config flags (--preset, --section.key=v)."""
    opts, rest, i = {"ckpt": None, "seed": 0, **(extra or {})}, [], 0
    while i < len(argv):
        a = argv[i]
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if key in opts:
            if "=" in a:
                val = a.split("=", 1)[1]
            elif isinstance(opts[key], bool):
                val = "true"
            elif i + 1 < len(argv):
                i, val = i + 1, argv[i + 1]
            else:
                raise SystemExit(f"bench: --{key} needs a value\n{USAGE}")
            cur = opts[key]
            try:
                if isinstance(cur, bool):
                    opts[key] = val.lower() in ("1", "true", "yes", "on")
                elif isinstance(cur, int):
                    opts[key] = int(float(val))              # --seed=3, --steps=1e1
                elif isinstance(cur, float) or (cur is None and key != "ckpt"):
                    opts[key] = float(val)                   # --peak=312e12 (default None = unknown)
                else:
                    opts[key] = val
            except ValueError:
                raise SystemExit(f"bench: --{key}={val!r} is not a number\n{USAGE}") from None
        else:
            rest.append(a)
        i += 1
    return opts, rest


def load_model_and_data(opts: dict, rest: list[str]):
    """(cfg, model, bundle, note). The checkpoint's own config decides the data and the model, so the
    tokens are exactly those it was trained on. With no checkpoint: a loud warning and a randomly
    initialised model on data tokenized by an UNTRAINED VQ in a scratch cache (development only)."""
    import train
    import vq as VQ
    cfg = C.get_config(rest)
    path = opts["ckpt"] or os.path.join(cfg.train.out_dir, "ckpt_sft.pt")
    if os.path.exists(path):
        blob = train.load_checkpoint(path)
        cfg = C.from_dict(blob["config"])
        cfg.train.device, cfg.train.out_dir = "cpu", os.path.join("runs", "bench")
        if not os.path.exists(VQ.vq_path(cfg)):
            # retraining it would give different image codes from the ones the model was trained on
            raise SystemExit(f"bench: the VQ tokenizer {VQ.vq_path(cfg)} of {path} is missing; re-run "
                             f"`python train.py --preset={cfg.preset}` (or restore {cfg.data.cache_dir}/)")
        ctx = train.setup(cfg)
        vq = VQ.get_vq(cfg, "cpu", ctx.out_dir)
        bundle = train.get_bundle(cfg, vq, ctx)
        blob = train.load_checkpoint(path, bundle.tok.vocab_size)      # checks the vocabulary fits
        model = train.model_from_checkpoint(blob, "cpu").eval()
        return cfg, model, bundle, f"{path} (step {blob['step']})"
    bar = "!" * 100
    print(f"{bar}\n!! bench: no checkpoint at {path}. Run `python train.py --preset={cfg.preset}` first.\n"
          f"!! DEVELOPMENT FALLBACK: a RANDOMLY INITIALISED model on data tokenized by an UNTRAINED VQ.\n"
          f"!! The numbers below say nothing about the paper's claims.\n{bar}")
    cfg.train.device, cfg.train.out_dir = "cpu", os.path.join("runs", "bench")
    cfg.data.cache_dir = os.path.join("runs", "bench", "dev_cache")     # never the real token cache
    cfg.data.n_rl = 8                                                   # the RL pool is not used here
    ctx = train.setup(cfg)
    torch.manual_seed(0)
    vq = VQ.VQVAE(cfg.vq, cfg.data.image_size).eval()
    bundle = train.get_bundle(cfg, vq, ctx)
    model = train.build_model(cfg, bundle.tok, "cpu").eval()
    return cfg, model, bundle, "RANDOM INIT (no checkpoint)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def write_json(name: str, result: dict):
    """runs/bench_<name>.json; NaN/inf (e.g. a ratio to a zero variance) become null: strict JSON."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    os.makedirs("runs", exist_ok=True)
    path = os.path.join("runs", f"bench_{name}.json")
    with open(path, "w") as f:
        json.dump(clean(result), f, indent=1, allow_nan=False)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# likelihood

FAMILIES = ("vqa", "ground", "edit", "t2i")
PAIRS_PER_FAMILY = 3        # value variance: 12 (x, y) pairs
GRAD_PAIRS_PER_FAMILY = 2   # gradient variance: 8 pairs (one backward per draw is the slow part)
K_VALUE = 128               # draws per pair for the value variance (relative SE of a variance ~ 1/8)
K_GRAD = 32                 # draws per pair for the gradient variance
WINDOW = 5                  # tiny cases: 5 response tokens -> 31 masked inputs per exact() call
N_CAND = 16                 # candidate windows per prompt (ground truth + 15 variants)
WINDOW_PROMPTS = 2          # prompts per family for the tiny cases
R_SPEARMAN = 8              # single draws per candidate (Spearman of one draw, averaged over 8)
K_BIAS_MC = 32              # draws for the one estimator enumeration does not cover (one_step p=.15)

# label -> (passes, estimator call, key of its exact expectation in likelihood.exact or None)
ESTIMATORS = {
    "complementary": (2, lambda m, b, t, g: LK.complementary(m, b, t, generator=g), "complementary"),
    "elbo_mc n=2": (2, lambda m, b, t, g: LK.elbo_mc(m, b, t, n=2, generator=g), "elbo"),
    "mc_unweighted n=2": (2, lambda m, b, t, g: LK.mc_unweighted(m, b, t, n=2, generator=g), "mc_unweighted"),
    "one_step": (1, lambda m, b, t, g: LK.one_step(m, b, t, generator=g), "one_step"),
    "one_step p=.15": (1, lambda m, b, t, g: LK.one_step(m, b, t, generator=g, p_prompt=0.15), None),
    "elbo_mc n=1": (1, lambda m, b, t, g: LK.elbo_mc(m, b, t, n=1, generator=g), "elbo"),
}
BASE = "complementary"


def div(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def pick_pairs(bundle, per_family: int, g: torch.Generator) -> list[tuple[str, int]]:
    """Held-out (eval split) examples with their ground-truth responses, per_family of each family."""
    out = []
    for task in FAMILIES:
        n = len(bundle.sets[task]["eval"])
        out += [(task, int(i)) for i in torch.randperm(n, generator=g)[:per_family]]
    return out


def one_pair(bundle, task: str, i: int) -> D.Batch:
    return D.collate({task: bundle.sets[task]["eval"]}, [(task, i)], bundle.tok)


def value_draws(model, batch: D.Batch, tok, k: int, g) -> tuple[dict, torch.Tensor]:
    """k draws of every estimator for one pair (the pair repeated as k rows of one batch).
    Returns (label -> (values (k,) float64, coverage = share of response slots scored (k,)), t1 (k,)):
    complementary gets its t1 ~ U[0, 1] drawn here (its own distribution) so that the share of its
    variance due to t1 can be measured."""
    big = batch.repeat(k)
    L = batch.is_resp.sum().item()
    t1 = torch.rand(k, generator=g)
    out = {}
    with torch.no_grad():
        for name, (_, fn, _) in ESTIMATORS.items():
            if name == "complementary":
                logp, scored = LK.complementary(model, big, tok, generator=g, t1=t1)
            else:
                logp, scored = fn(model, big, tok, g)
            out[name] = (logp.sum(1).double(), scored.sum(1).double() / L)
    return out, t1


def t1_share(v: torch.Tensor, t1: torch.Tensor, bins: int = 8) -> float:
    """Share of the variance of v explained by t1: between-bin variance of the bin means (t1 in
    `bins` equal-width bins) over the total. The complementary value is U-shaped in t1 when the
    model's conditionals depend on context (t1 -> 0 or 1 leaves one half with almost no context)."""
    idx = (t1 * bins).long().clamp(max=bins - 1)
    tot = (v - v.mean()).pow(2).sum()
    between = sum(((v[idx == j].mean() - v.mean()) ** 2 * (idx == j).sum()) for j in range(bins) if (idx == j).any())
    return (between / tot).item() if tot > 0 else float("nan")


def grad_variance(model, batch: D.Batch, tok, k: int, g) -> dict:
    """Total variance of the flattened policy gradient over k draws: (sum ||g||^2 - ||sum g||^2 / k)
    / (k - 1), i.e. the trace of its covariance; plus ||mean g||^2 for scale."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name, (_, fn, _) in ESTIMATORS.items():
        if name == "one_step":          # deterministic: every draw gives the same gradient
            continue
        s, ss = None, 0.0
        for _ in range(k):
            logp, _ = fn(model, batch, tok, g)
            grads = torch.autograd.grad(logp.sum(), params)
            flat = torch.cat([x.reshape(-1) for x in grads]).double()
            s = flat.clone() if s is None else s + flat
            ss += flat.pow(2).sum().item()
        mean_sq = (s / k).pow(2).sum().item()
        out[name] = ((ss - s.pow(2).sum().item() / k) / (k - 1), mean_sq)
    out["one_step"] = (0.0, float("nan"))
    return out


def window_positions(batch: D.Batch, lay: D.Layout, task: str) -> list[int]:
    """WINDOW response columns (absolute) that make up a tiny-case response (see `windowed`).
    Text families: the first WINDOW trace tokens after <think> (the reasoning, not EOS filler).
    t2i: WINDOW image codes from the middle of the 4x4 code grid. edit: 2 plan tokens after <think>
    and 3 codes of the edited picture: both modalities in one window."""
    P = batch.P
    if task in ("vqa", "ground"):
        cols = list(range(1, 1 + WINDOW))
    elif task == "t2i":
        cols = [lay.R_text + 5 + j for j in range(WINDOW)]
    else:
        h = WINDOW // 2
        cols = list(range(1, 1 + h)) + [lay.R_text + 5 + j for j in range(WINDOW - h)]
    return [P + c for c in cols]


def windowed(batch: D.Batch, cols: list[int], tok, tokens: torch.Tensor | None = None) -> D.Batch:
    """The same row(s) truncated to a window: only `cols` are the response (masked and scored by the
    estimators); every other response slot stays [MASK]/[IMASK] in every pass, as if the response
    were cut to the window. Its likelihood is then the window's marginal given x, under the model's
    own conditionals. Optional new token ids (candidates)."""
    toks = batch.tokens if tokens is None else tokens
    is_resp = torch.zeros_like(batch.is_resp)
    is_resp[:, cols] = True
    rest = batch.is_resp & ~is_resp
    toks = apply_mask(toks, rest.expand_as(toks), batch.is_image.expand_as(toks), tok)
    return D.Batch(toks, batch.valid, batch.is_prompt, is_resp, batch.is_image, batch.P, batch.tasks)


def candidates(model, wb: D.Batch, tok, cols: list[int], g) -> torch.Tensor:
    """N_CAND token rows (N_CAND, T): the ground truth, then variants with m = 1..WINDOW window tokens
    replaced by a draw from the model's own conditional at that slot given the whole window masked
    (the ground-truth token excluded). Plausible alternatives, like RL samples; uniformly random
    tokens would be so unlikely that any estimator would rank them correctly."""
    with torch.no_grad():
        full = torch.zeros_like(wb.tokens, dtype=torch.bool)
        full[:, cols] = True
        inp = apply_mask(wb.tokens, full, wb.is_image, tok)
        probs = model(inp, wb.valid, wb.is_prompt)[0].float().softmax(-1)            # (T, V)
    img = wb.is_image[0]
    rows = [wb.tokens[0].clone()]
    for c in range(1, N_CAND):
        m = 1 + (c - 1) % WINDOW
        row = wb.tokens[0].clone()
        for j in torch.randperm(WINDOW, generator=g)[:m].tolist():
            col = cols[j]
            p = probs[col].clone()
            # keep the slot's modality: codes on image slots, non-special words on text slots
            allowed = torch.zeros_like(p, dtype=torch.bool)
            if img[col]:
                allowed[tok.img_offset:] = True
            else:
                allowed[len(D.SPECIALS):tok.img_offset] = True
                allowed[tok.EOS] = True
            p = p * allowed
            p[row[col]] = 0.0
            row[col] = torch.multinomial(p / p.sum(), 1, generator=g).item()
        rows.append(row)
    return torch.stack(rows)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties) = Pearson correlation of the ranks."""
    def ranks(x):
        x = x.double()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():                      # ties -> their average rank
            tie = x == v
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt().item()
    return float("nan") if den == 0 else (ra * rb).sum().item() / den


def bench_likelihood(argv: list[str]):
    opts, rest = parse_args(argv)
    # one thread: on a shared 2-core box a second intra-op thread spin-waits on a busy core and makes
    # these small matmuls ~10x slower (measured: 2 threads 1.2 s vs 1 thread 0.02 s per fwd+bwd)
    torch.set_num_threads(1)
    t_start = time.time()
    cfg, model, bundle, source = load_model_and_data(opts, rest)
    tok, seed = bundle.tok, opts["seed"]
    for p in model.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    res = {"checkpoint": source, "seed": seed, "commit": git_commit(), "torch": torch.__version__,
           "estimators": {k: {"passes": v[0]} for k, v in ESTIMATORS.items()}}
    print(f"bench likelihood | model {source} | seed {seed} | commit {res['commit']} | torch {torch.__version__}"
          f" | {torch.get_num_threads()} threads")

    # -- 1, 5 (value variance per pair, by family) and claims 3, 4 ---------------------------------
    t0 = time.time()
    pairs = pick_pairs(bundle, PAIRS_PER_FAMILY, g)
    per_pair = []
    for task, i in pairs:
        b = one_pair(bundle, task, i)
        draws, t1 = value_draws(model, b, tok, K_VALUE, g)
        L = int(b.is_resp.sum())
        rec = {"task": task, "index": i, "L": L, "n_img": int(b.is_image.sum()),
               "var": {k: v[0].var().item() for k, v in draws.items()},
               "mean": {k: v[0].mean().item() for k, v in draws.items()},
               "coverage": {k: v[1].mean().item() for k, v in draws.items()}}
        rec["comp_t1_share"] = t1_share(draws[BASE][0], t1)
        # claim 4: with one mask, coverage = k / L; the draws with k/L <= 1/4 carry weights L/k >= 4
        v1, c1 = draws["elbo_mc n=1"]
        dev2 = (v1 - v1.mean()).pow(2)
        rec["elbo1_small_k_var_share"] = (dev2[c1 <= 0.25].sum() / dev2.sum()).item()
        rec["elbo1_small_k_draw_share"] = (c1 <= 0.25).double().mean().item()
        per_pair.append(rec)
    t_value = time.time() - t0
    names = list(ESTIMATORS)
    mean_var = {k: sum(r["var"][k] for r in per_pair) / len(per_pair) for k in names}
    coverage = {k: sum(r["coverage"][k] for r in per_pair) / len(per_pair) for k in names}

    # -- 2 (policy-gradient variance) --------------------------------------------------------------
    t0 = time.time()
    gpairs = [pq for f in FAMILIES for pq in [x for x in pairs if x[0] == f][:GRAD_PAIRS_PER_FAMILY]]
    gres = []
    for task, i in gpairs:
        b = one_pair(bundle, task, i)
        gv = grad_variance(model, b, tok, K_GRAD, g)
        gres.append({"task": task, "index": i, "L": int(b.is_resp.sum()),
                     "grad_var": {k: v[0] for k, v in gv.items()}, "grad_mean_sq": {k: v[1] for k, v in gv.items()}})
    model.zero_grad(set_to_none=True)
    t_grad = time.time() - t0
    mean_gvar = {k: sum(r["grad_var"][k] for r in gres) / len(gres) for k in names}
    mean_gsq = {k: sum(r["grad_mean_sq"][k] for r in gres) / len(gres) for k in names if k != "one_step"}

    print(f"\n[1-2] value and policy-gradient variance at equal passes | {len(pairs)} pairs x {K_VALUE} draws"
          f" (value), {len(gpairs)} pairs x {K_GRAD} draws (gradient) | ratios = estimator / {BASE}")
    print(f"{'estimator':<20}{'passes':>7}{'var(value)':>12}{'ratio':>9}{'median [min, max] per pair':>30}"
          f"{'var(grad)':>12}{'ratio':>9}{'|E grad|^2':>12}{'coverage':>10}")
    pair_ratio = {}
    for k in names:
        rv, rg = div(mean_var[k], mean_var[BASE]), div(mean_gvar[k], mean_gvar[BASE])
        pr = sorted(r["var"][k] / r["var"][BASE] for r in per_pair if r["var"][BASE] > 0)
        pair_ratio[k] = {"median": pr[len(pr) // 2] if len(pr) % 2 else (pr[len(pr) // 2 - 1] + pr[len(pr) // 2]) / 2,
                         "min": pr[0], "max": pr[-1]} if pr else {}
        rng = f"{pair_ratio[k]['median']:.3g} [{pair_ratio[k]['min']:.3g}, {pair_ratio[k]['max']:.3g}]" if pr else "-"
        print(f"{k:<20}{ESTIMATORS[k][0]:>7}{mean_var[k]:>12.4g}{rv:>9.3g}{rng:>30}{mean_gvar[k]:>12.4g}{rg:>9.3g}"
              f"{mean_gsq.get(k, float('nan')):>12.4g}{coverage[k]:>10.3f}")
    print("(ratio = ratio of the pair-averaged variances, dominated by the pairs of largest variance; the median"
          " of the per-pair ratios weighs every pair alike. coverage = share of response tokens scored per draw.)")
    print(f"(variance of a variance from {K_VALUE} draws: relative SE ~ {math.sqrt(2 / (K_VALUE - 1)):.2f} per pair;"
          f" from {K_GRAD}: ~ {math.sqrt(2 / (K_GRAD - 1)):.2f}. one_step uses 1 pass and is deterministic.)")
    share = sum(r["elbo1_small_k_var_share"] for r in per_pair) / len(per_pair)
    dshare = sum(r["elbo1_small_k_draw_share"] for r in per_pair) / len(per_pair)

    # -- 5 (by family / response length) -----------------------------------------------------------
    print(f"\n[5] variance by family (response length L = all response slots; n_img = image codes among them)")
    print(f"{'family':<8}{'L':>5}{'n_img':>6}{'var comp':>11}{'elbo2/comp':>12}{'mcu2/comp':>11}{'elbo1/comp':>12}"
          f"{'grad elbo2/comp':>17}{'grad mcu2/comp':>16}{'comp var from t1':>18}")
    by_family = {}
    for f in FAMILIES:
        rs, gs = [r for r in per_pair if r["task"] == f], [r for r in gres if r["task"] == f]
        mv = {k: sum(r["var"][k] for r in rs) / len(rs) for k in names}
        mg = {k: sum(r["grad_var"][k] for r in gs) / len(gs) for k in names}
        ratio = lambda d, k: div(d[k], d[BASE])
        t1s = sum(r["comp_t1_share"] for r in rs) / len(rs)
        by_family[f] = {"L": sum(r["L"] for r in rs) / len(rs), "n_img": rs[0]["n_img"], "var": mv, "grad_var": mg,
                        "comp_t1_share": t1s}
        print(f"{f:<8}{by_family[f]['L']:>5.0f}{rs[0]['n_img']:>6}{mv[BASE]:>11.4g}{ratio(mv, 'elbo_mc n=2'):>12.3g}"
              f"{ratio(mv, 'mc_unweighted n=2'):>11.3g}{ratio(mv, 'elbo_mc n=1'):>12.3g}"
              f"{ratio(mg, 'elbo_mc n=2'):>17.3g}{ratio(mg, 'mc_unweighted n=2'):>16.3g}{100 * t1s:>17.0f}%")
    print("(comp var from t1: share of the complementary estimator's value variance explained by its t1, i.e. by the"
          " U shape of E[value | t1]; the rest comes from which tokens land in which half)")

    # -- 3, 4 (bias and rank correlation against exact, tiny windows) -------------------------------
    t0 = time.time()
    wpairs = [pq for f in FAMILIES for pq in [x for x in pairs if x[0] == f][:WINDOW_PROMPTS]]
    bias_rows, rho = [], {k: {"any_order": [], "elbo": []} for k in names}
    for task, i in wpairs:
        b = one_pair(bundle, task, i)
        cols = window_positions(b, bundle.layouts[task], task)
        wb = windowed(b, cols, tok)
        cands = candidates(model, wb, tok, cols, g)                                   # (N_CAND, T)
        exact = [LK.exact(model, windowed(b, cols, tok, c[None]), tok) for c in cands]
        ex_any = torch.tensor([e["any_order"] for e in exact])
        ex_elbo = torch.tensor([e["elbo"] for e in exact])
        # single draws: every candidate R_SPEARMAN times, as rows of one batch
        cb = windowed(b.repeat(N_CAND * R_SPEARMAN), cols, tok, cands.repeat_interleave(R_SPEARMAN, 0))
        with torch.no_grad():
            for k, (_, fn, _) in ESTIMATORS.items():
                v = fn(model, cb, tok, g)[0].sum(1).view(N_CAND, R_SPEARMAN)
                for r in range(R_SPEARMAN):
                    rho[k]["any_order"].append(spearman(v[:, r], ex_any))
                    rho[k]["elbo"].append(spearman(v[:, r], ex_elbo))
        # bias on the ground-truth window: exact expectations; one_step p=.15 by Monte Carlo
        e0 = exact[0]
        with torch.no_grad():
            mc = ESTIMATORS["one_step p=.15"][1](model, wb.repeat(K_BIAS_MC), tok, g)[0].sum(1).double()
        mean = {k: (e0[key] if key else mc.mean().item()) for k, (_, _, key) in ESTIMATORS.items()}
        bias_rows.append({"task": task, "index": i, "elbo": e0["elbo"], "any_order": e0["any_order"],
                          "mean": mean, "one_step_p15_se": mc.std().item() / math.sqrt(K_BIAS_MC)})
    t_exact = time.time() - t0
    nb = len(bias_rows)
    avg = lambda xs: sum(xs) / len(xs)
    print(f"\n[3] bias on {nb} ground-truth windows of {WINDOW} tokens (2 prompts per family; the rest of "
          f"the canvas masked) | mean exact ELBO {avg([r['elbo'] for r in bias_rows]):.3f}, "
          f"any-order {avg([r['any_order'] for r in bias_rows]):.3f} (nats per window)")
    print(f"{'estimator':<20}{'E[est]':>10}{'- ELBO':>10}{'- any-order':>13}   (E[est] exact by enumeration"
          f" except one_step p=.15: {K_BIAS_MC} draws)")
    bias = {}
    for k in names:
        m = avg([r["mean"][k] for r in bias_rows])
        be = avg([r["mean"][k] - r["elbo"] for r in bias_rows])
        ba = avg([r["mean"][k] - r["any_order"] for r in bias_rows])
        bias[k] = {"mean": m, "minus_elbo": be, "minus_any_order": ba}
        print(f"{k:<20}{m:>10.3f}{be:>10.3f}{ba:>13.3f}")
    print(f"\n[4] Spearman rank correlation of ONE draw with the exact value, across {N_CAND} candidate windows"
          f" per prompt ({nb} prompts x {R_SPEARMAN} draws)")
    print(f"{'estimator':<20}{'vs any-order':>14}{'vs ELBO':>10}")
    for k in names:
        print(f"{k:<20}{avg(rho[k]['any_order']):>14.3f}{avg(rho[k]['elbo']):>10.3f}")

    # -- the claims, one line each (PAPER.md §12 claims 1-4), whichever way they come out -----------
    yn = lambda ok: "yes" if ok else "NO"
    e2, m2 = "elbo_mc n=2", "mc_unweighted n=2"
    rv = {k: div(mean_var[k], mean_var[BASE]) for k in (e2, m2)}
    rg = {k: div(mean_gvar[k], mean_gvar[BASE]) for k in (e2, m2)}
    med = {k: pair_ratio[k].get("median", float("nan")) for k in (e2, m2)}
    print("\n[claims] (ratio of pair-averaged variances; per-pair medians in brackets)")
    print(f"claim 1, value:    var(elbo_mc n=2) / var(complementary) = {rv[e2]:.3g} [{med[e2]:.3g}]"
          f" -> complementary at most 1/3 of elbo_mc: {yn(rv[e2] >= 3)} [{yn(med[e2] >= 3)}]; "
          f"below mc_unweighted: {yn(rv[m2] > 1)} ({rv[m2]:.3g}x) [{yn(med[m2] > 1)}]")
    print(f"claim 1, gradient: var(elbo_mc n=2) / var(complementary) = {rg[e2]:.3g} -> at most 1/3: {yn(rg[e2] >= 3)}; "
          f"below mc_unweighted: {yn(rg[m2] > 1)} ({rg[m2]:.3g}x)")
    print(f"claim 1, one_step: variance 0 (deterministic, 1 pass); E - any-order on the windows: one_step "
          f"{bias['one_step']['minus_any_order']:+.3f}, complementary {bias[BASE]['minus_any_order']:+.3f}, "
          f"elbo_mc {bias[e2]['minus_any_order']:+.3f} nats (|one_step| > |complementary|: "
          f"{yn(abs(bias['one_step']['minus_any_order']) > abs(bias[BASE]['minus_any_order']))})")
    print(f"claim 2, rank correlation with any-order (one draw): complementary {avg(rho[BASE]['any_order']):.3f}, "
          f"elbo_mc n=2 {avg(rho[e2]['any_order']):.3f}, one_step {avg(rho['one_step']['any_order']):.3f}")
    print(f"claim 3, coverage: complementary {coverage[BASE]:.3f} of the response tokens per draw, elbo_mc n=2 "
          f"{coverage[e2]:.3f}, elbo_mc n=1 {coverage['elbo_mc n=1']:.3f}")
    print(f"claim 4, 1/t weights: elbo_mc n=1 draws with weight L/k >= 4 ({100 * dshare:.0f}% of draws) carry "
          f"{100 * share:.0f}% of its variance")

    wall = time.time() - t_start
    print(f"\nwall time {wall:.0f}s (value {t_value:.0f}s, gradient {t_grad:.0f}s, exact windows {t_exact:.0f}s)"
          f" | seed {seed} | pairs: {len(pairs)} value, {len(gpairs)} gradient, {nb} window prompts")
    res.update(pairs=len(pairs), draws_value=K_VALUE, grad_pairs=len(gpairs), draws_grad=K_GRAD,
               window=WINDOW, n_candidates=N_CAND, window_prompts=nb, draws_spearman=R_SPEARMAN,
               value_var=mean_var, value_var_ratio={k: div(mean_var[k], mean_var[BASE]) for k in names}, value_var_ratio_per_pair=pair_ratio,
               grad_var=mean_gvar, grad_var_ratio={k: div(mean_gvar[k], mean_gvar[BASE]) for k in names},
               grad_mean_sq=mean_gsq, coverage=coverage, by_family=by_family, bias=bias,
               spearman={k: {w: avg(v) for w, v in d.items()} for k, d in rho.items()},
               elbo1_small_k_var_share=share, per_pair=per_pair, per_grad_pair=gres, bias_windows=bias_rows,
               wall_s=wall)
    write_json("likelihood", res)


# ----------------------------------------------------------------------------------------------
# speed: sampler, rollout, train (they measure time, so the weights do not matter)

H100_BF16_DENSE = 989e12    # FLOP/s, H100 SXM bf16 dense tensor cores (H200: the same compute)


def speed_device(rest: list[str]) -> tuple[str, torch.dtype, str]:
    """(device, autocast dtype, reason) from --device (default auto: cuda > cpu), as train.setup
    decides: bf16 autocast on CUDA with bf16, fp32 elsewhere (never autocast on CPU)."""
    want = C.get_config(rest).train.device
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("bench: --device=cuda but torch.cuda.is_available() is False")
        name = torch.cuda.get_device_name(dev)
        if torch.cuda.is_bf16_supported():
            return dev, torch.bfloat16, f"bf16 autocast ({name})"
        return dev, torch.float32, f"fp32 ({name}: no bf16)"
    return dev, torch.float32, f"fp32 on {dev} (1 thread)"


def autocast_for(dev: str, dtype: torch.dtype):
    from contextlib import nullcontext
    return torch.autocast("cuda", dtype=dtype) if dtype == torch.bfloat16 else nullcontext()


def speed_world(opts: dict, rest: list[str]):
    """(cfg, bundle, trained model or None, note). With the checkpoint: its config, data and model.
    Without it, and quietly (time does not depend on the weights or the VQ): the preset's config,
    small pools (256 SFT / 64 eval examples per family, enough for the layouts), tokenized by an
    untrained VQ in a scratch cache, and no model."""
    import train
    import vq as VQ
    cfg = C.get_config(rest)
    path = opts["ckpt"] or os.path.join(cfg.train.out_dir, "ckpt_sft.pt")
    if os.path.exists(path):
        cfg, model, bundle, src = load_model_and_data(opts, rest)
        return cfg, bundle, model, f"data and config of {src}"
    cfg.data.n_sft, cfg.data.n_rl = min(cfg.data.n_sft, 256), 8
    cfg.data.n_eval = min(cfg.data.n_eval, 64)
    cfg.train.device, cfg.train.out_dir = "cpu", os.path.join("runs", "bench")
    cfg.data.cache_dir = os.path.join("runs", "bench", "dev_cache")
    ctx = train.Ctx("cpu", torch.float32, "fp32", False, 0, 1, cfg.train.out_dir)
    os.makedirs(ctx.out_dir, exist_ok=True)
    torch.manual_seed(0)
    bundle = train.get_bundle(cfg, VQ.VQVAE(cfg.vq, cfg.data.image_size).eval(), ctx)
    return cfg, bundle, None, (f"no checkpoint at {path}: preset {cfg.preset!r} data (small pools, untrained VQ; "
                               f"only the layout matters here)")


def prefix_model(cfg, bundle, trained, dev: str, seed: int):
    """The model the sampler benchmarks run: the trained one if it is a prefix-DLM, else a RANDOMLY
    INITIALISED prefix-DLM of the same size (the prefix cache needs prefix-DLM attention; speed
    does not depend on training)."""
    import train
    if trained is not None and trained.cfg.prefix_dlm:
        return trained.to(dev).eval(), "the trained checkpoint (prefix-DLM)"
    pcfg = C.from_dict(C.to_dict(cfg))
    pcfg.model.prefix_dlm = True
    torch.manual_seed(seed)
    why = "the checkpoint is not prefix-DLM" if trained is not None else "no checkpoint"
    return (train.build_model(pcfg, bundle.tok, dev).eval(),
            f"RANDOMLY INITIALISED prefix-DLM of the {cfg.preset} size ({why}; speed does not depend on training)")


def sync(dev: str):
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)


def timed(fn, dev: str):
    """(fn(), seconds) with the device's queue drained before and after."""
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


def prompts_of(bundle, task: str, n: int, dev: str) -> D.Batch:
    """The first n held-out prompts of `task` with an all-mask response canvas."""
    ts = bundle.sets[task]["eval"]
    return D.collate({task: ts}, [(task, i) for i in range(min(n, len(ts)))], bundle.tok, responses=False).to(dev)


def bench_sampler(argv: list[str]):
    """Prefix-cache sampler vs the LLaDA-style loop that re-encodes prompt + response every step."""
    from diffusion import n_steps, sample
    opts, rest = parse_args(argv, {"prompts": 8, "reps": 3})
    torch.set_num_threads(1)
    dev, dtype, why = speed_device(rest)
    cfg, bundle, trained, data_note = speed_world(opts, rest)
    model, model_note = prefix_model(cfg, bundle, trained, dev, opts["seed"])
    tok, amp = bundle.tok, autocast_for(dev, dtype)
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
            with amp:
                return sample(model, batch, tok, cfg.diffusion, temperature=0.0, image_temperature=0.0,
                              use_cache=cache)
        outs, times = {}, {True: [], False: []}
        for cache in (True, False):
            outs[cache] = run(cache)                 # warm-up (and the tokens compared below)
        for _ in range(opts["reps"]):
            for cache in (True, False):              # interleaved: both see the same machine load
                times[cache].append(timed(lambda: run(cache), dev)[1])
        if dtype != torch.float32:                   # the identity check in fp32: bf16 rounding differs
            with torch.autocast("cuda", enabled=False):
                outs = {c: sample(model, batch, tok, cfg.diffusion, temperature=0.0, image_temperature=0.0,
                                  use_cache=c) for c in (True, False)}
        same = (outs[True][0] == outs[False][0]).float().mean().item()
        same_rows = (outs[True][0] == outs[False][0]).all(1).float().mean().item()
        same_order = bool(torch.equal(outs[True][1], outs[False][1]))
        tc, tf = median(times[True]), median(times[False])
        gen = B * R                                  # response tokens produced per call
        print(f"{task:<6}{B:>5}{batch.P:>5}{R:>5}{n_steps(batch, cfg.diffusion):>7}{gen / tc:>14.0f}"
              f"{gen / tf:>12.0f}{tf / tc:>9.2f}x{(batch.P + R) / R:>9.2f}{100 * same:>10.1f}% ({'all' if same_rows == 1 else f'{100 * same_rows:.0f}% of'} rows"
              f"{', same order' if same_order else ', order differs'})")
        res["tasks"][task] = {"rows": B, "P": batch.P, "R": R, "steps": n_steps(batch, cfg.diffusion),
                              "cached_s": tc, "full_s": tf, "cached_tok_s": gen / tc, "full_tok_s": gen / tf,
                              "speedup": tf / tc, "identical_tokens": same, "identical_rows": same_rows,
                              "identical_order": same_order}
    print("(tok/s = response tokens generated per second. cached = prompt encoded once per call "
          "(encode_prefix), each step runs only the response (forward_cached); full = use_cache=False, "
          "each step runs prompt + response, as LLaDA's generate does. The work per step shrinks by about "
          "(P+R)/R (more where attention dominates), which bounds the speed-up; long prompts gain most.)")
    write_json("sampler", res)


def bench_rollout(argv: list[str]):
    """One batched sampler call for a whole group vs N sequential calls of one sample per prompt."""
    from diffusion import sample
    opts, rest = parse_args(argv, {"prompts": 0, "n": 0, "reps": 2})
    torch.set_num_threads(1)
    dev, dtype, why = speed_device(rest)
    cfg, bundle, trained, data_note = speed_world(opts, rest)
    model, model_note = prefix_model(cfg, bundle, trained, dev, opts["seed"])
    tok, amp, rc = bundle.tok, autocast_for(dev, dtype), cfg.rl
    G = opts["prompts"] or min(rc.prompts_per_step, 4)
    N = opts["n"] or rc.group_size
    print(f"bench rollout | device {dev} | {why} | torch {torch.__version__} | commit {git_commit()}")
    print(f"model: {model_note}; {model_line(model)}\ndata: {data_note}")
    print(f"{G} prompts x N={N} samples per task, temperature {rc.temperature} (as rollout.rollout_task), "
          f"median of {opts['reps']} timed runs after a warm-up")
    print(f"{'task':<6}{'rows':>6}{'batched tok/s':>15}{'sequential tok/s':>18}{'speed-up':>10}")
    res = {"device": dev, "dtype": str(dtype), "model": model_note, "data": data_note, "G": G, "N": N, "tasks": {}}
    gen = torch.Generator(device=dev).manual_seed(opts["seed"])
    for task in ("vqa", "edit"):
        base = prompts_of(bundle, task, G, dev)
        Gr, R = base.tokens.shape[0], base.tokens.shape[1] - base.P

        def call(canvas):
            with amp:
                return sample(model, canvas, tok, cfg.diffusion, temperature=rc.temperature,
                              image_temperature=rc.temperature, generator=gen)

        def batched():                            # rollout_task: rows = prompts x samples, one call
            return call(base.repeat(N))

        def sequential():                         # N calls, each one sample of every prompt
            return [call(base) for _ in range(N)]
        batched(), sequential()                   # warm-up
        tb, ts = [], []
        for _ in range(opts["reps"]):
            tb.append(timed(batched, dev)[1])
            ts.append(timed(sequential, dev)[1])
        tb, ts = median(tb), median(ts)
        tokens = Gr * N * R
        print(f"{task:<6}{Gr * N:>6}{tokens / tb:>15.0f}{tokens / ts:>18.0f}{ts / tb:>9.2f}x")
        res["tasks"][task] = {"rows": Gr * N, "R": R, "batched_s": tb, "sequential_s": ts,
                              "batched_tok_s": tokens / tb, "sequential_tok_s": tokens / ts, "speedup": ts / tb}
    print(f"(batched: ONE sampler call with {G}x{N} rows, as rollout_task makes it (base.repeat(N): the prefix "
          f"cache is computed for all {G}x{N} rows, each prompt {N} times); sequential: {N} calls of {G} rows, the "
          f"same tokens. Scoring, answer-forcing and tree search are not timed (the same work either way). On one "
          f"CPU thread the work is compute-bound and linear in the rows, so batching can gain little there; on a GPU "
          f"small calls leave most of the device idle.)")
    write_json("rollout", res)


def bench_train(argv: list[str]):
    """SFT training-step throughput and model FLOPs utilisation."""
    import train
    opts, rest = parse_args(argv, {"batch": 0, "warmup": 2, "steps": 5, "peak": None, "compile": False})
    torch.set_num_threads(1)
    dev, dtype, why = speed_device(rest)
    cfg, bundle, trained, data_note = speed_world(opts, rest)
    tok, amp = bundle.tok, autocast_for(dev, dtype)
    torch.manual_seed(opts["seed"])
    model = train.build_model(cfg, tok, dev).train()
    opt = train.make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, dev)
    fwd = torch.compile(model) if opts["compile"] else model
    B = opts["batch"] or cfg.train.micro_batch
    sampler = train.TaskSampler(bundle.sets, "sft", C.parse_mix(cfg.train.task_mix), opts["seed"])
    sets = {k: v["sft"] for k, v in bundle.sets.items()}
    batches = [D.collate(sets, sampler.draw(B), tok).to(dev) for _ in range(opts["warmup"] + opts["steps"])]
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
    tps = toks / secs
    Ts = sorted({b.tokens.shape[1] for b in timed_batches})
    fpt = flops / toks                                               # per-token FLOPs, token-weighted
    peak = opts["peak"]
    if peak is None and dev.startswith("cuda") and dtype == torch.bfloat16 and \
            any(k in torch.cuda.get_device_name(dev) for k in ("H100", "H200")):
        peak = H100_BF16_DENSE
    mfu = fpt * tps / peak if peak else None
    n = len(timed_batches)
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
# search: the image-code lookup on its own (why model.init is fan-in)

def search_batch(B: int, rng, n_extra: int = 16):
    """(B, 16 + 3 + n_extra) ids and (B,) targets. Vocabulary: 0 empty cell, 1..24 the
    (colour, kind, size) codes, 25..28 colour words, 29..31 kind words, 32..47 cell names, 48 [MASK],
    49 filler. Target: the cell name of the one shape with the queried (colour, kind)."""
    X = torch.full((B, 19 + n_extra), 49, dtype=torch.long)
    Y = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        while True:
            cells = rng.choice(16, size=int(rng.integers(3, 8)), replace=False)
            objs = [(int(rng.integers(4)), int(rng.integers(3)), int(rng.integers(2))) for _ in cells]
            pairs = [o[:2] for o in objs]
            unique = [i for i, p in enumerate(pairs) if pairs.count(p) == 1]
            if unique:
                break
        for c, (col, kind, size) in zip(cells, objs):
            X[b, int(c)] = 1 + (col * 3 + kind) * 2 + size
        t = unique[int(rng.integers(len(unique)))]
        X[b, 16], X[b, 17], X[b, 18] = 25 + objs[t][0], 29 + objs[t][1], 48
        Y[b] = 32 + int(cells[t])
    return X, Y


class TorchEncoder(torch.nn.Module):
    """The straightforward baseline: PyTorch's own encoder with its default init."""

    def __init__(self, mcfg, vocab: int, max_len: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, mcfg.d_model)                # N(0, 1) by default
        self.pos = torch.nn.Embedding(max_len, mcfg.d_model)
        layer = torch.nn.TransformerEncoderLayer(mcfg.d_model, mcfg.n_head, 4 * mcfg.d_model, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, mcfg.n_layer, enable_nested_tensor=False)
        self.out = torch.nn.Linear(mcfg.d_model, vocab)

    def forward(self, x):
        return self.out(self.enc(self.emb(x) + self.pos.weight[:x.shape[1]]))


def bench_search(argv: list[str]):
    import dataclasses
    import numpy as np
    from model import Transformer
    opts, rest = parse_args(argv, {"seeds": 3, "steps": 1500})
    cfg = C.get_config(rest)
    torch.set_num_threads(1)
    base = dataclasses.replace(cfg.model, max_len=64, cell_emb="none", prefix_dlm=False, dropout=0.0)
    V = 50
    variants = {
        "model fan_in (default)": lambda: Transformer(dataclasses.replace(base, init="fan_in", final_norm=False), V),
        "model fan_in + final norm": lambda: Transformer(dataclasses.replace(base, init="fan_in", final_norm=True), V),
        "model gpt2 (old default)": lambda: Transformer(
            dataclasses.replace(base, init="gpt2", final_norm=True, tie_weights=True), V),
        "torch encoder (reference)": lambda: TorchEncoder(base, V, 64),
    }
    Xe, Ye = search_batch(512, np.random.default_rng(10_000))
    print(f"search: d={base.d_model} layers={base.n_layer} heads={base.n_head} abs_pos={base.abs_pos}; "
          f"{opts['seeds']} seeds, <= {opts['steps']} steps, batch 16, lr 2e-3")
    result = {"commit": git_commit(), "steps_cap": opts["steps"], "variants": {}}
    t0 = time.time()
    for name, make in variants.items():
        hits, accs = [], []
        for seed in range(opts["seeds"]):
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            m = make()
            opt = torch.optim.AdamW(m.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01)
            hit, acc = None, 0.0
            for step in range(1, opts["steps"] + 1):
                for g in opt.param_groups:
                    g["lr"] = 2e-3 * min(1.0, step / 50)
                X, Y = search_batch(16, rng)
                loss = torch.nn.functional.cross_entropy(m(X)[:, 18], Y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                if step % 100 == 0:
                    with torch.no_grad():
                        acc = (m(Xe)[:, 18].argmax(-1) == Ye).float().mean().item()
                    if acc >= 0.9:
                        hit = step
                        break
            hits.append(hit)
            accs.append(acc)
        shown = " ".join(f"{h:>5}" if h else f">{opts['steps']}" for h in hits)
        print(f"  {name:<28} steps to 90%: {shown}   accuracy at stop: "
              + " ".join(f"{a:.2f}" for a in accs) + f"   ({time.time() - t0:.0f}s)", flush=True)
        result["variants"][name] = {"steps_to_90": hits, "final_acc": accs}
    write_json("search", result)


BENCHMARKS = {"likelihood": bench_likelihood, "sampler": bench_sampler, "rollout": bench_rollout,
              "train": bench_train, "search": bench_search}


def main(argv: list[str]):
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"bench: unknown benchmark {argv[0]!r}")
        print(USAGE)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
