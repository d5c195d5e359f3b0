"""
Tests of estimators.py, the likelihood-estimator study, on a tiny random model and the tiny hand-made
pairs of tiny_vocab.py (the study's numbers themselves need a trained checkpoint: python
studies/estimators.py --ckpt=...).

  * value_draws / value_variance against an enumeration written here: on one 8-token pair (5 text +
    3 image slots) every mask each estimator can draw is enumerated with its probability (the
    conditionals from hand-masked forward calls, as in test_likelihood.BruteForce), giving each
    estimator's exact mean, variance and fourth moment; 4000 draws must match the mean (to 4
    standard errors; likelihood.exact gives the means of the four enumerable ones), and the variance
    and the variance ratio to complementary (to 4 standard errors of a sample variance). one_step is
    deterministic and biased: its value sits far from the exact ELBO and any-order likelihood.
  * bias: on the study's 3-token windows, its expectations and differences against the same brute
    force (so a wrong estimator-to-exact mapping fails), one_step p=.15 against its enumeration over
    prompt masks.
  * the other measurements (gradient variance, coverage, rank correlation, the [claims] block): keys,
    finite values, and the facts that hold by design (complementary scores every token of every
    draw, one LLaDA mask does not).
CPU, about 10 s.

    python -m pytest tests/test_estimators.py -q
"""
import itertools
import math

import pytest
import torch

import estimators as E
import likelihood as LK
from test_likelihood import EPS32, BruteForce, _beta_by_expansion, mask_by_hand, tiny_model
from tiny_vocab import TOK, mixed_batch

NAMES = set(E.ESTIMATORS)
N_SIGMA = 4.0            # statistical tolerance: 4 standard errors (two-sided p ~ 6e-5; seeds fixed)
K_MANY = 4000            # draws per estimator for the mean / variance checks (about 3 s)
P_PROMPT = 0.15          # the study's "one_step p=.15"
# the study's label -> the key of likelihood.exact that is its expectation (written out here, not
# read from E.ESTIMATORS, so that a wrong mapping in the study fails)
EXACT_KEY = {"complementary": "complementary", "elbo_mc n=2": "elbo", "mc_unweighted n=2": "mc_unweighted",
             "one_step": "one_step", "elbo_mc n=1": "elbo"}


def finite(x) -> bool:
    """Every number in a nested dict / list is finite."""
    if isinstance(x, dict):
        return all(finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


# ----------------------------------------------------------------------------------------------
# the reference: each estimator's distribution on one pair, by enumerating every mask it can draw


def moments(dist: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(mean, variance, fourth central moment) of a discrete distribution [(probability, value)]."""
    assert abs(sum(p for p, _ in dist) - 1.0) < 1e-12
    mu = sum(p * v for p, v in dist)
    return mu, sum(p * (v - mu) ** 2 for p, v in dist), sum(p * (v - mu) ** 4 for p, v in dist)


def of_two(m: tuple[float, float, float], scale: float) -> tuple[float, float, float]:
    """Moments of scale * (X1 + X2) for X1, X2 i.i.d. with moments m: the n = 2 estimators (elbo_mc
    n=2 averages two draws, scale 1/2; mc_unweighted n=2 sums them with w = 2/n = 1, scale 1).
    E (D1 + D2)^4 = 2 mu4 + 6 var^2 for centred i.i.d. D."""
    mu, var, mu4 = m
    return 2 * scale * mu, 2 * scale ** 2 * var, scale ** 4 * (2 * mu4 + 6 * var ** 2)


def one_step_prompt_masked(model, batch, p: float) -> list[tuple[float, float]]:
    """one_step with prompt masking, enumerated: each real prompt token masked with probability p
    (independently), the whole response masked; value = sum of log p(y_i | that input), from
    hand-masked inputs and the model's plain forward in float64."""
    toks, is_img = batch.tokens[0], batch.tokens[0] >= TOK.img_offset
    prompt = batch.is_prompt[0].nonzero().squeeze(1).tolist()
    resp = batch.is_resp[0].nonzero().squeeze(1).tolist()
    out = []
    for k in range(len(prompt) + 1):
        for D in itertools.combinations(prompt, k):
            idx = mask_by_hand(toks, list(D) + resp, is_img | batch.is_image[0])
            with torch.no_grad():
                lp = model(idx[None], batch.valid, batch.is_prompt)[0].double().log_softmax(-1)
            out.append((p ** k * (1 - p) ** (len(prompt) - k), sum(lp[i, toks[i]].item() for i in resp)))
    return out


def enumerated(model, batch) -> dict[str, tuple[float, float, float]]:
    """{study label: (mean, variance, fourth central moment)} of one draw of each estimator on ONE
    pair, from every mask it can draw:
      complementary   M1 = S with probability int t^k (1-t)^(L-k) dt (S may be empty or full),
                      value = sum_{i in S} c(S, i) + sum_{i not in S} c(S^c, i)
      one LLaDA mask  S with probability 1 / (L C(L, k)), k = |S| >= 1; elbo_mc scores it with
                      weight L/k, mc_unweighted with 1; the n = 2 forms combine two i.i.d. masks
      one_step        deterministic: sum_i c(all, i)
    c(S, i) = log p(y_i | y with S masked, x) from test_likelihood.BruteForce (hand-masked inputs)."""
    bf = BruteForce(model, batch)
    L, full = bf.L, range(bf.L)
    subsets = [S for k in range(L + 1) for S in itertools.combinations(full, k)]
    scored = lambda S: sum(bf.cond(S, i) for i in S)
    comp = [(_beta_by_expansion(len(S), L - len(S)), scored(S) + scored(tuple(i for i in full if i not in S)))
            for S in subsets]
    llada = [(1 / (L * math.comb(L, len(S))), len(S), scored(S)) for S in subsets if S]
    elbo1 = moments([(p, L / k * v) for p, k, v in llada])
    unw1 = moments([(p, v) for p, _, v in llada])
    return {"complementary": moments(comp), "elbo_mc n=1": elbo1, "elbo_mc n=2": of_two(elbo1, 0.5),
            "mc_unweighted n=2": of_two(unw1, 1.0), "one_step": (scored(tuple(full)), 0.0, 0.0),
            "one_step p=.15": moments(one_step_prompt_masked(model, batch, P_PROMPT))}


def se_of_variance(var: float, mu4: float, k: int) -> float:
    """Standard error of the unbiased sample variance of k i.i.d. draws:
    Var(s^2) = mu4 / k - var^2 (k - 3) / (k (k - 1))."""
    return math.sqrt(max(mu4 / k - var ** 2 * (k - 3) / (k * (k - 1)), 0.0))


@pytest.fixture(scope="module")
def many():
    """K_MANY draws of every estimator (value_draws) on one edit pair of 8 slots (5 text + 3 image),
    its enumerated distributions, and likelihood.exact's values for it."""
    model = tiny_model(seed=1)
    pair = mixed_batch().rows(torch.tensor([0]))
    draws = E.value_draws(model, pair, TOK, K_MANY, torch.Generator().manual_seed(0))
    return {"draws": draws, "ref": enumerated(model, pair), "exact": LK.exact(model, pair, TOK)}


# ----------------------------------------------------------------------------------------------
# the study's measurements at tiny sizes


@pytest.fixture(scope="module")
def study():
    """Every measurement at tiny sizes: 3 pairs (2 edit, 1 vqa) x 16 value draws, 2 pairs x 4
    gradient draws, 2 windows (2 text + 1 image slot; 3 text slots) x 4 candidates x 2 draws,
    one_step p=.15 with 64 draws per window in bias."""
    model = tiny_model(seed=1)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = mixed_batch()
    pairs = [batch.rows(torch.tensor([r])) for r in range(3)]
    g = torch.Generator().manual_seed(0)
    draws = [E.value_draws(model, b, TOK, 16, g) for b in pairs]
    P = batch.P
    windows = [(pairs[0], [P + 0, P + 1, P + 5]), (pairs[1], [P + 0, P + 1, P + 2])]
    cases = E.window_cases(model, windows, TOK, g, n_cand=4)
    out = {"draws": draws, "cases": cases, "values": E.value_variance(draws),
           "cover": E.coverage_and_weights(draws), "grads": E.gradient_variance(model, pairs[:2], TOK, 4, g),
           "rho": E.rank_correlation(model, cases, TOK, g, reps=2), "bias": E.bias(model, cases, TOK, g, k_mc=64)}
    return out


def test_value_draws_shapes(study):
    for d in study["draws"]:
        assert set(d["values"]) == NAMES and set(d["coverage"]) == NAMES and d["t1"].shape == (16,)
        assert all(v.shape == (16,) and torch.isfinite(v).all() for v in d["values"].values())
        assert torch.all(d["coverage"]["complementary"] == 1.0)          # every token, every draw


def test_value_variance_keys_per_pair(study):
    """value_variance over 3 pairs: every estimator, per pair and averaged, finite; one_step (no
    prompt masking) draws nothing, so its 16 values are identical."""
    v = study["values"]
    assert set(v["var"]) == set(v["ratio"]) == set(v["ratio_per_pair"]) == NAMES and finite(v)
    assert v["var"]["one_step"] == 0.0 and all(p["one_step"] == 0.0 for p in v["per_pair"])
    assert set(v["ratio_per_pair"]["elbo_mc n=2"]) == {"median", "min", "max"}
    assert len(v["per_pair"]) == len(v["mean_per_pair"]) == 3
    # the pair-averaged variance is the mean of the per-pair variances, each the draws' sample variance
    for k in NAMES:
        per = [d["values"][k].var().item() for d in study["draws"]]
        assert v["var"][k] == pytest.approx(sum(per) / 3, rel=1e-12, abs=1e-12)


def test_value_draws_means_match_the_exact_expectations(many):
    """The mean of 4000 draws of each estimator is its exact expectation (likelihood.exact) within 4
    standard errors (from the enumerated variance); one_step p=.15 against its enumeration over
    prompt masks. one_step is biased: its (deterministic) value is the exact one_step, far from the
    exact ELBO and any-order likelihood."""
    vals, ref, ex = many["draws"]["values"], many["ref"], many["exact"]
    assert ex["L"] == 8 and set(vals) == NAMES
    se = {k: math.sqrt(ref[k][1] / K_MANY) for k in NAMES}
    for k, key in EXACT_KEY.items():
        # the enumeration here and likelihood.exact agree on the mean: exact()'s table terms are
        # float32, each off by a few EPS32 * |term|; every term is a negative log-prob with a positive
        # weight, so the weighted sum is off by ~EPS32 * |sum| (2L of margin)
        assert abs(ref[k][0] - ex[key]) < N_SIGMA * EPS32 * 2 * ex["L"] * abs(ex[key]), k
    expect = {**{k: ex[key] for k, key in EXACT_KEY.items()}, "one_step p=.15": ref["one_step p=.15"][0]}
    for k in NAMES - {"one_step"}:
        m = vals[k].mean().item()
        assert abs(m - expect[k]) < N_SIGMA * se[k], f"{k}: mean {m:.4f} vs exact {expect[k]:.4f} (SE {se[k]:.4f})"
    # one_step: every draw is the fully masked forward (float32 sum of L terms vs the float64 table)
    o = vals["one_step"]
    assert torch.all(o == o[0])
    assert abs(o[0].item() - ex["one_step"]) < N_SIGMA * EPS32 * abs(ex["one_step"]) * math.sqrt(ex["L"])
    # ... and biased: the unbiased ELBO estimate's 4000-draw mean is many SEs away from it, and so is
    # the exact any-order likelihood
    for target in (ex["elbo"], ex["any_order"], vals["elbo_mc n=2"].mean().item()):
        assert abs(o[0].item() - target) > 2 * N_SIGMA * se["elbo_mc n=2"]
    # power: the expectations differ by more than the tolerances, so an estimator swapped for another
    # (or a weight dropped in value_draws) fails above
    for a, b in itertools.combinations(["complementary", "elbo_mc n=2", "mc_unweighted n=2", "one_step",
                                        "one_step p=.15"], 2):
        assert abs(expect[a] - expect[b]) > N_SIGMA * (se[a] + se[b]), f"{a} vs {b}: no power"


def test_value_variance_matches_the_enumerated_variance(many):
    """value_variance's variance of each estimator, and its ratio to complementary's, against the exact
    variance from enumerating every mask (4 standard errors of a sample variance of 4000 draws; the
    ratio's relative error is the two variances' relative errors in quadrature)."""
    v, ref = E.value_variance([many["draws"]]), many["ref"]
    se = {k: se_of_variance(ref[k][1], ref[k][2], K_MANY) for k in NAMES}
    for k in NAMES:
        assert abs(v["var"][k] - ref[k][1]) < N_SIGMA * se[k] + 1e-12, \
            f"{k}: var {v['var'][k]:.4f} vs exact {ref[k][1]:.4f} (SE {se[k]:.4f})"
    assert v["var"]["one_step"] == ref["one_step"][1] == 0.0
    base = ref["complementary"][1]
    rel_base = se["complementary"] / base
    for k in NAMES - {"complementary", "one_step"}:
        r = ref[k][1] / base
        tol = N_SIGMA * r * math.hypot(se[k] / ref[k][1], rel_base)
        assert abs(v["ratio"][k] - r) < tol, f"{k}: ratio {v['ratio'][k]:.3f} vs exact {r:.3f} (tol {tol:.3f})"
        # power: the exact ratio is far from 1, so a variance computed on the wrong estimator fails
        assert abs(r - 1.0) > tol, f"{k}: no power"
    # with one pair the per-pair median is that pair's ratio
    assert v["ratio_per_pair"]["elbo_mc n=2"]["median"] == pytest.approx(v["ratio"]["elbo_mc n=2"])


def test_coverage_and_weights(study):
    c = study["cover"]
    assert set(c["coverage"]) == NAMES and finite(c)
    assert c["coverage"]["complementary"] == 1.0 and c["coverage"]["elbo_mc n=1"] < 1.0
    for k in ("elbo1_small_k_var_share", "elbo1_small_k_draw_share", "comp_t1_share"):
        assert 0.0 <= c[k] <= 1.0


def test_gradient_variance(study):
    gr = study["grads"]
    assert set(gr["grad_var"]) == set(gr["ratio"]) == NAMES and finite(gr)
    assert gr["grad_var"]["complementary"] > 0
    assert set(gr["grad_mean_sq"]) == NAMES - {"one_step"} and len(gr["per_pair"]) == 2


def test_gradient_variance_is_zero_exactly_where_the_estimate_is_deterministic():
    """A one-token window (the rest of the response stays masked): every mask an estimator can draw
    masks that token and nothing else, so complementary, elbo_mc and mc_unweighted give the same
    estimate, hence the same gradient, on every draw: gradient variance 0 (up to float64
    cancellation in sum ||g||^2 - ||sum g||^2 / k). one_step p=.15 still masks prompt tokens at
    random: its variance is well above 0."""
    model = tiny_model(seed=1)
    for p in model.parameters():
        p.requires_grad_(True)
    pair = mixed_batch().rows(torch.tensor([0]))
    one = E.windowed(pair, [pair.P + 1], TOK)
    k = 8
    gr = E.gradient_variance(model, [one], TOK, k, torch.Generator().manual_seed(0))
    scale = max(gr["grad_mean_sq"].values())
    for name in NAMES - {"one_step p=.15"}:
        assert abs(gr["grad_var"][name]) < 1e-9 * scale, name
    assert gr["grad_var"]["one_step p=.15"] > 1e-3 * scale


def test_bias_against_brute_force(study):
    """bias() on the study's two 3-token windows: each estimator's expectation, and its differences
    from the exact ELBO and any-order likelihood, equal the brute force of test_likelihood on the
    windowed pair (one_step p=.15, which bias() estimates from 64 draws, equal to its enumeration
    within 4 standard errors); one_step's bias is far from 0."""
    b = study["bias"]
    assert set(b["bias"]) == NAMES and finite(b) and len(b["windows"]) == 2
    assert all(len(c["cands"]) == 4 and len(c["exact"]) == 4 for c in study["cases"])
    model = tiny_model(seed=1)
    truth = []
    for c, row in zip(study["cases"], b["windows"]):
        wb = E.windowed(c["batch"], c["cols"], TOK)
        bf = BruteForce(model, wb)
        assert bf.L == 3
        used = [abs(bf.cond(S, i)) for k in range(1, 4) for S in itertools.combinations(range(3), k) for i in S]
        # exact()'s table is float32 (the brute force float64): each weighted sum is off by at most
        # ~EPS32 * max|term| per unit of weight, and the weights of every quantity sum to <= 2L
        tol = N_SIGMA * EPS32 * max(used) * 2 * bf.L
        full = tuple(range(3))
        t = {"elbo": bf.elbo_integral(), "any_order": bf.any_order(), "complementary": bf.complementary(),
             "mc_unweighted": bf.mc_unweighted(), "one_step": sum(bf.cond(full, i) for i in full)}
        p15 = moments(one_step_prompt_masked(model, wb, P_PROMPT))
        t["one_step p=.15"] = p15[0]
        assert row["elbo"] == pytest.approx(t["elbo"], abs=tol) and row["any_order"] == pytest.approx(t["any_order"], abs=tol)
        for k, key in EXACT_KEY.items():
            assert row["mean"][k] == pytest.approx(t[key], abs=tol), k
        assert abs(row["mean"]["one_step p=.15"] - p15[0]) < N_SIGMA * math.sqrt(p15[1] / 64)
        truth.append({**{k: t[key] for k, key in EXACT_KEY.items()}, "one_step p=.15": p15[0], "var15": p15[1],
                      "elbo": t["elbo"], "any_order": t["any_order"], "tol": tol})
    tol = max(r["tol"] for r in truth)
    # the p=.15 means are 64-draw estimates: their average over the two windows has a standard error
    # of sqrt(v1/64 + v2/64) / 2 around the enumerated value
    se15 = math.sqrt(sum(r["var15"] / 64 for r in truth)) / 2
    for k in NAMES:
        tk = 2 * tol + (N_SIGMA * se15 if k == "one_step p=.15" else 0.0)
        assert b["bias"][k]["minus_elbo"] == pytest.approx(sum(r[k] - r["elbo"] for r in truth) / 2, abs=tk), k
        assert b["bias"][k]["minus_any_order"] == pytest.approx(sum(r[k] - r["any_order"] for r in truth) / 2, abs=tk), k
    # the ELBO is a lower bound of the any-order likelihood, and one_step's bias is real on these windows
    assert b["elbo"] <= b["any_order"] + tol
    assert abs(b["bias"]["one_step"]["minus_elbo"]) > 1000 * tol


def test_rank_correlation(study):
    rho = study["rho"]
    assert set(rho) == NAMES and finite(rho)
    for k in NAMES:
        assert set(rho[k]) == {"any_order", "elbo"} and all(-1.0 <= r <= 1.0 for r in rho[k].values())
    assert E.spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])) == pytest.approx(0.5)


def test_by_family_and_claims(study):
    per_pair = [{"task": t, "L": 8, "n_img": 3, "var": study["values"]["per_pair"][j],
                 "comp_t1_share": study["cover"]["comp_t1_share_per_pair"][j]}
                for j, t in enumerate(["edit", "vqa", "edit"])]
    per_grad = [{"task": t, **study["grads"]["per_pair"][j]} for j, t in enumerate(["edit", "vqa"])]
    fam = E.by_family(per_pair, per_grad)
    assert set(fam) == {"edit", "vqa"} and finite(fam)
    lines = E.claims(study)
    assert lines[0].startswith("[claims]") and [ln.split(",")[0] for ln in lines[1:]] == \
        ["claim 1"] * 3 + ["claim 2", "claim 3", "claim 4"]
