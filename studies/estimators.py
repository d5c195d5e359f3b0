"""
The likelihood-estimator study: how well each estimator of log pi(y|x) in likelihood.py does on a
trained toy model, at an equal budget of forward passes (METHOD.md §7).

    python studies/estimators.py --ckpt=runs/toy/ckpt_sft.pt [--seed=0]

Needs a trained checkpoint and the VQ tokenizer it was trained with (`python train.py --preset=toy`
writes both); without --ckpt it reads ckpt_sft.pt in the out_dir of --preset (or of --out_dir).
CPU, one thread, fixed seeds: about 2 minutes on a 2-core CPU shared with other jobs (under 5).
Prints four tables and a [claims] block, and writes every number to runs/estimators.json (--out).
The checkpoint's own config decides the data and the model: any other config key, or --out_dir /
--preset beside --ckpt, is a one-line error.

The estimators, at 2 forward passes per (x, y) pair (the 1-pass ones for reference):
    complementary      LaViDa-R1: one complementary pair (t1, t2 = 1 - t1), w = 1       2 passes
    elbo_mc n=2        LLaDA's ELBO estimate: k ~ U{1..L} masked, weight L/k            2 passes
    mc_unweighted n=2  the same masks with w = 1 (isolates the weight)                  2 passes
    one_step           d1: the response fully masked (deterministic)                    1 pass
    one_step p=.15     d1 with 15% of the prompt tokens masked                          1 pass
    elbo_mc n=1        one LLaDA mask                                                   1 pass
elbo_mc is LLaDA's finite-variance form of the ELBO; its "t ~ U(0,1), weight 1/t" form has infinite
variance, so it would be a straw man.

The claims tested are those the LaViDa-R1 paper makes for its estimator (METHOD.md §7), numbered:
  1. lower variance than Monte Carlo masks, of the value and of the policy gradient, at equal
     passes: var complementary < mc_unweighted << elbo_mc; one_step has no variance but is biased;
  2. faithfulness: small bias against the exact likelihood, and the same ranking of candidates;
  3. coverage: every response token contributes to every draw;
  4. the 1/t (here L/k) weights are what makes the ELBO estimate noisy.
One function per measurement, on held-out (x, y) pairs of the four families (y = ground truth):
  value_draws + value_variance   variance of the value over 128 draws per pair      claim 1
  gradient_variance              trace of the covariance of d log pi^/d theta        claim 1
                                 (all parameters) over 32 draws per pair
  window_cases + bias            E[estimate] minus the exact ELBO and the exact any-order
                                 log-likelihood (likelihood.exact, by enumeration) on 5-token
                                 windows of real responses                           claim 2
  rank_correlation               Spearman correlation of ONE draw with the exact values across
                                 16 candidate windows per prompt                     claim 2
  coverage_and_weights           tokens scored per draw; the share of the elbo_mc n=1 variance
                                 from large weights; the share of the complementary
                                 variance explained by its t1                        claims 3, 4
  by_family                      the ratios per family: text (vqa, ground), image codes (t2i),
                                 both (edit). The paper expects the largest gap on long image
                                 responses; at toy size they are short (16 codes), so this
                                 separates modality from length only partly.
Variance ratios are given two ways: the ratio of the pair-averaged variances (dominated by the
pairs of largest variance) and the median of the per-pair ratios (every pair alike). The [claims]
block states each claim's outcome, whichever way it comes out.

References: LaViDa-R1 (arXiv 2602.14147); LLaDA, "Large Language Diffusion Models" (arXiv
2502.09992) for elbo_mc; d1, "Scaling Reasoning in Diffusion Large Language Models via
Reinforcement Learning" (arXiv 2504.12216) for one_step.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # the method's modules live one folder up (run from the repo root)

import common  # noqa: E402
import data  # noqa: E402
import tokens as T  # noqa: E402
import likelihood as LK  # noqa: E402
from diffusion import apply_mask  # noqa: E402
from study import git_commit, parse_options  # noqa: E402

FAMILIES = ("vqa", "ground", "edit", "t2i")
PAIRS_PER_FAMILY = 3        # value variance: 12 (x, y) pairs
GRAD_PAIRS_PER_FAMILY = 2   # gradient variance: 8 pairs (one backward per draw is the slow part)
K_VALUE = 128               # draws per pair for the value variance (relative SE of a variance ~ 1/8)
K_GRAD = 32                 # draws per pair for the gradient variance
WINDOW = 5                  # tiny cases: 5 response tokens -> 31 masked inputs per exact() call
WINDOW_PROMPTS = 2          # prompts per family for the tiny cases
N_CAND = 16                 # candidate windows per prompt (ground truth + 15 variants)
R_SPEARMAN = 8              # single draws per candidate (Spearman of one draw, averaged over 8)
K_BIAS_MC = 32              # draws for the one estimator enumeration does not cover (one_step p=.15)

# label -> (forward passes, estimator call, key of its exact expectation in likelihood.exact or None)
ESTIMATORS = {
    "complementary": (2, lambda m, b, t, g: LK.complementary(m, b, t, generator=g), "complementary"),
    "elbo_mc n=2": (2, lambda m, b, t, g: LK.elbo_mc(m, b, t, n=2, generator=g), "elbo"),
    "mc_unweighted n=2": (2, lambda m, b, t, g: LK.mc_unweighted(m, b, t, n=2, generator=g), "mc_unweighted"),
    "one_step": (1, lambda m, b, t, g: LK.one_step(m, b, t, generator=g), "one_step"),
    "one_step p=.15": (1, lambda m, b, t, g: LK.one_step(m, b, t, generator=g, p_prompt=0.15), None),
    "elbo_mc n=1": (1, lambda m, b, t, g: LK.elbo_mc(m, b, t, n=1, generator=g), "elbo"),
}
NAMES = list(ESTIMATORS)
BASE = "complementary"      # every ratio is estimator / BASE


def div(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


# ----------------------------------------------------------------------------------------------
# claim 1: variance of the value and of the policy gradient; claims 3, 4: coverage and weights


def value_draws(model, batch: T.Batch, tok, k: int, g) -> dict:
    """k draws of every estimator for one (x, y) pair (the pair repeated as k rows of one batch).
    Returns {"values": {label: (k,) float64}, "coverage": {label: (k,) share of the response scored},
    "t1": (k,)}: complementary's t1 ~ U[0, 1] is drawn here so that its share of the variance can
    be measured."""
    big = batch.repeat(k)
    L = batch.is_resp.sum().item()
    t1 = torch.rand(k, generator=g)
    values, coverage = {}, {}
    with torch.no_grad():
        for name, (_, fn, _) in ESTIMATORS.items():
            terms = LK.complementary(model, big, tok, generator=g, t1=t1) if name == BASE else fn(model, big, tok, g)
            # the sequence estimate, and the share of response tokens that some draw scored
            per_tok = (terms.weight * terms.logp).sum(0)                                    # (B, R)
            values[name], coverage[name] = per_tok.sum(1).double(), terms.scored.any(0).sum(1).double() / L
    return {"values": values, "coverage": coverage, "t1": t1}


def value_variance(draws: list[dict]) -> dict:
    """Claim 1 (value). draws: value_draws() of each pair. The variance over the draws per pair,
    averaged over pairs; its ratio to complementary; the median and range of the per-pair ratios."""
    per_pair = [{k: v.var().item() for k, v in d["values"].items()} for d in draws]
    var = {k: mean(p[k] for p in per_pair) for k in NAMES}
    per_pair_ratio = {}
    for k in NAMES:
        pr = sorted(p[k] / p[BASE] for p in per_pair if p[BASE] > 0)
        per_pair_ratio[k] = {"median": median(pr), "min": pr[0], "max": pr[-1]} if pr else {}
    return {"var": var, "ratio": {k: div(var[k], var[BASE]) for k in NAMES},
            "ratio_per_pair": per_pair_ratio, "per_pair": per_pair,
            "mean_per_pair": [{k: v.mean().item() for k, v in d["values"].items()} for d in draws]}


def t1_share(v: torch.Tensor, t1: torch.Tensor, bins: int = 8) -> float:
    """Share of the variance of v explained by t1: between-bin variance of the bin means (t1 in
    `bins` equal-width bins) over the total. The complementary value is U-shaped in t1 when the
    model's conditionals depend on context (t1 -> 0 or 1 leaves one half with almost no context)."""
    idx = (t1 * bins).long().clamp(max=bins - 1)
    tot = (v - v.mean()).pow(2).sum()
    between = sum(((v[idx == j].mean() - v.mean()) ** 2 * (idx == j).sum()) for j in range(bins) if (idx == j).any())
    return (between / tot).item() if tot > 0 else float("nan")


def coverage_and_weights(draws: list[dict]) -> dict:
    """Claim 3: the share of response tokens each estimator scores per draw (pair-averaged).
    Claim 4: with one LLaDA mask the coverage is k/L, so the draws with coverage <= 1/4 carry weights
    L/k >= 4: their share of the draws and of the elbo_mc n=1 variance. Also the share of the
    complementary variance explained by its t1 (the rest: which tokens land in which half)."""
    small_var, small_draws, t1s = [], [], []
    for d in draws:
        v1, c1 = d["values"]["elbo_mc n=1"], d["coverage"]["elbo_mc n=1"]
        dev2 = (v1 - v1.mean()).pow(2)
        small_var.append((dev2[c1 <= 0.25].sum() / dev2.sum()).item())
        small_draws.append((c1 <= 0.25).double().mean().item())
        t1s.append(t1_share(d["values"][BASE], d["t1"]))
    return {"coverage": {k: mean(d["coverage"][k].mean().item() for d in draws) for k in NAMES},
            "elbo1_small_k_var_share": mean(small_var), "elbo1_small_k_draw_share": mean(small_draws),
            "comp_t1_share": mean(t1s), "comp_t1_share_per_pair": t1s,
            "elbo1_small_k_var_share_per_pair": small_var, "elbo1_small_k_draw_share_per_pair": small_draws}


def gradient_variance(model, batches: list[T.Batch], tok, k: int, g) -> dict:
    """Claim 1 (gradient). Per pair and estimator, the total variance of the flattened gradient of
    log pi^ over k draws, (sum ||g||^2 - ||sum g||^2 / k) / (k - 1) (the trace of its covariance),
    and ||mean g||^2 for scale; averaged over pairs. one_step is deterministic: variance 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_pair = []
    for batch in batches:
        var, mean_sq = {"one_step": 0.0}, {}
        for name, (_, fn, _) in ESTIMATORS.items():
            if name == "one_step":
                continue
            s, ss = None, 0.0
            for _ in range(k):
                terms = fn(model, batch, tok, g)
                total = (terms.weight * terms.logp).sum(0).sum()                       # every term of the estimate
                flat = torch.cat([x.reshape(-1) for x in torch.autograd.grad(total, params)]).double()
                s = flat.clone() if s is None else s + flat
                ss += flat.pow(2).sum().item()
            var[name] = (ss - s.pow(2).sum().item() / k) / (k - 1)
            mean_sq[name] = (s / k).pow(2).sum().item()
        per_pair.append({"grad_var": var, "grad_mean_sq": mean_sq})
    model.zero_grad(set_to_none=True)
    gvar = {k: mean(p["grad_var"][k] for p in per_pair) for k in NAMES}
    return {"grad_var": gvar, "ratio": {k: div(gvar[k], gvar[BASE]) for k in NAMES},
            "grad_mean_sq": {k: mean(p["grad_mean_sq"][k] for p in per_pair) for k in NAMES if k != "one_step"},
            "per_pair": per_pair}


# ----------------------------------------------------------------------------------------------
# claim 2: bias and rank correlation against exact values, on short windows of real responses


def window_positions(batch: T.Batch, lay: T.Layout, task: str) -> list[int]:
    """WINDOW response columns (absolute) that make up a tiny-case response (see `windowed`).
    Text families: the first WINDOW trace tokens after <think> (the reasoning, not EOS filler).
    t2i: WINDOW image codes from the middle of the 4x4 code grid. edit: 2 plan tokens after <think>
    and 3 codes of the edited picture: both modalities in one window."""
    if task in ("vqa", "ground"):
        cols = list(range(1, 1 + WINDOW))
    elif task == "t2i":
        cols = [lay.R_text + 5 + j for j in range(WINDOW)]
    else:
        h = WINDOW // 2
        cols = list(range(1, 1 + h)) + [lay.R_text + 5 + j for j in range(WINDOW - h)]
    return [batch.P + c for c in cols]


def windowed(batch: T.Batch, cols: list[int], tok, tokens: torch.Tensor | None = None) -> T.Batch:
    """The same row(s) truncated to a window: only `cols` are the response (masked and scored by the
    estimators); every other response slot stays [MASK]/[IMASK] in every pass, as if the response
    were cut to the window. Its likelihood is then the window's marginal given x, under the model's
    own conditionals. Optional new token ids (candidates)."""
    toks = batch.tokens if tokens is None else tokens
    is_resp = torch.zeros_like(batch.is_resp)
    is_resp[:, cols] = True
    rest = batch.is_resp & ~is_resp
    toks = apply_mask(toks, rest.expand_as(toks), batch.is_image.expand_as(toks), tok)
    return T.Batch(toks, batch.valid, batch.is_prompt, is_resp, batch.is_image, batch.P, batch.tasks)


def candidates(model, wb: T.Batch, tok, cols: list[int], n: int, g) -> torch.Tensor:
    """n token rows (n, T): the ground truth, then variants with m = 1..len(cols) window tokens
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
    for c in range(1, n):
        row = wb.tokens[0].clone()
        for j in torch.randperm(len(cols), generator=g)[:1 + (c - 1) % len(cols)].tolist():
            col = cols[j]
            # keep the slot's modality: codes on image slots, non-special words on text slots
            allowed = torch.zeros_like(probs[col], dtype=torch.bool)
            if img[col]:
                allowed[tok.img_offset:] = True
            else:
                allowed[len(T.SPECIALS):tok.img_offset] = True
                allowed[tok.EOS] = True
            p = probs[col] * allowed
            p[row[col]] = 0.0
            row[col] = torch.multinomial(p / p.sum(), 1, generator=g).item()
        rows.append(row)
    return torch.stack(rows)


def window_cases(model, windows: list[tuple[T.Batch, list[int]]], tok, g, n_cand: int = N_CAND) -> list[dict]:
    """Per (one-pair batch, window columns): the candidate windows (ground truth first) and the exact
    values of each (likelihood.exact: every mask and every unmasking order enumerated)."""
    cases = []
    for b, cols in windows:
        cands = candidates(model, windowed(b, cols, tok), tok, cols, n_cand, g)      # (n_cand, T)
        exact = [LK.exact(model, windowed(b, cols, tok, c[None]), tok) for c in cands]
        cases.append({"batch": b, "cols": cols, "cands": cands, "exact": exact})
    return cases


def bias(model, cases: list[dict], tok, g, k_mc: int = K_BIAS_MC) -> dict:
    """Claim 2 (bias). On each ground-truth window: each estimator's expectation (exact, from the same
    enumeration; one_step p=.15 by k_mc draws) minus the exact ELBO and the exact any-order
    log-likelihood, averaged over windows."""
    rows = []
    for c in cases:
        e0 = c["exact"][0]
        wb = windowed(c["batch"], c["cols"], tok)
        with torch.no_grad():
            mc = ESTIMATORS["one_step p=.15"][1](model, wb.repeat(k_mc), tok, g).seq().double()
        est = {k: (e0[key] if key else mc.mean().item()) for k, (_, _, key) in ESTIMATORS.items()}
        rows.append({"elbo": e0["elbo"], "any_order": e0["any_order"], "mean": est,
                     "one_step_p15_se": mc.std().item() / math.sqrt(k_mc)})
    out = {k: {"mean": mean(r["mean"][k] for r in rows),
               "minus_elbo": mean(r["mean"][k] - r["elbo"] for r in rows),
               "minus_any_order": mean(r["mean"][k] - r["any_order"] for r in rows)} for k in NAMES}
    return {"bias": out, "elbo": mean(r["elbo"] for r in rows),
            "any_order": mean(r["any_order"] for r in rows), "windows": rows}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties) = Pearson correlation of the ranks."""
    def ranks(x):
        x = x.double()
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():                      # ties -> their average rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt().item()
    return float("nan") if den == 0 else (ra * rb).sum().item() / den


def rank_correlation(model, cases: list[dict], tok, g, reps: int = R_SPEARMAN) -> dict:
    """Claim 2 (ranking). Spearman correlation of ONE draw of each estimator with the exact
    any-order likelihood and with the exact ELBO across the candidate windows of a prompt, averaged
    over `reps` draws per candidate and over prompts."""
    rho = {k: {"any_order": [], "elbo": []} for k in NAMES}
    for c in cases:
        n = len(c["cands"])
        truth = {w: torch.tensor([e[w] for e in c["exact"]]) for w in ("any_order", "elbo")}
        cb = windowed(c["batch"].repeat(n * reps), c["cols"], tok, c["cands"].repeat_interleave(reps, 0))
        with torch.no_grad():
            for k, (_, fn, _) in ESTIMATORS.items():
                v = fn(model, cb, tok, g).seq().view(n, reps)
                for r in range(reps):
                    for w in truth:
                        rho[k][w].append(spearman(v[:, r], truth[w]))
    return {k: {w: mean(v) for w, v in d.items()} for k, d in rho.items()}


def by_family(per_pair: list[dict], per_grad_pair: list[dict]) -> dict:
    """The variance ratios per family. per_pair: {"task", "L", "n_img", "var", "comp_t1_share"} of each
    value pair; per_grad_pair: {"task", "grad_var"} of each gradient pair."""
    out = {}
    for f in FAMILIES:
        rs, gs = [r for r in per_pair if r["task"] == f], [r for r in per_grad_pair if r["task"] == f]
        if rs:
            out[f] = {"L": mean(r["L"] for r in rs), "n_img": rs[0]["n_img"],
                      "var": {k: mean(r["var"][k] for r in rs) for k in NAMES},
                      "grad_var": {k: mean(r["grad_var"][k] for r in gs) for k in NAMES} if gs else {},
                      "comp_t1_share": mean(r["comp_t1_share"] for r in rs)}
    return out


# ----------------------------------------------------------------------------------------------
# the study: load, run, print, save


def load(cfg, ckpt: str):
    """(model, bundle, source) from the checkpoint, on CPU, with the data it was trained on: its own
    config decides the data, and the VQ tokenizer it was trained with must still be in the cache."""
    path = ckpt or os.path.join(cfg.train.out_dir, "ckpt_sft.pt")
    if not os.path.exists(path):
        raise SystemExit(f"estimators: no checkpoint at {path}; run `python train.py --preset={cfg.preset}` "
                         f"first or pass --ckpt=PATH")
    cfg, bundle, model, _, blob = data.load_run(path, os.path.join("runs", "estimators"), "estimators")
    for p in model.parameters():
        p.requires_grad_(True)
    return model, bundle, f"{path} (step {blob['step']})"


def pick_pairs(bundle, per_family: int, g) -> list[tuple[str, int]]:
    """Held-out (eval split) examples with their ground-truth responses, per_family of each family."""
    out = []
    for task in FAMILIES:
        n = len(bundle.sets[task]["eval"])
        out += [(task, int(i)) for i in torch.randperm(n, generator=g)[:per_family]]
    return out


def first_per_family(pairs: list, n: int) -> list:
    return [pq for f in FAMILIES for pq in [x for x in pairs if x[0] == f][:n]]


def run_study(model, bundle, g) -> dict:
    """Every measurement on held-out pairs of the bundle, in a fixed order of draws from g."""
    tok = bundle.tok
    one = lambda t, i: T.collate({t: bundle.sets[t]["eval"]}, [(t, i)], tok)
    pairs = pick_pairs(bundle, PAIRS_PER_FAMILY, g)
    gpairs, wpairs = first_per_family(pairs, GRAD_PAIRS_PER_FAMILY), first_per_family(pairs, WINDOW_PROMPTS)
    secs, t0 = {}, time.time()
    batches = [one(t, i) for t, i in pairs]
    draws = [value_draws(model, b, tok, K_VALUE, g) for b in batches]
    values, cover = value_variance(draws), coverage_and_weights(draws)
    secs["value"], t0 = time.time() - t0, time.time()
    grads = gradient_variance(model, [one(t, i) for t, i in gpairs], tok, K_GRAD, g)
    secs["gradient"], t0 = time.time() - t0, time.time()
    windows = []
    for t, i in wpairs:
        b = one(t, i)
        windows.append((b, window_positions(b, bundle.layouts[t], t)))
    cases = window_cases(model, windows, tok, g)
    rho, bs = rank_correlation(model, cases, tok, g), bias(model, cases, tok, g)
    secs["exact"] = time.time() - t0
    per_pair = [{"task": t, "index": i, "L": int(b.is_resp.sum()), "n_img": int(b.is_image.sum()),
                 "var": values["per_pair"][j], "mean": values["mean_per_pair"][j],
                 **{k: cover[k + "_per_pair"][j] for k in
                    ("comp_t1_share", "elbo1_small_k_var_share", "elbo1_small_k_draw_share")}}
                for j, ((t, i), b) in enumerate(zip(pairs, batches))]
    per_grad_pair = [{"task": t, "index": i, **grads["per_pair"][j]} for j, (t, i) in enumerate(gpairs)]
    return {"values": values, "cover": cover, "grads": grads, "bias": bs, "rho": rho, "secs": secs,
            "per_pair": per_pair, "per_grad_pair": per_grad_pair, "by_family": by_family(per_pair, per_grad_pair),
            "bias_windows": [{"task": t, "index": i, **bs["windows"][j]} for j, (t, i) in enumerate(wpairs)]}


def print_variance(s: dict):
    v, gr, cov = s["values"], s["grads"], s["cover"]["coverage"]
    print(f"\n[1-2] value and policy-gradient variance at equal passes | {len(s['per_pair'])} pairs x {K_VALUE} "
          f"draws (value), {len(s['per_grad_pair'])} pairs x {K_GRAD} draws (gradient) | ratios = estimator / {BASE}")
    print(f"{'estimator':<20}{'passes':>7}{'var(value)':>12}{'ratio':>9}{'median [min, max] per pair':>30}"
          f"{'var(grad)':>12}{'ratio':>9}{'|E grad|^2':>12}{'coverage':>10}")
    for k in NAMES:
        pr = v["ratio_per_pair"][k]
        rng = f"{pr['median']:.3g} [{pr['min']:.3g}, {pr['max']:.3g}]" if pr else "-"
        print(f"{k:<20}{ESTIMATORS[k][0]:>7}{v['var'][k]:>12.4g}{v['ratio'][k]:>9.3g}{rng:>30}"
              f"{gr['grad_var'][k]:>12.4g}{gr['ratio'][k]:>9.3g}{gr['grad_mean_sq'].get(k, float('nan')):>12.4g}"
              f"{cov[k]:>10.3f}")
    print("(ratio = ratio of the pair-averaged variances, dominated by the pairs of largest variance; the median"
          " of the per-pair ratios weighs every pair alike. coverage = share of response tokens scored per draw.)")
    print(f"(variance of a variance from {K_VALUE} draws: relative SE ~ {math.sqrt(2 / (K_VALUE - 1)):.2f} per pair;"
          f" from {K_GRAD}: ~ {math.sqrt(2 / (K_GRAD - 1)):.2f}. one_step uses 1 pass and is deterministic.)")


def print_families(fam: dict):
    print("\n[5] variance by family (response length L = all response slots; n_img = image codes among them)")
    print(f"{'family':<8}{'L':>5}{'n_img':>6}{'var comp':>11}{'elbo2/comp':>12}{'mcu2/comp':>11}{'elbo1/comp':>12}"
          f"{'grad elbo2/comp':>17}{'grad mcu2/comp':>16}{'comp var from t1':>18}")
    for f, r in fam.items():
        mv, mg = r["var"], r["grad_var"]
        ratio = lambda d, k: div(d[k], d[BASE]) if d else float("nan")
        print(f"{f:<8}{r['L']:>5.0f}{r['n_img']:>6}{mv[BASE]:>11.4g}{ratio(mv, 'elbo_mc n=2'):>12.3g}"
              f"{ratio(mv, 'mc_unweighted n=2'):>11.3g}{ratio(mv, 'elbo_mc n=1'):>12.3g}"
              f"{ratio(mg, 'elbo_mc n=2'):>17.3g}{ratio(mg, 'mc_unweighted n=2'):>16.3g}"
              f"{100 * r['comp_t1_share']:>17.0f}%")
    print("(comp var from t1: share of the complementary estimator's value variance explained by its t1, i.e. by the"
          " U shape of E[value | t1]; the rest comes from which tokens land in which half)")


def print_exact(s: dict):
    bs, rho, nb = s["bias"], s["rho"], len(s["bias_windows"])
    print(f"\n[3] bias on {nb} ground-truth windows of {WINDOW} tokens ({WINDOW_PROMPTS} prompts per family; the "
          f"rest of the canvas masked) | mean exact ELBO {bs['elbo']:.3f}, any-order {bs['any_order']:.3f} "
          f"(nats per window)")
    print(f"{'estimator':<20}{'E[est]':>10}{'- ELBO':>10}{'- any-order':>13}   (E[est] exact by enumeration"
          f" except one_step p=.15: {K_BIAS_MC} draws)")
    for k in NAMES:
        b = bs["bias"][k]
        print(f"{k:<20}{b['mean']:>10.3f}{b['minus_elbo']:>10.3f}{b['minus_any_order']:>13.3f}")
    print(f"\n[4] Spearman rank correlation of ONE draw with the exact value, across {N_CAND} candidate windows"
          f" per prompt ({nb} prompts x {R_SPEARMAN} draws)")
    print(f"{'estimator':<20}{'vs any-order':>14}{'vs ELBO':>10}")
    for k in NAMES:
        print(f"{k:<20}{rho[k]['any_order']:>14.3f}{rho[k]['elbo']:>10.3f}")


def claims(s: dict) -> list[str]:
    """One line per claim, whichever way it comes out."""
    yn = lambda ok: "yes" if ok else "NO"
    e2, m2 = "elbo_mc n=2", "mc_unweighted n=2"
    rv, rg = s["values"]["ratio"], s["grads"]["ratio"]
    med = {k: s["values"]["ratio_per_pair"][k].get("median", float("nan")) for k in (e2, m2)}
    b = {k: s["bias"]["bias"][k]["minus_any_order"] for k in NAMES}
    rho, cov, cw = s["rho"], s["cover"]["coverage"], s["cover"]
    return [
        "[claims] (ratio of pair-averaged variances; per-pair medians in brackets)",
        f"claim 1, value:    var(elbo_mc n=2) / var(complementary) = {rv[e2]:.3g} [{med[e2]:.3g}]"
        f" -> complementary at most 1/3 of elbo_mc: {yn(rv[e2] >= 3)} [{yn(med[e2] >= 3)}]; "
        f"below mc_unweighted: {yn(rv[m2] > 1)} ({rv[m2]:.3g}x) [{yn(med[m2] > 1)}]",
        f"claim 1, gradient: var(elbo_mc n=2) / var(complementary) = {rg[e2]:.3g} -> at most 1/3: {yn(rg[e2] >= 3)}; "
        f"below mc_unweighted: {yn(rg[m2] > 1)} ({rg[m2]:.3g}x)",
        f"claim 1, one_step: variance 0 (deterministic, 1 pass); E - any-order on the windows: one_step "
        f"{b['one_step']:+.3f}, complementary {b[BASE]:+.3f}, elbo_mc {b[e2]:+.3f} nats (|one_step| > "
        f"|complementary|: {yn(abs(b['one_step']) > abs(b[BASE]))})",
        f"claim 2, rank correlation with any-order (one draw): complementary {rho[BASE]['any_order']:.3f}, "
        f"elbo_mc n=2 {rho[e2]['any_order']:.3f}, one_step {rho['one_step']['any_order']:.3f}",
        f"claim 3, coverage: complementary {cov[BASE]:.3f} of the response tokens per draw, elbo_mc n=2 "
        f"{cov[e2]:.3f}, elbo_mc n=1 {cov['elbo_mc n=1']:.3f}",
        f"claim 4, 1/t weights: elbo_mc n=1 draws with weight L/k >= 4 ({100 * cw['elbo1_small_k_draw_share']:.0f}% "
        f"of draws) carry {100 * cw['elbo1_small_k_var_share']:.0f}% of its variance",
    ]


def to_json(s: dict, head: dict) -> dict:
    """The results file: the numbers of every table, and the per-pair records behind them."""
    v, gr, cw = s["values"], s["grads"], s["cover"]
    return {**head, "pairs": len(s["per_pair"]), "draws_value": K_VALUE, "grad_pairs": len(s["per_grad_pair"]),
            "draws_grad": K_GRAD, "window": WINDOW, "n_candidates": N_CAND, "window_prompts": len(s["bias_windows"]),
            "draws_spearman": R_SPEARMAN, "value_var": v["var"], "value_var_ratio": v["ratio"],
            "value_var_ratio_per_pair": v["ratio_per_pair"], "grad_var": gr["grad_var"], "grad_var_ratio": gr["ratio"],
            "grad_mean_sq": gr["grad_mean_sq"], "coverage": cw["coverage"], "by_family": s["by_family"],
            "bias": s["bias"]["bias"], "spearman": s["rho"], "elbo1_small_k_var_share": cw["elbo1_small_k_var_share"],
            "elbo1_small_k_draw_share": cw["elbo1_small_k_draw_share"], "comp_t1_share": cw["comp_t1_share"],
            "per_pair": s["per_pair"], "per_grad_pair": s["per_grad_pair"], "bias_windows": s["bias_windows"]}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    # the checkpoint's own config decides the data and the model (load): the command line picks the
    # checkpoint (--ckpt, else ckpt_sft.pt in --out_dir / the --preset's out_dir) and the seed
    cfg, opts, given = parse_options("estimators.py", argv, {"ckpt": "", "out": os.path.join("runs", "estimators.json")},
                                     __doc__.strip(), ("train.seed", "train.out_dir", "preset"))
    if opts["ckpt"] and given & {"train.out_dir", "preset"}:
        raise SystemExit(f"estimators.py: --{sorted(given & {'train.out_dir', 'preset'})[0]} only says where to find "
                         f"ckpt_sft.pt, and --ckpt={opts['ckpt']} names it; drop one of them")
    # one thread: on a shared 2-core box a second intra-op thread spin-waits on a busy core and makes
    # these small matmuls ~10x slower (measured: 2 threads 1.2 s vs 1 thread 0.02 s per fwd+bwd)
    torch.set_num_threads(1)
    t_start, seed = time.time(), cfg.train.seed
    model, bundle, source = load(cfg, opts["ckpt"])
    head = {"checkpoint": source, "seed": seed, "commit": git_commit(), "torch": torch.__version__,
            "estimators": {k: {"passes": v[0]} for k, v in ESTIMATORS.items()}}
    print(f"estimators | model {source} | seed {seed} | commit {head['commit']} | torch {torch.__version__}"
          f" | {torch.get_num_threads()} threads")
    s = run_study(model, bundle, torch.Generator().manual_seed(seed))
    print_variance(s)
    print_exact(s)
    print_families(s["by_family"])
    print()
    print("\n".join(claims(s)))
    wall, secs = time.time() - t_start, s["secs"]
    print(f"\nwall time {wall:.0f}s (value {secs['value']:.0f}s, gradient {secs['gradient']:.0f}s, exact windows "
          f"{secs['exact']:.0f}s) | seed {seed} | pairs: {len(s['per_pair'])} value, {len(s['per_grad_pair'])} gradient, "
          f"{len(s['bias_windows'])} window prompts")
    common.write_json(opts["out"], {**to_json(s, head), "wall_s": wall})


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
